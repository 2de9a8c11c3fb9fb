"""DDPM: denoising diffusion, ancestral and DDIM sampling, classifier-free guidance.

Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): eq. 4 q(x_t | x_0), eq. 7
the posterior q(x_{t-1} | x_t, x_0), eq. 14 the simple loss, eq. 15 x_0 from eps, Algorithms 1 and 2.
Nichol & Dhariwal 2021, "Improved DDPM" (eq. 17: the cosine schedule); Song et al. 2021, "DDIM" (eq. 12,
16); Ho & Salimans 2022, "Classifier-Free Diffusion Guidance" (eq. 6); Rombach et al. 2022 (latent
diffusion); Hang et al. 2023 (Min-SNR weighting); Esser et al. 2024 (SD3, sec. 3.1: logit-normal t).
Reference: huggingface/diffusers ``DDPMScheduler``, ``DDIMScheduler`` (``tests/test_ddpm.py`` compares).
``alphas_cumprod[t]`` is alpha-bar_t = prod_{s<=t} (1 - beta_s), t 0-based as in diffusers. Shapes: B batch,
C channels, H, W size, D width, K classes.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivfm.data._common import check_choice
from minivfm.nn import Attention, timestep_embedding
from minivfm.profiles import fill_from_preset
from minivfm.profiles import profile as _profile

__all__ = [
    "SCHEDULES", "T_SAMPLING", "NoiseSchedule", "make_betas", "q_sample", "predict_x0", "posterior_mean_x0",
    "ddim_update", "dynamic_threshold", "cfg_mix", "UNet", "ddpm_loss", "min_snr_weight", "sample_timesteps",
    "drop_labels", "guidance_at", "sample_ancestral", "sample_ddim", "update_ema", "DDPMConfig", "LitDDPM",
    "fit", "results", "results_pixel", "results_latent",
]  # fmt: skip

SCHEDULES = ("linear", "cosine")
T_SAMPLING = ("uniform", "split")


# -- 1. The noise schedule (no network inside) ------------------------------------------------------
def _check(name: str, value, low: float, high: float = math.inf, *, integer=False, open_low=False, none_ok=False):
    """``value`` if it is a number (an int if ``integer``) in ``[low, high]`` (``(low, high]`` if
    ``open_low``), or ``None`` if ``none_ok``; otherwise a ValueError naming ``name``."""
    if value is None and none_ok:
        return None
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not (ok and (low < value if open_low else low <= value) and value <= high):
        what = f"{'an int' if integer else 'a number'} in {'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name} must be {what}{' or None' if none_ok else ''}, got {value!r}")
    return value


def make_betas(num_steps: int, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The betas, float32 ``(num_steps,)``, as diffusers computes them. ``"linear"``: Ho et al. sec. 4.
    ``"cosine"``: Nichol & Dhariwal eq. 17, alpha-bar(t) = cos^2((t/T + s)/(1 + s) * pi/2) with s = 0.008,
    beta_t = 1 - alpha-bar(t+1)/alpha-bar(t) capped at 0.999 (diffusers' ``"squaredcos_cap_v2"``)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
    abar = [math.cos((i / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(num_steps + 1)]
    betas = [min(1 - abar[i + 1] / abar[i], 0.999) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward noising, DDPM eq. 4: x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, for clean data
    ``x0`` ``(B, ...)``, timesteps ``t`` ``(B,)`` (long), eps ``noise`` like ``x0`` and alpha-bar ``(T,)``."""
    abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)].reshape(-1, *[1] * (x0.ndim - 1))
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def predict_x0(eps: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """DDPM eq. 15 (DDIM eq. 12's "predicted x_0"): x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5


def posterior_mean_x0(x0: Tensor, x_t: Tensor, t: int, alphas_cumprod: Tensor) -> Tensor:
    """Mean of the posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7 (x0 form), ``t`` an int in ``[0, T)``:
    mu = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    with abar = alpha-bar, alpha_t = abar_t / abar_{t-1}, beta_t = 1 - alpha_t and abar_{-1} = 1."""
    abar_t = alphas_cumprod[t]
    abar_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones((), dtype=alphas_cumprod.dtype)
    alpha_t = abar_t / abar_prev
    coef_x0 = abar_prev**0.5 * (1 - alpha_t) / (1 - abar_t)  # beta_t = 1 - alpha_t
    coef_xt = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
    return coef_x0.to(x0) * x0 + coef_xt.to(x_t) * x_t


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float | None = None) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3; diffusers' ``thresholding=True``): per sample,
    s is the ``ratio`` quantile of |x_0| (in [1, ``max_value``]); x_0 is clamped to [-s, s] and divided by s."""
    _check("ratio", ratio, 0, 1, open_low=True)
    flat = x0.reshape(x0.shape[0], -1).float()  # (B, CHW); quantile needs float32 or float64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]  # (B, 1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


def _limit_x0(x0: Tensor, clip_sample: float | None, threshold: float | None) -> Tensor:
    """x_0 dynamically thresholded at ``threshold``, else clipped to ``clip_sample`` (``None``: neither)."""
    if _check("threshold", threshold, 0, 1, open_low=True, none_ok=True) is not None:
        return dynamic_threshold(x0, threshold)
    return x0 if clip_sample is None else x0.clamp(-clip_sample, clip_sample)


def ddim_update(
    eps: Tensor, x_t: Tensor, t: int, t_prev: int, alphas_cumprod: Tensor, eta: float = 0.0,
    noise: Tensor | None = None, clip_sample: float | None = None, threshold: float | None = None,
    use_clipped_model_output: bool = False,
) -> Tensor:  # fmt: skip
    """One DDIM step from t to t_prev, Song et al. eq. 12 (a = alpha-bar, x0_pred from eq. 15)::

        x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps + sigma * noise,
        sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)      (eq. 16)
    ``t_prev < 0`` is the final step to x_0 (a_prev = 1); ``eta = 0`` is deterministic. ``clip_sample`` /
    ``threshold`` limit x0_pred (:func:`_limit_x0`); ``use_clipped_model_output`` re-derives eps from it."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones((), dtype=alphas_cumprod.dtype)
    x0 = _limit_x0(predict_x0(eps, x_t, a_t.to(x_t)), clip_sample, threshold)
    if use_clipped_model_output:
        eps = (x_t - a_t.to(x_t) ** 0.5 * x0) / (1 - a_t.to(x_t)) ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    out = a_prev.to(x_t) ** 0.5 * x0 + ((1 - a_prev - sigma**2) ** 0.5).to(x_t) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("noise is required when eta > 0 (pass torch.randn_like(x_t))")
        out = out + sigma.to(x_t) * noise
    return out


def cfg_mix(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, Ho & Salimans eq. 6 (w = scale - 1): eps_uncond + scale * (eps_cond - eps_uncond).
    ``scale = 1`` is the conditional model, ``0`` the unconditional one, larger pushes towards the class."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _check_like(ref_name: str, ref: Tensor, **tensors) -> None:
    for name, value in tensors.items():
        if not isinstance(value, Tensor) or value.shape != ref.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of the shape of {ref_name} {tuple(ref.shape)}, got {got}")


class NoiseSchedule:
    """The noise schedule of ``num_steps`` T steps, ``"linear"`` (DDPM) or ``"cosine"`` (Improved DDPM), and
    its update rules, as diffusers' ``DDPMScheduler`` (eps prediction, ``"fixed_small"``) and ``DDIMScheduler``
    (``set_alpha_to_one``); no network inside. ``betas``, ``alphas``, ``alphas_cumprod``: float32 ``(T,)``."""

    def __init__(self, num_steps: int = 1000, schedule: str = "linear") -> None:
        self.num_steps = _check("num_steps", num_steps, 2, integer=True)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.betas = make_betas(num_steps, schedule)  # (T,)
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0), DDPM eq. 4. ``t`` is a ``(B,)`` integer tensor of timesteps."""
        _check_like("x0", x0, noise=noise)
        ok = isinstance(t, Tensor) and t.shape == (x0.shape[0],) and not (t.is_floating_point() or t.is_complex())
        if not ok or (t.numel() and (t.min() < 0 or t.max() >= self.num_steps)):
            got = f"{t.dtype} {tuple(t.shape)} in [{t.min()}, {t.max()}]" if isinstance(t, Tensor) else repr(t)
            raise ValueError(f"t must be a ({x0.shape[0]},) integer tensor in [0, {self.num_steps - 1}], got {got}")
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def predict_x0(self, eps: Tensor, t: int, x_t: Tensor) -> Tensor:
        """x_0 predicted from epsilon, DDPM eq. 15."""
        return predict_x0(eps, x_t, self.alphas_cumprod[_check("t", t, 0, self.num_steps - 1, integer=True)].to(x_t))

    def posterior_variance(self, t: int) -> Tensor:
        """beta-tilde_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) beta_t (DDPM eq. 7; "fixed_small")."""
        t = _check("t", t, 0, self.num_steps - 1, integer=True)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t - 1] if t > 0 else torch.ones(())
        return torch.clamp((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), min=1e-20)

    def step(
        self, eps: Tensor, t: int, x_t: Tensor, noise: Tensor | None = None, *,
        clip_sample: float | None = None, threshold: float | None = None,
    ) -> Tensor:  # fmt: skip
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2) in x0 form: x_0 from eps (eq. 15), limited
        (:func:`_limit_x0`), the posterior mean (eq. 7), plus sigma_t ``noise`` (sigma_t^2 = beta-tilde_t)
        unless ``noise`` is ``None`` or ``t = 0``. ``clip_sample=1`` is diffusers' ``clip_sample=True``."""
        t = _check("t", t, 0, self.num_steps - 1, integer=True)
        _check_like("x_t", x_t, eps=eps, **({} if noise is None else {"noise": noise}))
        _check("clip_sample", clip_sample, 0, open_low=True, none_ok=True)
        x0 = _limit_x0(predict_x0(eps, x_t, self.alphas_cumprod[t].to(x_t)), clip_sample, threshold)
        mean = posterior_mean_x0(x0, x_t, t, self.alphas_cumprod)
        if noise is None or t == 0:
            return mean
        return mean + (self.posterior_variance(t) ** 0.5).to(x_t) * noise

    def ddim_step(
        self, eps: Tensor, t: int, t_prev: int, x_t: Tensor, eta: float = 0.0, noise: Tensor | None = None, *,
        clip_sample: float | None = None, threshold: float | None = None, use_clipped_model_output: bool = False,
    ) -> Tensor:  # fmt: skip
        """One DDIM step x_t -> x_{t_prev} (:func:`ddim_update`); ``t_prev < 0`` goes to x_0. ``eta > 0`` adds
        sigma(eta) * ``noise`` (eq. 16), which is then required; ``clip_sample``, ``threshold`` as in :meth:`step`."""
        t = _check("t", t, 0, self.num_steps - 1, integer=True)
        if (t_prev := _check("t_prev", t_prev, -math.inf, integer=True)) >= t:
            raise ValueError(f"t_prev must be smaller than t={t} (negative for the last step), got {t_prev}")
        _check_like("x_t", x_t, eps=eps, **({} if noise is None else {"noise": noise}))
        _check("clip_sample", clip_sample, 0, open_low=True, none_ok=True)
        return ddim_update(eps, x_t, t, t_prev, self.alphas_cumprod, float(_check("eta", eta, 0)), noise,
                           clip_sample, threshold, use_clipped_model_output)  # fmt: skip

    def ddim_timesteps(self, num_inference_steps: int) -> list[int]:
        """Evenly spaced timesteps, high to low, as diffusers' "leading" spacing: ``[.., 2k, k, 0]``."""
        n = _check("num_inference_steps", num_inference_steps, 1, self.num_steps, integer=True)
        return [i * (self.num_steps // n) for i in reversed(range(n))]


# -- 2. The denoiser: a small conditional U-Net (Ho et al. 2020 appendix B, much smaller) -----------
class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the conditioning vector as a per-channel scale and shift after the
    second GroupNorm (AdaGN, Dhariwal & Nichol 2021), and a residual connection."""

    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, cout, 1, 1)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))


class AttnBlock(nn.Module):
    """Self-attention over the pixels of a feature map (``minivfm.nn.Attention``), pre-norm, residual."""

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.attn = Attention(channels, num_heads=num_heads)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        return x + self.attn(h).transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """A small U-Net that predicts the noise eps(x_t, t, y), conditioned on the timestep and the class.
    The input is folded into ``patch x patch`` blocks (``pixel_unshuffle``: lossless, 4x cheaper at 2) and
    unfolded at the end. Each level of ``channels`` (each at half the resolution of the one before) has a
    residual block down and one up; attention where ``attention`` flags it (default: the last level).
    Label ``num_classes`` K is the null class (0 classes: unconditional). With ``alphas_cumprod`` the body
    predicts v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022) and ``forward`` returns the equivalent
    eps = sqrt(1 - a) x_t + sqrt(a) v: the near-identity answer at high noise is built in."""

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, channels: tuple[int, ...] = (64, 96, 128),
        num_classes: int = 12, patch: int = 2, attention: tuple[bool, ...] | None = None, emb_dim: int = 128,
        alphas_cumprod: Tensor | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        channels = tuple(channels)
        attention = tuple(attention) if attention is not None else (False,) * (len(channels) - 1) + (True,)
        if len(attention) != len(channels):
            raise ValueError(f"attention needs one flag per level ({len(channels)}), got {len(attention)}")
        if image_size % (patch * 2 ** (len(channels) - 1)):
            raise ValueError(f"image_size ({image_size}) must be divisible by patch * 2**(levels - 1)")
        self.in_channels, self.image_size, self.patch, self.num_classes = in_channels, image_size, patch, num_classes
        self.time_embed = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.stem = nn.Conv2d(in_channels * patch * patch, channels[0], 3, padding=1)
        self.down, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.down.append(ResBlock(prev, ch, emb_dim))
            self.down_attn.append(AttnBlock(ch) if attention[i] else nn.Identity())
            last = i == len(channels) - 1  # no downsampling after the last level
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            prev = ch
        self.mid = ResBlock(prev, prev, emb_dim)
        self.up, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, ch in reversed(list(enumerate(channels))):
            self.up.append(ResBlock(prev + ch, ch, emb_dim))
            self.up_attn.append(AttnBlock(ch) if attention[i] else nn.Identity())
            prev, up = channels[i - 1] if i > 0 else ch, nn.Upsample(scale_factor=2, mode="nearest")
            self.upsample.append(nn.Sequential(up, nn.Conv2d(ch, prev, 3, padding=1)) if i > 0 else nn.Identity())
        self.out_norm = nn.GroupNorm(min(8, prev), prev)
        self.out = nn.Conv2d(prev, in_channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.v_param = alphas_cumprod is not None
        if self.v_param:
            self.register_buffer("alphas_cumprod", alphas_cumprod.detach().clone().float(), persistent=False)
        self.to(memory_format=torch.channels_last)  # NHWC: oneDNN's preferred layout on CPU (about 10% faster)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Noisy images ``(B, C, H, W)``, timesteps ``(B,)``, labels ``(B,)`` in ``[0, K]`` (``K`` or
        ``None``: unconditional) -> predicted noise ``(B, C, H, W)``."""
        B, C, S = x.shape[0], self.in_channels, self.image_size
        if x.ndim != 4 or x.shape[1] != C or x.shape[-1] != S:
            raise ValueError(f"x must be (B, {C}, {S}, {S}), got {tuple(x.shape)}")
        if not isinstance(t, Tensor) or t.shape != (B,):
            raise ValueError(f"t must be a ({B},) tensor of timesteps")
        if y is not None and (y.shape != (B,) or y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"y must be a ({B},) tensor of labels in [0, {self.num_classes}]")
        emb = self.time_embed(timestep_embedding(t, self.stem.out_channels))  # (B, E)
        if self.class_embed is not None:  # y = None: the null class K
            emb = emb + self.class_embed(torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y)
        h = self.stem(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)  # (B, c0, H/p, W/p)
        skips = []
        for block, attn, down in zip(self.down, self.down_attn, self.downsample):
            h = attn(block(h, emb))
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block, attn, up in zip(self.up, self.up_attn, self.upsample):
            h = up(attn(block(torch.cat([h, skips.pop()], dim=1), emb)))
        h = self.out(F.silu(self.out_norm(h)))  # (B, C p^2, H/p, W/p)
        out = F.pixel_shuffle(h, self.patch) if self.patch > 1 else h  # (B, C, H, W)
        if self.v_param:  # out is v: eps = sqrt(1 - a) x_t + sqrt(a) v
            abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            out = (1 - abar).sqrt() * x + abar.sqrt() * out
        return out


# -- 3. The loss and the samplers -------------------------------------------------------------------
def drop_labels(y: Tensor, p_uncond: float, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class ``num_classes`` with probability ``p_uncond`` (condition
    dropout: one network learns eps(x, y) and eps(x), Ho & Salimans Algorithm 1)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, num_classes), y)


def ddpm_loss(eps_pred: Tensor, eps: Tensor, weight: Tensor | None = None) -> Tensor:
    """The simple loss, DDPM eq. 14: || eps - eps_theta(x_t, t) ||^2, averaged over all elements;
    ``weight`` ``(B,)`` (e.g. :func:`min_snr_weight`) multiplies each sample's mean squared error."""
    if weight is None:
        return F.mse_loss(eps_pred, eps)
    if weight.shape != (eps.shape[0],):
        raise ValueError(f"weight must have shape ({eps.shape[0]},), got {tuple(weight.shape)}")
    per_sample = (eps_pred - eps).pow(2).flatten(1).mean(1)  # (B,)
    return (weight.to(per_sample) * per_sample).mean()


def min_snr_weight(alphas_cumprod: Tensor, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma weights ``(B,)`` in (0, 1] (Hang et al. 2023, eq. 9): w_t = min(SNR_t, gamma) / SNR_t, SNR_t =
    alpha-bar_t / (1 - alpha-bar_t); the noisy steps, where layout and shape are decided, get their share."""
    gamma = float(_check("gamma", gamma, 0, open_low=True))
    abar = alphas_cumprod.to(t.device)[t].float()
    snr = abar / (1 - abar)
    return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 where SNR = 0


def sample_timesteps(
    batch_size: int, num_steps: int, method: str = "uniform", generator: torch.Generator | None = None,
    split_t: int = 300, low_fraction: float = 0.5,
) -> Tensor:  # fmt: skip
    """Training timesteps ``(B,)`` in ``[0, num_steps)``: ``"uniform"`` (DDPM Algorithm 1) or ``"split"``: a
    fraction ``low_fraction`` uniform in ``[0, split_t)`` (fine geometry), then the rest logit-normal (SD3
    sec. 3.1) truncated to ``[split_t, num_steps)`` (layout and class)."""
    if check_choice("t_sampling", method, T_SAMPLING) == "uniform":
        return torch.randint(0, num_steps, (batch_size,), generator=generator)
    split_t = _check("split_t", split_t, 1, num_steps - 1, integer=True)
    n_low = round(_check("low_fraction", low_fraction, 0, 1) * batch_size)
    low = torch.randint(0, split_t, (n_low,), generator=generator)
    # n ~ N(0, 1) conditioned on sigmoid(n) >= split_t / T, drawn by the inverse CDF (no rejection loop)
    p_min = torch.special.ndtr(torch.logit(torch.tensor(split_t / num_steps, dtype=torch.float64)))
    u = p_min + (1 - p_min) * torch.rand(batch_size - n_low, generator=generator, dtype=torch.float64)
    high = (torch.sigmoid(torch.special.ndtri(u)) * num_steps).long().clamp(split_t, num_steps - 1)
    return torch.cat([low, high])


def guidance_at(t: int, scale: float, interval: tuple[int, int] | None = None) -> float:
    """The guidance scale at timestep ``t``: ``scale`` inside ``interval = (lo, hi)`` (``lo <= t < hi``;
    ``None``: every step), 1 (the conditional model alone, one forward pass) outside it. Guidance at the
    highest noise mostly pulls a class's samples to one layout (Kynkaanniemi et al. 2024)."""
    lo, hi = interval if interval is not None else (-math.inf, math.inf)
    return scale if lo <= t < hi else 1.0


def _check_interval(interval, num_steps: int) -> tuple[int, int] | None:
    """``None`` or ``(lo, hi)``: ints with ``0 <= lo < hi <= num_steps``."""
    if interval is not None:
        ok = isinstance(interval, (tuple, list)) and len(interval) == 2 and all(type(v) is int for v in interval)
        if not (ok and 0 <= interval[0] < interval[1] <= num_steps):
            raise ValueError(f"guidance_interval must be None or ints 0 <= lo < hi <= {num_steps}, got {interval}")
        interval = tuple(interval)
    return interval


def _guided_eps(model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None, scale: float) -> Tensor:
    """eps for one sampling step: conditional, unconditional, or guided (one batched forward)."""
    if y is None or scale == 1.0:
        return model(x, t, y)
    null = torch.full_like(y, model.num_classes)
    eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    return cfg_mix(eps_cond, eps_uncond, scale)


@torch.no_grad()
def sample_ancestral(
    model: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], y: Tensor | None = None,
    guidance_scale: float = 1.0, generator: torch.Generator | None = None, return_trajectory: bool = False,
    trajectory_every: int = 100, clip_sample: float | None = 1.0, threshold: float | None = None,
    guidance_interval: tuple[int, int] | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:  # fmt: skip
    """DDPM Algorithm 2: from N(0, I) ``shape``, :meth:`NoiseSchedule.step` for t = T-1..0 with eps from
    ``model(x, t, y)`` (``y=None``: unconditional), guided at ``guidance_scale`` in ``guidance_interval``
    (:func:`guidance_at`; ``None``: everywhere); noise from the CPU ``generator``; x_0 limited by ``clip_sample``
    or ``threshold`` (:func:`_limit_x0`). ``return_trajectory``: also x_t every ``trajectory_every`` steps."""
    interval = _check_interval(guidance_interval, schedule.num_steps)
    device = next(model.parameters()).device
    x = torch.randn(shape, generator=generator).to(device)
    traj = [x.cpu()]
    for t in reversed(range(schedule.num_steps)):
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = _guided_eps(model, x, tt, y, guidance_at(t, guidance_scale, interval))
        noise = torch.randn(shape, generator=generator).to(device) if t > 0 else None
        x = schedule.step(eps, t, x, noise, clip_sample=clip_sample, threshold=threshold)
        if return_trajectory and (t % trajectory_every == 0):
            traj.append(x.cpu())
    return (x, traj) if return_trajectory else x


@torch.no_grad()
def sample_ddim(
    model: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], y: Tensor | None = None,
    guidance_scale: float = 1.0, num_steps: int = 50, eta: float = 0.0, generator: torch.Generator | None = None,
    clip_sample: float | None = 1.0, threshold: float | None = None, guidance_interval: tuple[int, int] | None = None,
) -> Tensor:  # fmt: skip
    """DDIM (Song et al. eq. 12) on ``num_steps`` evenly spaced timesteps, arguments as :func:`sample_ancestral`;
    a limited x_0 re-derives eps (a strongly guided eps that disagrees with it sends the sample out of range)."""
    interval = _check_interval(guidance_interval, schedule.num_steps)
    device = next(model.parameters()).device
    x = torch.randn(shape, generator=generator).to(device)
    ts = schedule.ddim_timesteps(num_steps)
    limited = clip_sample is not None or threshold is not None
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = _guided_eps(model, x, tt, y, guidance_at(t, guidance_scale, interval))
        noise = torch.randn(shape, generator=generator).to(device) if eta > 0 else None
        x = schedule.ddim_step(eps, t, t_prev, x, eta=eta, noise=noise, clip_sample=clip_sample, threshold=threshold,
                               use_clipped_model_output=limited)  # fmt: skip
    return x


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """One EMA step of ``model``'s weights into ``ema`` (buffers copied), decay ``min(decay, (1 + t) / (10 + t))``."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# -- 4. Config, LightningModule ---------------------------------------------------------------------
@dataclass
class DDPMConfig:
    """Sizes and hyperparameters of the DDPM (pixel space) and of its latent-space twin."""

    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 12
    channels: tuple[int, ...] = (32, 64)
    patch: int = 2
    attention: tuple[bool, ...] = (False, True)
    emb_dim: int = 128
    num_steps: int = 1000  # T
    schedule: str = "cosine"
    p_uncond: float = 0.1  # condition dropout
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (0: the plain simple loss)
    t_sampling: str = "split"  # training timesteps: "uniform" or "split" (see sample_timesteps)
    t_split: int = 300  # "split": the boundary between the low-noise part and the logit-normal part
    t_low_fraction: float = 0.5  # "split": the fraction of each batch below t_split
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    max_steps: int = 4000  # optimizer steps (cpu: ~0.11 s each on 2 cores, 0.18 s on one)
    warmup_steps: int = 100
    ema_decay: float = 0.995
    num_train: int = 8192  # Shapes training images (seed 0)
    guidance_scale: float = 8.0  # classifier-free guidance used for the reported samples
    guidance_interval: tuple[int, int] = (0, 850)  # guide lo <= t < hi ((0, T): all; cpu: FD 56 vs 74 at all)
    clip_sample: float = 1.0  # clamp predicted x0 while sampling pixels (0: never; latents never)
    threshold: float = 0.99  # dynamic thresholding quantile, used instead of clipping (0: clip only)
    num_samples: int = 256  # images for the 1000-step sample_fd (and the 50-step DDIM one)
    ddim_steps: int = 50
    latent_channels_unet: tuple[int, ...] = (64, 128)  # latent diffusion: the same DDPM on the VAE's latents
    latent_attention: tuple[bool, ...] = (False, True)  # one flag per level of latent_channels_unet
    latent_max_steps: int = 600
    latent_guidance_scale: float = 3.0  # the latent model's samples (scale 8 overshoots: FD 320 vs 274 at 3)

    @classmethod
    def preset(cls, profile: str | None = None) -> DDPMConfig:
        p = _profile(profile)
        if p == "ci":
            return cls(channels=(32, 64), patch=4, emb_dim=64, batch_size=32, max_steps=150, warmup_steps=10,
                       ema_decay=0.9, num_train=512, num_samples=32, latent_channels_unet=(32, 64),
                       latent_max_steps=60)  # fmt: skip
        if p == "cpu":
            return cls()
        return cls(channels=(128, 256), emb_dim=256, batch_size=256, max_steps=20000, warmup_steps=500,
                   ema_decay=0.9995, num_train=50000, num_samples=2000, latent_channels_unet=(128, 256),
                   latent_max_steps=20000)  # fmt: skip


class LitDDPM(L.LightningModule):
    """Trains a v-parametrised :class:`UNet` with the simple loss (DDPM Algorithm 1), condition dropout and
    timesteps from :func:`sample_timesteps`; keeps an EMA of the weights (``ema``) for sampling. Arguments left
    ``None`` come from ``DDPMConfig.preset(profile)``; 0, not ``None``, switches an option off:
    ``min_snr_gamma=0`` trains unweighted (else :func:`min_snr_weight`), ``clip_sample=0`` does not clip the
    sampler's x_0, ``threshold=0`` clips it instead of dynamic thresholding. ``guidance_*``: :meth:`sample`'s
    defaults; ``max_steps``, ``num_samples``: the lr schedule's length, and ``minivfm fit``'s steps and samples."""

    def __init__(
        self, in_channels: int | None = None, image_size: int | None = None, num_classes: int | None = None,
        channels: tuple[int, ...] | None = None, patch: int | None = None, attention: tuple[bool, ...] | None = None,
        emb_dim: int | None = None, num_steps: int | None = None, schedule: str | None = None,
        p_uncond: float | None = None, min_snr_gamma: float | None = None, t_sampling: str | None = None,
        t_split: int | None = None, t_low_fraction: float | None = None, lr: float | None = None,
        weight_decay: float | None = None, warmup_steps: int | None = None, max_steps: int | None = None,
        ema_decay: float | None = None, clip_sample: float | None = None, threshold: float | None = None,
        guidance_scale: float | None = None, guidance_interval: tuple[int, int] | None = None,
        num_samples: int | None = None, profile: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        fill_from_preset(self, DDPMConfig.preset(profile))
        hp = self.hparams
        for name, high in (("min_snr_gamma", math.inf), ("clip_sample", math.inf), ("threshold", 1)):
            _check(name, hp[name], 0, high)
        _check_interval(hp.guidance_interval, hp.num_steps)  # then the t_sampling options, on a private RNG:
        sample_timesteps(2, hp.num_steps, hp.t_sampling, torch.Generator(), hp.t_split, hp.t_low_fraction)
        self.schedule = NoiseSchedule(hp.num_steps, hp.schedule)
        args = (hp.in_channels, hp.image_size, tuple(hp.channels), hp.num_classes, hp.patch, tuple(hp.attention))
        self.model = UNet(*args, hp.emb_dim, alphas_cumprod=self.schedule.alphas_cumprod)
        self.ema = UNet(*args, hp.emb_dim, alphas_cumprod=self.schedule.alphas_cumprod)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: DDPMConfig, latent_shape: tuple[int, int, int] | None = None) -> LitDDPM:
        """The pixel model of ``cfg`` or, given ``latent_shape`` ``(Z, h, w)``, its latent twin (``latent_*``)."""
        names = set(inspect.signature(cls.__init__).parameters)
        kw = {k: v for k, v in vars(cfg).items() if k in names}
        if latent_shape is not None:
            kw.update(in_channels=latent_shape[0], image_size=latent_shape[1], patch=1, clip_sample=0.0, threshold=0.0,
                      channels=cfg.latent_channels_unet, attention=cfg.latent_attention, max_steps=cfg.latent_max_steps,
                      guidance_scale=cfg.latent_guidance_scale, guidance_interval=(0, cfg.num_steps))  # fmt: skip
        return cls(**kw)

    def _step(self, batch: dict, stage: str) -> Tensor:
        x0, y = batch["image"], batch["label"].long()
        B, hp = x0.shape[0], self.hparams
        t = sample_timesteps(B, hp.num_steps, hp.t_sampling, None, hp.t_split, hp.t_low_fraction).to(x0.device)
        eps = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, eps, t)  # eq. 4
        if stage == "train":
            y = drop_labels(y, hp.p_uncond, hp.num_classes)
        weight = min_snr_weight(self.schedule.alphas_cumprod, t, hp.min_snr_gamma) if hp.min_snr_gamma else None
        loss = ddpm_loss(self.model(x_t, t, y), eps, weight)  # eq. 14 (Min-SNR weighted if gamma > 0)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=B)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        update_ema(self.ema, self.model, self.hparams.ema_decay, self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warm, total = hp.warmup_steps, max(hp.max_steps, 1)

        def lr_lambda(step: int) -> float:  # linear warm-up, then cosine decay to 10%
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return (step + 1) / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def sample(
        self, y: Tensor, guidance_scale: float | None = None, sampler: str = "ddim", num_steps: int = 50,
        generator: torch.Generator | None = None, guidance_interval: tuple[int, int] | None = None,
    ) -> Tensor:  # fmt: skip
        """Samples ``(B, C, H, W)`` of labels ``y`` ``(B,)`` from the EMA model by ``"ddim"`` (``num_steps``) or
        ``"ancestral"`` (T steps); ``guidance_scale``, ``guidance_interval`` ``None``: the hparams'."""
        check_choice("sampler", sampler, ("ddim", "ancestral"))
        hp, net = self.hparams, self.ema.eval()
        shape = (y.shape[0], hp.in_channels, hp.image_size, hp.image_size)
        y = y.to(self.device)
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        interval = hp.guidance_interval if guidance_interval is None else guidance_interval
        kw = dict(clip_sample=hp.clip_sample or None, threshold=hp.threshold or None, guidance_interval=interval)
        if sampler == "ancestral":
            return sample_ancestral(net, self.schedule, shape, y, scale, generator, **kw)
        return sample_ddim(net, self.schedule, shape, y, scale, num_steps, generator=generator, **kw)

    def generate(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``num_samples`` guided DDIM samples and their labels (cycling through the classes), for the metrics."""
        g = None if generator is None else torch.Generator().manual_seed(generator.initial_seed())  # CPU noise
        y = torch.arange(num_samples) % self.hparams.num_classes
        return torch.cat([self.sample(labels, generator=g).cpu() for labels in y.split(256)]), y


# -- 5. Results: pixel and latent diffusion, measured with minivfm.metrics --------------------------
def fit(module: L.LightningModule, images: Tensor, labels: Tensor, batch_size: int, max_steps: int, profile: str):
    """Train ``module`` for ``max_steps`` steps on in-memory ``images`` (or latents) and ``labels`` (shuffled)."""
    data = torch.utils.data.StackDataset(image=images, label=labels.long())
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    L.Trainer(
        max_steps=max_steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        precision="bf16-mixed" if _profile(profile) == "gpu" else "32-true",
    ).fit(module, loader)  # fmt: skip
    return module


def _score(out: dict, name: str, draw, y: Tensor, prefix: str = "") -> None:
    """Time ``draw()``; add ``{name}_seconds``, ``{prefix}sample_fd``, ``{prefix}sample_acc`` and, for pixels,
    ``{prefix}sample_acc_{shape}`` (the samples asked for that shape, any colour) to ``out``."""
    from minivfm import metrics
    from minivfm.data import Shapes

    t, x = time.perf_counter(), draw().float().cpu()
    out[f"{name}_seconds"] = time.perf_counter() - t
    out.update({f"{prefix}sample_fd": float(metrics.sample_fd(x)), f"{prefix}sample_acc": metrics.sample_acc(x, y)})
    right, data = metrics.reference_predict(x) == y, Shapes(1)  # class k: colour k % 4 of shape k // 4
    for i, shape in enumerate(data.shapes if prefix != "latent_" else ()):
        out[f"{prefix}sample_acc_{shape}"] = right[y // len(data.colors) == i].float().mean().item()


def results_pixel(profile: str) -> dict[str, float]:
    """The pixel-space half of :func:`results` (seeded on its own, so it can run in its own process)."""
    from minivfm import metrics
    from minivfm.data import shapes_in_memory

    cfg, start = DDPMConfig.preset(profile), time.perf_counter()
    L.seed_everything(0, workers=True)
    data = shapes_in_memory(cfg.num_train, cfg.image_size, seed=0)
    images, labels = data.images * 2 - 1, data.labels  # [-1, 1]
    model, t0 = LitDDPM.from_config(cfg), time.perf_counter()
    fit(model, images, labels, cfg.batch_size, cfg.max_steps, profile)
    n, y = cfg.num_samples, torch.arange(cfg.num_samples) % cfg.num_classes
    out = {"train_seconds": time.perf_counter() - t0, "num_samples": float(n), "real_fd": float(metrics.real_fd(n))}
    for sampler, prefix in (("ddim", "ddim_"), ("ancestral", "")):  # 50 DDIM steps, then all 1000 (Algorithm 2)
        g = torch.Generator().manual_seed(1)
        _score(out, sampler, lambda s=sampler, g=g: model.sample(y, sampler=s, num_steps=cfg.ddim_steps, generator=g),
               y, prefix)  # fmt: skip
    out["pixel_seconds"] = time.perf_counter() - start
    return out


def results_latent(profile: str) -> dict[str, float]:
    """The latent half of :func:`results`: minivfm's VAE, then the DDPM on its latents (posterior means scaled
    to unit variance, LDM's scale factor), DDIM-sampled and decoded."""
    from minivfm import metrics
    from minivfm.data import shapes_in_memory
    from minivfm.models.vae import decode_latents, encode_latents, train_vae

    cfg, start = DDPMConfig.preset(profile), time.perf_counter()
    L.seed_everything(1, workers=True)
    data = shapes_in_memory(cfg.num_train, cfg.image_size, seed=0)
    images, labels = data.images * 2 - 1, data.labels
    t0, vae = time.perf_counter(), train_vae(profile, images, labels)
    z = encode_latents(vae, images)
    scale, n = 1.0 / z.std().item(), cfg.num_samples
    out = {"vae_train_seconds": time.perf_counter() - t0,
           "vae_recon_fd": float(metrics.sample_fd(decode_latents(vae, encode_latents(vae, images[:n]))))}  # fmt: skip
    lmodel = LitDDPM.from_config(cfg, latent_shape=tuple(z.shape[1:]))
    fit(lmodel, z * scale, labels, cfg.batch_size, cfg.latent_max_steps, profile)
    out["latent_train_seconds"] = time.perf_counter() - t0
    y, g = torch.arange(n) % cfg.num_classes, torch.Generator().manual_seed(1)
    _score(out, "latent_ddim", lambda: decode_latents(vae, lmodel.sample(y, num_steps=cfg.ddim_steps, generator=g)
                                                      .float().cpu() / scale), y, "latent_")  # fmt: skip
    out["latent_seconds"] = time.perf_counter() - start
    return out


def results(profile: str) -> dict[str, float]:
    """Train the pixel-space and the latent DDPM under ``profile``; score ``cfg.num_samples`` guided samples of
    each (labels cycling through the classes): ``sample_fd``, ``sample_acc`` (1000 ancestral steps), ``ddim_*``
    (50 DDIM steps), ``latent_*`` (DDIM on the VAE's latents, decoded), ``*sample_acc_{circle,square,triangle}``
    (by the shape asked for), ``vae_recon_fd`` (the VAE's reconstructions: the latent model's ceiling),
    ``*_seconds`` and ``baselines`` (chance for the accuracies; for the FDs, ``real_fd``: real images, the floor)."""
    start = time.perf_counter()
    out = {**results_pixel(profile), **results_latent(profile)}
    out["seconds"] = time.perf_counter() - start
    chance, floor = 1 / DDPMConfig.preset(profile).num_classes, out.pop("real_fd")
    out["baselines"] = {k: chance if "sample_acc" in k else floor for k in out if "sample_acc" in k or "sample_fd" in k}
    return out
