"""Vision Transformer (ViT).

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", https://arxiv.org/abs/2010.11929. The model, in the
paper's equations:

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos       (eq 1: patches, class token, positions)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                     (eq 2)
    z_l = MLP(LN(z'_l)) + z'_l                            (eq 3)
    y = LN(z_L^0)                                         (eq 4: the class token, then a linear head)

Names follow timm's ``vision_transformer.py``
(https://github.com/huggingface/pytorch-image-models), so that :meth:`ViT.from_timm`
is a ``load_state_dict(strict=True)``.

Shape glossary: B batch, C channels, H x W image, P patch size, N = HW / P^2 patches,
D width, L depth, K classes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivfm.nn import Block, ConvStem, PatchEmbed
from minivfm.profiles import fill_from_preset, preset_arguments
from minivfm.profiles import profile as _profile

__all__ = ["ViTConfig", "patchify", "unpatchify", "random_shift", "ViT", "ViTClassifier", "results"]


# -- config -----------------------------------------------------------------------------------------


@dataclass
class ViTConfig:
    """Sizes of the ViT and how to train it; :meth:`preset` picks them for a profile."""

    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    stem: str = "patch"  # "patch" (the paper's, timm's) or "conv" (Xiao et al. 2021)
    # training
    batch_size: int = 128
    max_epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    shift: int = 0  # data augmentation: random translation by up to this many pixels
    # data
    data: str = "shapes"  # "shapes" or "digits"
    num_train: int | None = None  # Shapes items per split; None: the DataModule's profile default
    num_val: int | None = None
    num_test: int | None = None

    @classmethod
    def preset(cls, profile: str | None = None, data: str = "shapes") -> ViTConfig:
        """The config for a profile (``ci``, ``cpu``, ``gpu``; ``None`` reads ``MINIVFM_PROFILE``)
        and a data set (``"shapes"`` or ``"digits"``, which differ in epochs and augmentation)."""
        name = _profile(profile)
        if data not in ("shapes", "digits"):
            raise ValueError(f"data must be 'shapes' or 'digits', got {data!r}")
        digits = data == "digits"
        if name == "ci":
            return cls(
                patch_size=8, embed_dim=32, depth=2, num_heads=2, stem="conv", batch_size=64, lr=2e-3,
                warmup_epochs=0.5, max_epochs=12 if digits else 4, data=data, num_train=2000, num_val=250,
                num_test=500,
            )  # fmt: skip
        if name == "cpu":
            # the conv stem at lr 1e-3 on 24,000 scenes: the patch stem at the same budget stays near
            # 0.6 (lr 5e-4) or at the colour-only plateau of 1/3 (lr 2e-3); see lesson 04
            return cls(
                patch_size=8, embed_dim=64, depth=4, num_heads=4, stem="conv", batch_size=64,
                lr=2e-3 if digits else 1e-3, warmup_epochs=2.0 if digits else 1.0, max_epochs=50 if digits else 12,
                shift=2 if digits else 0, data=data, num_train=24_000, num_val=1000, num_test=2000,
            )  # fmt: skip
        return cls(
            patch_size=4, embed_dim=192, depth=6, num_heads=3, stem="conv", batch_size=256, lr=1e-3,
            warmup_epochs=5.0,
            max_epochs=200 if digits else 100, shift=2, data=data, num_train=100_000, num_val=5000, num_test=10_000,
        )  # fmt: skip

    def model_kwargs(self) -> dict:
        """The arguments of :class:`ViT`."""
        keys = ("image_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio")
        keys += ("stem",)
        return {k: getattr(self, k) for k in keys}


# -- the functions a lesson rebuilds ----------------------------------------------------------------


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches, each flattened (MAE's ``patchify``).

    Arguments:
        images: ``(B, C, H, W)``; ``patch_size`` must divide H and W.
        patch_size: P.

    Returns:
        ``(B, N, P*P*C)`` with patches in row-major order and each patch flattened as
        ``(P, P, C)`` (row, column, channel), as in MAE.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"patch_size ({P}) must divide the image size {H}x{W}")
    x = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, h, P, w, P)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
    return x.reshape(B, (H // P) * (W // P), P * P * C)  # (B, N, P*P*C)


def unpatchify(patches: Tensor, patch_size: int, image_size: int | tuple[int, int] | None = None) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, N, P*P*C) -> (B, C, H, W)``.

    ``image_size`` (int or ``(H, W)``) defaults to a square grid.
    """
    B, N, PPC = patches.shape
    P = patch_size
    C = PPC // (P * P)
    if C * P * P != PPC:
        raise ValueError(f"patches have {PPC} values, not a multiple of patch_size^2 = {P * P}")
    if image_size is None:
        h = w = math.isqrt(N)
        if h * w != N:
            raise ValueError(f"{N} patches do not form a square grid; pass image_size")
    else:
        H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
        h, w = H // P, W // P
        if h * w != N:
            raise ValueError(f"image_size {H}x{W} with patch_size {P} has {h * w} patches, got {N}")
    x = patches.reshape(B, h, w, P, P, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, P, w, P)
    return x.reshape(B, C, h * P, w * P)  # (B, C, H, W)


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge padding, then a random crop)."""
    if max_shift <= 0:
        return images
    B, C, H, W = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")  # (B, C, H+2s, W+2s)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator, device=images.device)
    rows = (dy[:, None] + torch.arange(H, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(B, device=images.device)[:, None, None, None]
    c = torch.arange(C, device=images.device)[None, :, None, None]
    return padded[b, c, rows, cols]  # (B, C, H, W)


# -- the model --------------------------------------------------------------------------------------


class ViT(nn.Module):
    """Vision Transformer with a class token and learned positions (timm's names).

    Arguments:
        image_size: input size H = W (or ``(H, W)``).
        patch_size: patch side P.
        in_chans: input channels C.
        num_classes: classes K; 0 gives no head (``forward`` returns the class token's features).
        embed_dim: width D.
        depth: number of blocks L.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of D.
        qkv_bias: bias in the Q, K, V projections.
        stem: ``"patch"``, the paper's (and timm's) linear projection of each patch, or ``"conv"``,
            a few strided 3x3 convolutions (:class:`minivfm.nn.ConvStem`; Xiao et al. 2021) that
            learn far faster on small data. Either gives ``(H / P) x (W / P)`` tokens.
        dynamic_img_size: also take inputs of other sizes (sides divisible by P), with the learned
            positions resampled to their grid (:meth:`interpolate_pos_encoding`; DINO's local crops).
    """

    STEMS = {"patch": PatchEmbed, "conv": ConvStem}

    def __init__(
        self,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        stem: str = "patch",
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        if stem not in self.STEMS:
            raise ValueError(f"stem must be one of {sorted(self.STEMS)}, got {stem!r}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = self.STEMS[stem](image_size, patch_size, in_chans, embed_dim)
        self.patch_embed.dynamic_img_size = dynamic_img_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's init: truncated normal (std .02) for positions, class token and linear layers."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Images to tokens, eqs 1-3 and the final norm.

        Arguments:
            x: images ``(B, C, H, W)``.
            return_attention: also return one ``(B, heads, 1+N, 1+N)`` attention tensor per block.

        Returns:
            tokens ``(B, 1+N, D)``, class token first (and the attention list).
        """
        size = tuple(x.shape[-2:]) if isinstance(x, Tensor) else None
        x = self.patch_embed(x)  # (B, N, D), checks the input
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.interpolate_pos_encoding(*size)  # (B, 1+N, D)
        attentions = []
        for block in self.blocks:
            if return_attention:
                x, attn = block(x, return_attention=True)  # (B, 1+N, D), (B, heads, 1+N, 1+N)
                attentions.append(attn)
            else:
                x = block(x)  # (B, 1+N, D)
        x = self.norm(x)
        return (x, attentions) if return_attention else x

    def interpolate_pos_encoding(self, height: int, width: int) -> Tensor:
        """Positions for a ``height x width`` input, ``(1, 1+N', D)``: ``pos_embed`` at the native
        size, else its patch grid resampled bicubically to ``(height / P, width / P)`` and the class
        token's position kept (DINO's ``interpolate_pos_encoding``)."""
        (gh, gw), P = self.patch_embed.grid_size, self.patch_embed.patch_size
        h, w = height // P, width // P
        if (h, w) == (gh, gw):
            return self.pos_embed
        D = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, gh, gw, D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class token ``(B, 1+N, D)`` -> logits ``(B, K)`` (or its features ``(B, D)``)."""
        x = x[:, 0]  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> logits ``(B, K)``."""
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: Tensor, layer: int | None = -1) -> Tensor | list[Tensor]:
        """Attention weights ``(B, heads, 1+N, 1+N)`` of one block (default the last; ``None``: all)."""
        _, attentions = self.forward_features(x, return_attention=True)
        return attentions if layer is None else attentions[layer]

    @classmethod
    def from_timm(cls, timm_model: nn.Module) -> ViT:
        """A ViT with the weights of a timm ``VisionTransformer``, whose outputs it reproduces.

        Three steps: read the arguments (:func:`_config_from_timm`), load timm's state dict with
        ``strict=True`` (a variant with other parameters, such as registers, layer scale, qk-norm or
        fc-norm, fails here), then run both models in eval mode on one fixed random batch and compare
        their tokens, pre-logits and logits (a variant that computes differently with the same
        parameters, such as average pooling, fails here). Dropout, drop path and patch dropout are
        training-time noise, not copied; compare in ``eval()``. The global RNG is left as it was.

        Raises:
            TypeError: not a timm ``VisionTransformer``.
            ValueError: a variant this ViT cannot represent.
        """
        import re

        cfg = _config_from_timm(timm_model)
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the RNG alone
            model = cls(**cfg)
        ours, theirs = model.state_dict(), timm_model.state_dict()
        diffs = [f"missing:{k}" for k in ours if k not in theirs] + [f"extra:{k}" for k in theirs if k not in ours]
        diffs += [f"shape:{k}" for k in ours if k in theirs and ours[k].shape != theirs[k].shape]
        if diffs:
            hints = [h for pattern, h in _TIMM_KEY_HINTS if any(re.fullmatch(pattern, d) for d in diffs)]
            _refuse(f"{'; '.join(hints or ['its parameters differ'])} (state dict: {', '.join(diffs)})")
        model.load_state_dict(theirs, strict=True)
        _compare_with_timm(model, timm_model, (2, cfg["in_chans"], *cfg["image_size"]))
        return model


def _refuse(why: str) -> None:
    raise ValueError(f"ViT.from_timm cannot represent this timm model: {why}")


# the timm options behind a state dict that does not fit ("missing": in ViT only, "extra": in timm only)
_TIMM_KEY_HINTS = [
    (r"missing:cls_token", "no class token (class_token=False)"),
    (r"extra:reg_token", "register tokens (reg_tokens > 0)"),
    (r"missing:pos_embed", "no positional embedding (pos_embed='none')"),
    (r"shape:pos_embed", "positions for other tokens (no_embed_class=True, registers or no class token)"),
    (r"extra:norm_pre\..*|missing:patch_embed\.proj\.bias", "a norm before the blocks (pre_norm=True)"),
    (r"extra:patch_embed\.norm\..*", "a norm in the patch embedding (embed_norm_layer)"),
    (r"missing:norm\..*", "no final norm before pooling (final_norm=False or fc_norm)"),
    (r"extra:fc_norm\..*", "a norm after pooling (fc_norm=True, the default for global_pool='avg')"),
    (r"extra:attn_pool\..*", "attention pooling (global_pool='map')"),
    (r"extra:.*\.ls[12]\..*", "layer scale (init_values)"),
    (r"extra:.*\.[qk]_norm\..*", "qk_norm"),
    (r"extra:.*\.(attn|mlp)\.norm\..*", "a norm inside attention or MLP (scale_attn_norm, scale_mlp_norm)"),
    (r"missing:blocks\..*\.(proj|fc[12])\.bias", "projections without bias (proj_bias=False)"),
]


def _config_from_timm(m: nn.Module) -> dict:
    """Read the ViT arguments from a timm VisionTransformer; refuse only what the state dict and the
    output comparison of :meth:`ViT.from_timm` would not catch."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(m, VisionTransformer):
        raise TypeError(f"from_timm expects a timm VisionTransformer, got {type(m).__name__}")
    pe = m.patch_embed
    # the same outputs at the native size, but timm accepts other sizes (resampled positions, padding)
    if m.dynamic_img_size or getattr(pe, "dynamic_img_pad", False) or not getattr(pe, "strict_img_size", True):
        _refuse("dynamic_img_size=True or dynamic_img_pad=True; the image size must be fixed")
    try:
        (ph, pw), b0 = pe.patch_size, m.blocks[0]
        cfg = dict(
            image_size=tuple(pe.img_size), patch_size=ph, in_chans=pe.proj.in_channels, num_classes=m.num_classes,
            embed_dim=m.embed_dim, depth=len(m.blocks), num_heads=b0.attn.num_heads,
            mlp_ratio=b0.mlp.fc1.out_features / m.embed_dim, qkv_bias=b0.attn.qkv.bias is not None,
        )  # fmt: skip
    except (AttributeError, IndexError, TypeError, ValueError) as e:
        _refuse(f"its arguments cannot be read ({type(e).__name__}: {e})")
    if ph != pw:
        _refuse(f"non-square patches {pe.patch_size}")
    return cfg


def _compare_with_timm(model: ViT, m: nn.Module, shape: tuple, tol: float = 1e-4) -> None:
    """Refuse unless ``model`` and timm's ``m`` agree (eval mode, no grad) on a fixed random batch:
    max |difference| <= tol * max(1, max |timm output|) for tokens, pre-logits and logits."""
    # no parameter holds a LayerNorm's eps or the activation, and the outputs can differ by less than
    # tol: another eps with large activations (random weights), GELU's tanh form with small ones
    # (timm's init). So ViT's LayerNorms and GELUs are checked against timm's modules of the same name.
    probe, timm_modules = torch.linspace(-6, 6, 121), dict(m.named_modules())
    for name, mod in model.named_modules():
        theirs = timm_modules.get(name)
        if isinstance(mod, nn.LayerNorm) and getattr(theirs, "eps", None) != mod.eps:
            _refuse(f"{name} has eps={getattr(theirs, 'eps', None)}, ViT's has eps={mod.eps} (norm_layer)")
        gelu = isinstance(mod, nn.GELU)
        if gelu and (theirs is None or not torch.allclose(theirs(probe.clone()), mod(probe), rtol=0, atol=1e-6)):
            _refuse(f"{name} is {theirs!r}, not the exact GELU (act_layer)")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    p = next(m.parameters())
    modes = [(mod, mod.training) for mod in (*model.modules(), *m.modules())]
    model.eval()
    m.eval()
    try:
        with torch.no_grad():
            ours, theirs = model.forward_features(x), m.forward_features(x.to(p))
            outs = {
                "tokens (forward_features)": (ours, theirs),
                "pre-logits": (model.forward_head(ours, pre_logits=True), m.forward_head(theirs, pre_logits=True)),
                "logits": (model.forward_head(ours), m.forward_head(theirs)),
            }
    finally:
        for mod, training in modes:
            mod.training = training
    for name, (a, b) in outs.items():
        b = b.float().cpu()
        if a.shape != b.shape:
            _refuse(f"outputs differ in shape: {name} {tuple(b.shape)} in timm, {tuple(a.shape)} here")
        diff, scale = (a - b).abs().max().item(), b.abs().max().item()
        if not diff <= tol * max(1.0, scale):  # also refuses NaN
            _refuse(f"outputs differ by {diff:.3g} in {name} (tolerance {tol:g} x max(1, {scale:.3g}))")


# -- training ---------------------------------------------------------------------------------------


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warmup from 0 to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class ViTClassifier(L.LightningModule):
    """Image classification with a :class:`ViT`: cross-entropy with label smoothing, AdamW,
    linear warmup then cosine decay (per step). Arguments left ``None`` come from
    ``ViTConfig.preset()`` for the active profile. Batches are dicts with ``image`` and ``label``.
    ``max_epochs`` trains nothing here: it is stored in ``hparams`` for ``minivfm fit``, which uses
    it as the trainer's ``max_epochs`` when the config sets none.
    """

    def __init__(
        self,
        image_size: int | None = None,
        patch_size: int | None = None,
        in_chans: int | None = None,
        num_classes: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        stem: str | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        warmup_epochs: float | None = None,
        label_smoothing: float | None = None,
        shift: int | None = None,
        max_epochs: int | None = None,
        profile: str | None = None,
    ) -> None:
        super().__init__()
        # LightningCLI makes save_hyperparameters() record the arguments as given (None) and its
        # _instantiator; fill_from_preset stores the filled-in values over them, so that a checkpoint and
        # hparams.yaml do not depend on the profile and the CLI finds max_epochs
        self.save_hyperparameters()
        fill_from_preset(self, ViTConfig.preset(profile))
        hp = self.hparams
        self.model = ViT(
            hp.image_size, hp.patch_size, hp.in_chans, hp.num_classes, hp.embed_dim, hp.depth, hp.num_heads,
            hp.mlp_ratio, stem=hp.stem,
        )  # fmt: skip

    @classmethod
    def from_config(cls, cfg: ViTConfig, **overrides) -> ViTClassifier:
        """Build from a :class:`ViTConfig` (the fields that are constructor arguments)."""
        return cls(**{**preset_arguments(cfg, ViTClassifier), **overrides})

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)  # (B, K)

    def _step(self, batch: dict, stage: str) -> Tensor:
        images, labels = batch["image"], batch["label"]
        if stage == "train":
            images = random_shift(images, self.hparams.shift)
        logits = self(images)  # (B, K)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, batch_size=len(labels))
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_epochs, (0.9, 0.999))


def adamw_warmup_cosine(module: L.LightningModule, lr: float, weight_decay: float, warmup_epochs: float, betas: tuple):
    """AdamW with weight decay on weight matrices only (not on biases, norms, tokens or positions, nor
    on frozen parameters); linear warmup for ``warmup_epochs``, then cosine decay, stepped per batch."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or name.endswith(("cls_token", "pos_embed", "mask_token"))
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    epochs = module.trainer.max_epochs if module.trainer.max_epochs and module.trainer.max_epochs > 0 else 1
    warmup = min(total - 1, int(round(warmup_epochs * total / epochs)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# -- results ----------------------------------------------------------------------------------------


def _trainer(cfg: ViTConfig, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=cfg.max_epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def results_trainer(max_epochs: int, profile: str, **kwargs) -> L.Trainer:
    """A quiet Trainer for the ``results()`` of the models built on the ViT (MAE, DINO)."""
    return L.Trainer(
        max_epochs=max_epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        precision="bf16-mixed" if _profile(profile) == "gpu" else "32-true", **kwargs,
    )  # fmt: skip


def headless_kwargs(sizes, stem: str, **extra) -> dict:
    """The arguments of a :class:`ViT` without a head (an encoder or a backbone), from ``sizes``: a
    config or ``hparams`` with ``image_size``, ``patch_size``, ``in_channels``, ``embed_dim``, ``depth``,
    ``num_heads`` and ``mlp_ratio``; ``extra`` adds more arguments (``dynamic_img_size``)."""
    return dict(
        image_size=sizes.image_size, patch_size=sizes.patch_size, in_chans=sizes.in_channels, num_classes=0,
        embed_dim=sizes.embed_dim, depth=sizes.depth, num_heads=sizes.num_heads, mlp_ratio=sizes.mlp_ratio,
        stem=stem, **extra,
    )  # fmt: skip


@torch.no_grad()
def map_batches(vit: nn.Module, fn, images: Tensor, batch_size: int = 500) -> Tensor:
    """``fn(batch)`` over ``images`` in batches, ``vit`` in eval mode on its device; the results
    concatenated on the CPU (frozen features, predictions, attention)."""
    vit.eval()
    device = next(vit.parameters()).device
    return torch.cat([fn(x.to(device)).cpu() for x in images.split(batch_size)])


def datamodule(cfg: ViTConfig, seed: int = 0) -> L.LightningDataModule:
    """The Shapes or Digits DataModule (``cfg.data``) sized for ``cfg``."""
    from minivfm.data import DigitsDataModule, ShapesDataModule

    if cfg.data == "shapes":
        return ShapesDataModule(
            batch_size=cfg.batch_size, image_size=cfg.image_size, seed=seed,
            num_train=cfg.num_train, num_val=cfg.num_val, num_test=cfg.num_test,
        )  # fmt: skip
    if cfg.data == "digits":
        return DigitsDataModule(batch_size=cfg.batch_size, image_size=cfg.image_size, seed=seed)
    raise ValueError(f"cfg.data must be 'shapes' or 'digits', got {cfg.data!r}")


def train(cfg: ViTConfig, seed: int = 0, **trainer_kwargs) -> tuple[ViTClassifier, dict[str, float]]:
    """Train a ViT with ``lightning.Trainer`` on ``cfg.data``; returns the model and its test metrics."""
    L.seed_everything(seed, verbose=False)
    dm = datamodule(cfg, seed)
    cfg = replace(cfg, image_size=dm.image_size, in_chans=dm.in_channels, num_classes=dm.num_classes)
    model = ViTClassifier.from_config(cfg)
    trainer = _trainer(cfg, **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    return model, {k: float(v) for k, v in metrics.items()}


def results(profile: str) -> dict:
    """Test accuracy of the ViT on Shapes and on Digits under ``profile``, the seconds it took, and
    ``baselines`` (chance)."""
    threads = torch.get_num_threads()
    if _profile(profile) == "ci":
        torch.set_num_threads(1)  # tiny models: one thread beats two threads fighting over small ops
    try:
        start = time.perf_counter()
        _, shapes = train(ViTConfig.preset(profile, "shapes"))
        _, digits = train(ViTConfig.preset(profile, "digits"))
    finally:
        torch.set_num_threads(threads)
    return {
        "shapes_acc": shapes["test/acc"], "digits_acc": digits["test/acc"], "seconds": time.perf_counter() - start,
        "baselines": {"shapes_acc": 1 / 12, "digits_acc": 1 / 10},  # chance
    }  # fmt: skip
