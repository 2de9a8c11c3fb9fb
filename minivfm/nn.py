"""Shared building blocks: attention, MLP, transformer block, patch embedding, embeddings.

Every model in minivfm builds on these; a model file does not re-write them.
Parameter names follow timm (``qkv``/``proj``, ``fc1``/``fc2``, ``norm1``/``attn``/
``norm2``/``mlp``) so that reference weights load with ``load_state_dict(strict=True)``.

References:
    Vaswani et al. 2017, "Attention Is All You Need" (eq. 1: scaled dot-product attention).
    Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (the pre-norm ViT block, eqs 2-3).
    Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (adaLN-Zero, DiT).
    He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" (2-D sin-cos positions).
    Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (sinusoidal timestep embedding).
    Xiao et al. 2021, "Early Convolutions Help Transformers See Better" (the convolutional stem).
    timm: https://github.com/huggingface/pytorch-image-models (layers/, vision_transformer.py)

Shape glossary: B batch, N tokens, D width, H heads, Dh = D / H head width,
C channels, P patch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "CrossAttention",
    "Mlp",
    "Block",
    "PatchEmbed",
    "ConvStem",
    "sincos_pos_embed_2d",
    "sincos_embed_1d",
    "timestep_embedding",
    "TimestepEmbedder",
    "modulate",
]


def _pair(x: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) for v in x):
        return (int(x[0]), int(x[1]))
    raise TypeError(f"{name} must be an int or a pair of ints (H, W), got {x!r}")


class Attention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(Dh)) V, then an output projection.

    Arguments:
        dim: token width D.
        num_heads: number of heads H; ``dim`` must be divisible by it.
        qkv_bias: add a bias to the joint Q, K, V projection.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: Tensor, return_attention: bool = False, is_causal: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """
        Arguments:
            x: tokens ``(B, N, D)``.
            return_attention: also return the attention weights ``(B, H, N, N)``
                (computed by an explicit softmax instead of the fused kernel).
            is_causal: token ``i`` attends to tokens ``0..i`` only (a text encoder's causal mask).

        Returns:
            ``(B, N, D)``, or ``((B, N, D), (B, H, N, N))`` with ``return_attention``.
        """
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        if return_attention:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if is_causal:
                future = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)  # (N, N), True above the diagonal
                attn = attn.masked_fill(future, float("-inf"))
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v  # (B, H, N, Dh)
        else:
            dropout_p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attention else x


class Mlp(nn.Module):
    """Two-layer perceptron applied to each token: fc1, activation, fc2."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, N, hidden)
        return self.drop2(self.fc2(x))  # (B, N, out)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with per-sample ``(B, D)`` shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block (ViT eqs 2-3), optionally conditioned with adaLN-Zero (DiT).

    Unconditioned::

        x = x + attn(norm1(x))
        x = x + mlp(norm2(x))

    With ``cond_dim``, a conditioning vector ``c`` (B, cond_dim) regresses a shift, a scale
    and a gate for each branch; the regression is zero-initialised, so the block starts
    as the identity (DiT's adaLN-Zero). The norms then have no affine parameters.

    Arguments:
        dim: token width D.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        qkv_bias: bias in the Q, K, V projection.
        cond_dim: width of the conditioning vector; ``None`` for a plain block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        cond_dim: int | None = None,
    ) -> None:
        super().__init__()
        affine = cond_dim is None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        self.cond_dim = cond_dim
        if cond_dim is not None:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(
        self, x: Tensor, cond: Tensor | None = None, return_attention: bool = False, is_causal: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """
        Arguments:
            x: tokens ``(B, N, D)``.
            cond: conditioning ``(B, cond_dim)``; required if and only if the block has ``cond_dim``.
            return_attention: also return the attention weights ``(B, H, N, N)``.
            is_causal: causal self-attention (see :class:`Attention`).
        """
        if self.cond_dim is None:
            if cond is not None:
                raise ValueError("cond was given but this Block was built without cond_dim")
            h = self.attn(self.norm1(x), return_attention=return_attention, is_causal=is_causal)
            h, attn = h if return_attention else (h, None)
            x = x + h  # (B, N, D)
            x = x + self.mlp(self.norm2(x))  # (B, N, D)
        else:
            if cond is None or cond.ndim != 2 or cond.shape[-1] != self.cond_dim:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must have shape (B, {self.cond_dim}), got {got}")
            mods = self.adaLN_modulation(cond).chunk(6, dim=-1)  # 6 x (B, D)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            h = self.attn(
                modulate(self.norm1(x), shift_msa, scale_msa), return_attention=return_attention, is_causal=is_causal
            )
            h, attn = h if return_attention else (h, None)
            x = x + gate_msa.unsqueeze(1) * h  # (B, N, D)
            x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return (x, attn) if return_attention else x


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping P x P patches and project each to D (a strided conv).

    Arguments:
        image_size: input size, an int or ``(H, W)``.
        patch_size: patch side P; must divide the image size.
        in_chans: input channels C.
        embed_dim: output width D.

    Attributes:
        grid_size: ``(H / P, W / P)``.
        num_patches: N = (H / P) * (W / P).
        patch_local: each token is a function of its own patch's pixels only (MAE needs it).
        dynamic_img_size: accept any input whose sides P divides, not only ``image_size`` (set by
            ``ViT(dynamic_img_size=True)``, which resamples its positions to the input's grid).
    """

    patch_local = True
    dynamic_img_size = False

    def __init__(
        self,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
    ) -> None:
        super().__init__()
        self.image_size = _pair(image_size, "image_size")
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if any(s % patch_size for s in self.image_size):
            raise ValueError(f"patch_size ({patch_size}) must divide image_size {self.image_size}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, N, D)``, patches in row-major order."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {got}")
        B, C, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(f"images have {C} channels, expected in_chans={self.in_chans}")
        if self.dynamic_img_size:
            if H % self.patch_size or W % self.patch_size:
                raise ValueError(f"images are {H}x{W}, expected sides divisible by patch_size={self.patch_size}")
        elif (H, W) != self.image_size:
            raise ValueError(f"images are {H}x{W}, expected image_size={self.image_size[0]}x{self.image_size[1]}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class ConvStem(PatchEmbed):
    """A convolutional stem in place of the patch projection (Xiao et al. 2021): log2(P) 3x3
    stride-2 convolutions with BatchNorm and ReLU, then a 1x1 convolution to D. It returns the same
    ``(B, N, D)`` tokens on the same ``(H / P, W / P)`` grid as :class:`PatchEmbed`, but each token
    sees a little across its patch's border and the stem brings a convolution's locality and
    translation equivariance, which a small ViT on little data otherwise has to learn.
    The widths double up to D: D / 2^(k-1), ..., D / 2, with k = log2(P) convolutions.

    Arguments: as :class:`PatchEmbed`; ``patch_size`` must be a power of two (>= 2).
    """

    patch_local = False  # a 3x3 convolution reaches into the neighbouring patches

    def __init__(
        self,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 192,
    ) -> None:
        super().__init__(image_size, patch_size, in_chans, embed_dim)
        k = patch_size.bit_length() - 1
        if patch_size < 2 or patch_size != 2**k:
            raise ValueError(f"ConvStem needs a power-of-two patch_size >= 2, got {patch_size}")
        widths = [max(8, embed_dim // 2 ** (k - 1 - i)) for i in range(k)]  # e.g. D/4, D/2, D for P = 8
        layers: list[nn.Module] = []
        cin = in_chans
        for width in widths:
            layers += [nn.Conv2d(cin, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            cin = width
        layers.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)


def sincos_embed_1d(positions: Tensor, dim: int) -> Tensor:
    """Sin-cos embedding of positions (MAE's ``get_1d_sincos_pos_embed_from_grid``).

    Arguments:
        positions: any shape, flattened to M positions.
        dim: embedding width, even.

    Returns:
        ``(M, dim)``: ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000^(-i / (dim/2))``.
    """
    if dim % 2:
        raise ValueError(f"dim must be even for a sin-cos embedding, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()  # (M, dim)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> Tensor:
    """Fixed 2-D sin-cos positional embedding (MAE's ``get_2d_sincos_pos_embed``).

    Half of the width encodes the column, half the row.

    Returns:
        ``(N, D)``, or ``(1 + N, D)`` with a zero row first when ``cls_token``.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = _pair(grid_size, "grid_size")
    grid_w, grid_h = torch.meshgrid(
        torch.arange(gw, dtype=torch.float64), torch.arange(gh, dtype=torch.float64), indexing="xy"
    )  # (gh, gw) each, as numpy.meshgrid(grid_w, grid_h)
    emb = torch.cat([sincos_embed_1d(grid_w, embed_dim // 2), sincos_embed_1d(grid_h, embed_dim // 2)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim), emb], dim=0)
    return emb  # (N[+1], D)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / DiT.

    Arguments:
        t: ``(B,)`` timesteps.
        dim: output width.

    Returns:
        ``(B, dim)``: ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period^(-i / (dim/2))``.
    """
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of timesteps (B,), got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Timesteps to vectors: sinusoidal embedding, then a two-layer MLP with SiLU (DiT)."""

    def __init__(self, hidden_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, hidden_dim)


class CrossAttention(nn.Module):
    """Attention with separate query, key and value inputs (SAM's ``Attention``): each is projected
    to an internal width ``dim / downsample_rate`` split into heads, softmax(Q K^T / sqrt(Dh)) V,
    then projected back to ``dim``. SAM's two-way transformer uses it for token self-attention
    (``q = k = tokens + positions``, ``v = tokens``) and, with ``downsample_rate=2``, for the
    cross-attention between prompt tokens and image tokens.

    Arguments:
        dim: width D of the queries and of the output.
        num_heads: heads H; the internal width ``dim // downsample_rate`` must be divisible by it.
        downsample_rate: shrink the internal width (cheaper attention over many image tokens).
        kv_dim: width of the keys and values; ``None`` means ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, kv_dim: int | None = None) -> None:
        super().__init__()
        if not isinstance(downsample_rate, int) or downsample_rate < 1 or dim % downsample_rate:
            raise ValueError(f"downsample_rate must be a positive int dividing dim ({dim}), got {downsample_rate!r}")
        internal = dim // downsample_rate
        if num_heads <= 0 or internal % num_heads:
            raise ValueError(
                f"the internal width dim // downsample_rate ({internal}) must be divisible by num_heads ({num_heads})"
            )
        kv_dim = dim if kv_dim is None else kv_dim
        self.dim, self.kv_dim, self.internal_dim, self.num_heads = dim, kv_dim, internal, num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(kv_dim, internal)
        self.v_proj = nn.Linear(kv_dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.internal_dim // self.num_heads).transpose(1, 2)  # (B, H, N, Dh)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """
        Arguments:
            q: queries ``(B, Nq, dim)``.
            k: keys ``(B, Nk, kv_dim)``.
            v: values ``(B, Nk, kv_dim)``.
            return_attention: also return the weights ``(B, H, Nq, Nk)`` (an explicit softmax).

        Returns:
            ``(B, Nq, dim)`` (and the weights).
        """
        if q.ndim != 3 or q.shape[-1] != self.dim:
            raise ValueError(f"q: expected (B, Nq, {self.dim}), got {tuple(q.shape)}")
        for name, t in (("k", k), ("v", v)):
            if t.ndim != 3 or t.shape[-1] != self.kv_dim or t.shape[0] != q.shape[0]:
                raise ValueError(f"{name}: expected ({q.shape[0]}, Nk, {self.kv_dim}), got {tuple(t.shape)}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v: expected the same number of tokens, got {k.shape[1]} and {v.shape[1]}")
        qh, kh, vh = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        if return_attention:
            attn = (qh @ kh.transpose(-2, -1) * qh.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, Nq, Nk)
            out = attn @ vh  # (B, H, Nq, Dh)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh)  # (B, H, Nq, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[1], self.internal_dim))  # (B, Nq, dim)
        return (out, attn) if return_attention else out
