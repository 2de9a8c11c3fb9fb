"""DDPM: denoising diffusion, ancestral and DDIM sampling, classifier-free guidance.

Papers and equations used below:
    Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM):
        eq. 4 q(x_t | x_0), eq. 6-7 the posterior q(x_{t-1} | x_t, x_0), eq. 14 the simple loss,
        eq. 15 x_0 from epsilon, Algorithms 1 (training) and 2 (sampling).
    Nichol & Dhariwal 2021, "Improved DDPM" (eq. 17: the cosine schedule, betas capped at 0.999).
    Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM): eq. 12 the update, eq. 16 sigma(eta).
    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance" (eq. 6: the guided epsilon).
    Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (diffuse VAE latents).
Reference implementation: huggingface/diffusers ``DDPMScheduler`` and ``DDIMScheduler``; the
:class:`NoiseSchedule` below agrees with them numerically (see ``tests/test_ddpm.py``).

Notation: ``alphas_cumprod[t]`` is alpha-bar_t = prod_{s<=t} (1 - beta_s); timesteps are 0-based
(``t = 0`` is the first noising step), as in diffusers.

Shape glossary: B batch, C channels, H, W image size, D embedding width, K number of classes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivfm.nn import timestep_embedding

__all__ = [
    "SCHEDULES",
    "NoiseSchedule",
    "make_betas",
    "q_sample",
    "predict_x0",
    "posterior_mean_x0",
    "ddim_update",
    "cfg_mix",
    "UNet",
    "ddpm_loss",
    "DDPMConfig",
    "DDPM",
    "sample_ancestral",
    "sample_ddim",
    "results",
]

SCHEDULES = ("linear", "cosine")

# --------------------------------------------------------------------------------------------------
# 1. The noise schedule (no network inside)
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be an int (a single timestep), got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def make_betas(num_steps: int, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The betas of a schedule, float32 ``(num_steps,)``, computed as diffusers computes them.

    ``"linear"``: Ho et al. 2020 sec. 4, betas from ``beta_start`` to ``beta_end`` (float32 linspace).
    ``"cosine"``: Nichol & Dhariwal 2021 eq. 17, alpha-bar(t) = cos^2((t/T + s)/(1 + s) * pi/2) with
    s = 0.008, beta_t = 1 - alpha-bar(t+1)/alpha-bar(t) capped at 0.999 (computed in float64, stored float32;
    diffusers' ``"squaredcos_cap_v2"``).
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` reshaped to ``(B, 1, 1, ...)`` to broadcast against ``like``."""
    out = values.to(device=like.device, dtype=like.dtype)[t.to(like.device)].flatten()  # (B,)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward noising, DDPM eq. 4: x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps.

    Arguments:
        x0: clean data ``(B, ...)``.
        t: timesteps ``(B,)`` (long), each in ``[0, T)``.
        noise: eps ``(B, ...)``, like ``x0``.
        alphas_cumprod: alpha-bar ``(T,)``.

    Returns:
        x_t, like ``x0``.
    """
    abar = _gather(alphas_cumprod, t, x0)  # (B, 1, 1, 1)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def predict_x0(eps: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """DDPM eq. 15 (and DDIM eq. 12's "predicted x_0"): x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5


def posterior_mean_x0(x0: Tensor, x_t: Tensor, t: int, alphas_cumprod: Tensor) -> Tensor:
    """Mean of the posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7 (x0 form)::

        mu = sqrt(alpha-bar_{t-1}) beta_t / (1 - alpha-bar_t) * x_0
           + sqrt(alpha_t) (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) * x_t

    with alpha_t = alpha-bar_t / alpha-bar_{t-1}, beta_t = 1 - alpha_t and alpha-bar_{-1} = 1.

    Arguments:
        x0: (predicted) clean data ``(B, ...)``.
        x_t: the current sample, like ``x0``.
        t: the current timestep, an int in ``[0, T)``.
        alphas_cumprod: alpha-bar ``(T,)``.
    """
    abar_t = alphas_cumprod[t]
    abar_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones((), dtype=alphas_cumprod.dtype)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    coef_x0 = abar_prev**0.5 * beta_t / (1 - abar_t)
    coef_xt = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
    return coef_x0.to(x0) * x0 + coef_xt.to(x_t) * x_t


def ddim_update(
    eps: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM step from t to t_prev, Song et al. eq. 12::

        x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps + sigma * noise,
        x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t),
        sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)      (eq. 16)

    where a = alpha-bar, and ``t_prev < 0`` means the final step to x_0 (a_prev = 1).
    ``eta = 0`` is deterministic (DDIM); ``eta = 1`` is DDPM-like.
    """
    one = torch.ones((), dtype=alphas_cumprod.dtype)
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else one
    x0 = predict_x0(eps, x_t, a_t.to(x_t))
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    out = a_prev.to(x_t) ** 0.5 * x0 + ((1 - a_prev - sigma**2) ** 0.5).to(x_t) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("noise is required when eta > 0 (pass torch.randn_like(x_t))")
        out = out + sigma.to(x_t) * noise
    return out


def cfg_mix(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, Ho & Salimans eq. 6 (with w = scale - 1):
    eps = eps_uncond + scale * (eps_cond - eps_uncond). ``scale = 1`` is the conditional model,
    ``scale = 0`` the unconditional one, larger values push towards the class."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


class NoiseSchedule:
    """The diffusion noise schedule and its update rules; a plain numeric object (no network).

    Agrees with diffusers' ``DDPMScheduler`` (``beta_schedule="linear"`` or ``"squaredcos_cap_v2"``,
    epsilon prediction, ``variance_type="fixed_small"``, ``clip_sample=False``) and ``DDIMScheduler``
    (``set_alpha_to_one=True``, ``clip_sample=False``).

    Arguments:
        num_steps: T, the number of diffusion steps.
        schedule: ``"linear"`` (DDPM) or ``"cosine"`` (Improved DDPM).
        beta_start, beta_end: the linear schedule's end points (ignored by ``"cosine"``).

    Attributes:
        betas, alphas, alphas_cumprod: float32 ``(T,)``.
    """

    def __init__(
        self, num_steps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        self.num_steps = num_steps
        self.schedule = schedule
        self.betas = make_betas(num_steps, schedule, beta_start, beta_end)  # (T,)
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_steps={self.num_steps}, schedule={self.schedule!r})"

    # -- argument checks ---------------------------------------------------------------------------
    def _check_t(self, name: str, t) -> int:
        return _check_int(name, t, 0, self.num_steps - 1)

    @staticmethod
    def _check_like(name: str, value, ref: Tensor, ref_name: str) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}")

    # -- forward process -----------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0), DDPM eq. 4. ``t`` is a ``(B,)`` tensor of timesteps (``B = x0.shape[0]``)."""
        self._check_like("noise", noise, x0, "x0")
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] != x0.shape[0]:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t must be a (B,) = ({x0.shape[0]},) tensor of timesteps, got {got}")
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_steps):
            raise ValueError(f"t must be in [0, {self.num_steps - 1}], got values in [{t.min()}, {t.max()}]")
        return q_sample(x0, t, noise, self.alphas_cumprod)

    # -- reverse process -----------------------------------------------------------------------------
    def predict_x0(self, eps: Tensor, t: int, x_t: Tensor) -> Tensor:
        """x_0 predicted from epsilon, DDPM eq. 15."""
        t = self._check_t("t", t)
        return predict_x0(eps, x_t, self.alphas_cumprod[t].to(x_t))

    def posterior_variance(self, t: int) -> Tensor:
        """beta-tilde_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) beta_t (DDPM eq. 7; "fixed_small")."""
        t = self._check_t("t", t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t - 1] if t > 0 else torch.ones(())
        return torch.clamp((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), min=1e-20)

    def step(self, eps: Tensor, t: int, x_t: Tensor, noise: Tensor | None = None) -> Tensor:
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2), written in x0 form.

        Predict x_0 (eq. 15), take the posterior mean (eq. 7), add sigma_t * noise with
        sigma_t^2 = beta-tilde_t (``fixed_small``). No clipping. At ``t = 0`` no noise is added.

        Arguments:
            eps: the model's noise prediction, like ``x_t``.
            t: the current timestep, an int in ``[0, T)``.
            x_t: the current sample ``(B, ...)``.
            noise: standard normal noise like ``x_t``; zeros (or ``None``) give the posterior mean.
        """
        t = self._check_t("t", t)
        self._check_like("eps", eps, x_t, "x_t")
        x0 = predict_x0(eps, x_t, self.alphas_cumprod[t].to(x_t))
        mean = posterior_mean_x0(x0, x_t, t, self.alphas_cumprod)
        if noise is None or t == 0:
            return mean
        self._check_like("noise", noise, x_t, "x_t")
        return mean + (self.posterior_variance(t) ** 0.5).to(x_t) * noise

    def ddim_step(
        self, eps: Tensor, t: int, t_prev: int, x_t: Tensor, eta: float = 0.0, noise: Tensor | None = None
    ) -> Tensor:
        """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12); ``t_prev < 0`` goes to x_0 (alpha-bar 1).

        ``eta > 0`` adds sigma(eta) * ``noise`` (eq. 16); ``noise`` is then required.
        """
        t = self._check_t("t", t)
        t_prev = _check_int("t_prev", t_prev)
        if t_prev >= t:
            raise ValueError(f"t_prev must be smaller than t={t} (negative for the last step), got {t_prev}")
        if not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a float >= 0, got {eta!r}")
        self._check_like("eps", eps, x_t, "x_t")
        if noise is not None:
            self._check_like("noise", noise, x_t, "x_t")
        return ddim_update(eps, x_t, t, t_prev, self.alphas_cumprod, eta=float(eta), noise=noise)

    def ddim_timesteps(self, num_inference_steps: int) -> list[int]:
        """Evenly spaced timesteps, high to low, as diffusers' "leading" spacing: ``[.., 2k, k, 0]``."""
        n = _check_int("num_inference_steps", num_inference_steps, 1, self.num_steps)
        ratio = self.num_steps // n
        return [i * ratio for i in reversed(range(n))]


# --------------------------------------------------------------------------------------------------
# 2. The denoiser: a small conditional U-Net (Ho et al. 2020 appendix B, much smaller)
# --------------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning vector as a per-channel scale and shift
    (FiLM, as in Improved DDPM's "adaptive group norm"), and a residual connection."""

    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, cout, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the pixels of a feature map (``minivfm.nn.Attention``), pre-norm, residual."""

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        from minivfm.nn import Attention

        self.norm = _norm(channels)
        self.attn = Attention(channels, num_heads=num_heads)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class UNet(nn.Module):
    """A small U-Net that predicts the noise eps(x_t, t, y), conditioned on the timestep and the class.

    The input is first folded into ``patch x patch`` blocks (``pixel_unshuffle``: lossless, it trades
    resolution for channels, which makes a 32x32 model 4x cheaper on CPU) and unfolded at the end.
    Each level has one residual block on the way down and one on the way up (with the skip
    connection); attention at the levels flagged in ``attention`` and in the middle.

    Arguments:
        in_channels: image (or latent) channels C.
        image_size: H = W.
        channels: widths of the levels; each level after the first halves the resolution.
        num_classes: K real classes; label ``K`` is the null class (classifier-free guidance).
            ``0`` makes an unconditional model.
        patch: the fold factor (1 = none).
        attention: one flag per level.
        emb_dim: width of the timestep + class embedding.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        channels: tuple[int, ...] = (64, 96, 128),
        num_classes: int = 12,
        patch: int = 2,
        attention: tuple[bool, ...] | None = None,
        emb_dim: int = 128,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        attention = tuple(attention) if attention is not None else (False,) * (len(channels) - 1) + (True,)
        if len(attention) != len(channels):
            raise ValueError(f"attention needs one flag per level ({len(channels)}), got {len(attention)}")
        if image_size % (patch * 2 ** (len(channels) - 1)):
            raise ValueError(
                f"image_size ({image_size}) must be divisible by patch * 2**(levels - 1) = "
                f"{patch * 2 ** (len(channels) - 1)}"
            )
        self.in_channels, self.image_size, self.patch = in_channels, image_size, patch
        self.num_classes = num_classes
        self.time_embed = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.stem = nn.Conv2d(in_channels * patch * patch, channels[0], 3, padding=1)
        self.down, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.down.append(ResBlock(prev, ch, emb_dim))
            self.down_attn.append(AttnBlock(ch) if attention[i] else nn.Identity())
            last = i == len(channels) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            prev = ch
        self.mid = ResBlock(prev, prev, emb_dim)
        self.up, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels))):
            ch = channels[i]
            self.up.append(ResBlock(prev + ch, ch, emb_dim))
            self.up_attn.append(AttnBlock(ch) if attention[i] else nn.Identity())
            nxt = channels[i - 1] if i > 0 else ch
            self.upsample.append(
                nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, nxt, 3, padding=1))
                if i > 0
                else nn.Identity()
            )
            prev = nxt
        self.out_norm = _norm(prev)
        self.out = nn.Conv2d(prev, in_channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, t: Tensor, y: Tensor | None) -> Tensor:
        """Timestep (and class) embedding ``(B, emb_dim)``; ``y = None`` or ``y = K`` is the null class."""
        emb = self.time_embed(timestep_embedding(t, self.stem.out_channels))  # (B, E)
        if self.class_embed is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.class_embed(y)
        return emb

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """
        Arguments:
            x: noisy images ``(B, C, H, W)``.
            t: timesteps ``(B,)``.
            y: class labels ``(B,)`` in ``[0, K]`` (``K`` = null); ``None`` = unconditional.

        Returns:
            predicted noise ``(B, C, H, W)``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(
                f"x must be (B, {self.in_channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"t must be a ({x.shape[0]},) tensor of timesteps")
        if y is not None and (y.shape != (x.shape[0],) or y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"y must be a ({x.shape[0]},) tensor of labels in [0, {self.num_classes}]")
        emb = self.embed(t, y)  # (B, E)
        h = self.stem(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)  # (B, c0, H/p, W/p)
        skips = []
        for block, attn, down in zip(self.down, self.down_attn, self.downsample):
            h = attn(block(h, emb))
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block, attn, up in zip(self.up, self.up_attn, self.upsample):
            h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            h = up(h)
        h = self.out(F.silu(self.out_norm(h)))  # (B, C p^2, H/p, W/p)
        return F.pixel_shuffle(h, self.patch) if self.patch > 1 else h
