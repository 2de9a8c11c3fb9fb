"""DDPM: denoising diffusion, ancestral and DDIM sampling, classifier-free guidance.

Papers and equations used below:
    Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM):
        eq. 4 q(x_t | x_0), eq. 6-7 the posterior q(x_{t-1} | x_t, x_0), eq. 14 the simple loss,
        eq. 15 x_0 from epsilon, Algorithms 1 (training) and 2 (sampling).
    Nichol & Dhariwal 2021, "Improved DDPM" (eq. 17: the cosine schedule, betas capped at 0.999).
    Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM): eq. 12 the update, eq. 16 sigma(eta).
    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance" (eq. 6: the guided epsilon).
    Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (diffuse VAE latents).
    Chen, Zhang & Hinton 2023, "Analog Bits" (sec. 3: self-conditioning on the previous x_0 estimate).
    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (the loss weight).
    Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3; sec. 3.1: logit-normal timestep sampling).
Reference implementation: huggingface/diffusers ``DDPMScheduler`` and ``DDIMScheduler``; the
:class:`NoiseSchedule` below agrees with them numerically (see ``tests/test_ddpm.py``).

Notation: ``alphas_cumprod[t]`` is alpha-bar_t = prod_{s<=t} (1 - beta_s); timesteps are 0-based
(``t = 0`` is the first noising step), as in diffusers.

Shape glossary: B batch, C channels, H, W image size, D embedding width, K number of classes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import lightning as L
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
    "dynamic_threshold",
    "cfg_mix",
    "UNet",
    "ddpm_loss",
    "min_snr_weight",
    "sample_timesteps",
    "T_SAMPLING",
    "drop_labels",
    "DDPMConfig",
    "update_ema",
    "DDPM",
    "sample_ancestral",
    "sample_ddim",
    "results",
    "results_pixel",
    "results_latent",
]

SCHEDULES = ("linear", "cosine")
T_SAMPLING = ("uniform", "logit_normal", "split")

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


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_positive(name: str, value, none_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number{' or None' if none_ok else ''}, got {value!r}")
    return float(value)


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


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float | None = None) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): for each sample, s is the ``ratio``
    quantile of |x_0| (at least 1, at most ``max_value``); x_0 is clamped to [-s, s] and divided by s.

    Large guidance scales push the predicted x_0 far outside [-1, 1]. Plain clipping then saturates
    whole regions, which the next steps cannot undo; dynamic thresholding pulls every pixel back in
    proportion. Equals diffusers' ``thresholding=True`` (``dynamic_thresholding_ratio=ratio``,
    ``sample_max_value=max_value``; ``None`` means no upper bound, as in Imagen).

    Arguments:
        x0: predicted clean data ``(B, ...)``.
        ratio: the quantile, in (0, 1].
        max_value: the largest s, or ``None``.
    """
    _check_fraction("ratio", ratio)
    B = x0.shape[0]
    flat = x0.reshape(B, -1).float()  # quantile needs float32 or float64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]  # (B, 1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


def _limit_x0(x0: Tensor, clip_sample: float | None, threshold: float | None) -> Tensor:
    """The predicted x_0 after dynamic thresholding (``threshold``, a quantile) or clipping to
    ``[-clip_sample, clip_sample]``; thresholding wins when both are given, as in diffusers."""
    if _check_fraction("threshold", threshold, none_ok=True) is not None:
        return dynamic_threshold(x0, threshold)
    return x0 if clip_sample is None else x0.clamp(-clip_sample, clip_sample)


def _check_fraction(name: str, value, zero_ok: bool = False, none_ok: bool = False) -> float | None:
    """``value`` in (0, 1] (``zero_ok``: [0, 1]), or ``None`` if ``none_ok``."""
    if value is None and none_ok:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (0 <= value if zero_ok else 0 < value) and value <= 1):
        interval = "[0, 1]" if zero_ok else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}{' or None' if none_ok else ''}, got {value!r}")
    return value


def ddim_update(
    eps: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip_sample: float | None = None,
    threshold: float | None = None,
    use_clipped_model_output: bool = False,
) -> Tensor:
    """One DDIM step from t to t_prev, Song et al. eq. 12::

        x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps + sigma * noise,
        x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t),
        sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)      (eq. 16)

    where a = alpha-bar, and ``t_prev < 0`` means the final step to x_0 (a_prev = 1).
    ``eta = 0`` is deterministic (DDIM); ``eta = 1`` is DDPM-like. ``clip_sample`` clamps the
    predicted x_0 to ``[-clip_sample, clip_sample]`` (diffusers' ``clip_sample``); ``threshold`` applies
    :func:`dynamic_threshold` instead. eps is kept as predicted unless ``use_clipped_model_output``
    re-derives it from the limited x_0 (GLIDE's rule and diffusers' argument of the same name), which keeps
    the step consistent when guidance pushes x_0 far out of range.
    """
    one = torch.ones((), dtype=alphas_cumprod.dtype)
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else one
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
        _check_choice("schedule", schedule, SCHEDULES)
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

    def step(
        self,
        eps: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        *,
        clip_sample: float | None = None,
        threshold: float | None = None,
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2), written in x0 form.

        Predict x_0 (eq. 15), take the posterior mean (eq. 7), add sigma_t * noise with
        sigma_t^2 = beta-tilde_t (``fixed_small``). No clipping. At ``t = 0`` no noise is added.

        Arguments:
            eps: the model's noise prediction, like ``x_t``.
            t: the current timestep, an int in ``[0, T)``.
            x_t: the current sample ``(B, ...)``.
            noise: standard normal noise like ``x_t``; zeros (or ``None``) give the posterior mean.
            clip_sample: clamp the predicted x_0 to ``[-clip_sample, clip_sample]`` before the posterior
                mean (DDPM's sampler and diffusers' ``clip_sample=True``); ``None`` (the default) does not clip.
            threshold: apply :func:`dynamic_threshold` with this quantile instead (diffusers' ``thresholding``).
        """
        t = self._check_t("t", t)
        self._check_like("eps", eps, x_t, "x_t")
        if clip_sample is not None:
            _check_positive("clip_sample", clip_sample, none_ok=True)
        x0 = predict_x0(eps, x_t, self.alphas_cumprod[t].to(x_t))
        x0 = _limit_x0(x0, clip_sample, _check_fraction("threshold", threshold, none_ok=True))
        mean = posterior_mean_x0(x0, x_t, t, self.alphas_cumprod)
        if noise is None or t == 0:
            return mean
        self._check_like("noise", noise, x_t, "x_t")
        return mean + (self.posterior_variance(t) ** 0.5).to(x_t) * noise

    def ddim_step(
        self,
        eps: Tensor,
        t: int,
        t_prev: int,
        x_t: Tensor,
        eta: float = 0.0,
        noise: Tensor | None = None,
        *,
        clip_sample: float | None = None,
        threshold: float | None = None,
        use_clipped_model_output: bool = False,
    ) -> Tensor:
        """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12); ``t_prev < 0`` goes to x_0 (alpha-bar 1).

        ``eta > 0`` adds sigma(eta) * ``noise`` (eq. 16); ``noise`` is then required.
        ``clip_sample`` and ``threshold`` limit the predicted x_0 as in :meth:`step`;
        ``use_clipped_model_output`` re-derives eps from it (see :func:`ddim_update`).
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
        if clip_sample is not None:
            _check_positive("clip_sample", clip_sample, none_ok=True)
        threshold = _check_fraction("threshold", threshold, none_ok=True)
        return ddim_update(
            eps, x_t, t, t_prev, self.alphas_cumprod, eta=float(eta), noise=noise, clip_sample=clip_sample,
            threshold=threshold, use_clipped_model_output=use_clipped_model_output,
        )  # fmt: skip

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
    after the second GroupNorm (FiLM; the adaptive group normalization, AdaGN, of Dhariwal & Nichol 2021,
    "Diffusion Models Beat GANs on Image Synthesis"), and a residual connection."""

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
        self_condition: take a second image, the model's own previous estimate of x_0, concatenated
            with x_t (Chen et al. 2023); ``forward``'s ``x_self_cond``, zeros when it is not given.
        alphas_cumprod: if given (the schedule's alpha-bar), the network body predicts
            v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022) and ``forward`` returns the
            equivalent eps = sqrt(1 - a) x_t + sqrt(a) v. Still an eps-predictor, but at high noise the
            answer (eps ~ x_t) is built in instead of being pushed through the small network.
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
        alphas_cumprod: Tensor | None = None,
        self_condition: bool = False,
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
        self.num_classes, self.self_condition = num_classes, bool(self_condition)
        self.time_embed = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        stem_in = in_channels * (2 if self_condition else 1) * patch * patch
        self.stem = nn.Conv2d(stem_in, channels[0], 3, padding=1)
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
        self.v_param = alphas_cumprod is not None
        if self.v_param:
            self.register_buffer("alphas_cumprod", alphas_cumprod.detach().clone().float(), persistent=False)
        # NHWC convolution weights: oneDNN's preferred layout on CPU (about 10% faster here), and the
        # activations follow them. Values and state-dict keys are unchanged.
        self.to(memory_format=torch.channels_last)

    def embed(self, t: Tensor, y: Tensor | None) -> Tensor:
        """Timestep (and class) embedding ``(B, emb_dim)``; ``y = None`` or ``y = K`` is the null class."""
        emb = self.time_embed(timestep_embedding(t, self.stem.out_channels))  # (B, E)
        if self.class_embed is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.class_embed(y)
        return emb

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, x_self_cond: Tensor | None = None) -> Tensor:
        """
        Arguments:
            x: noisy images ``(B, C, H, W)``.
            t: timesteps ``(B,)``.
            y: class labels ``(B,)`` in ``[0, K]`` (``K`` = null); ``None`` = unconditional.
            x_self_cond: a previous estimate of x_0, like ``x`` (only with ``self_condition``);
                ``None`` = zeros (no estimate yet).

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
        h = x
        if self.self_condition:
            if x_self_cond is None:
                x_self_cond = torch.zeros_like(x)
            elif x_self_cond.shape != x.shape:
                raise ValueError(f"x_self_cond must have x's shape {tuple(x.shape)}, got {tuple(x_self_cond.shape)}")
            h = torch.cat([x, x_self_cond.to(x)], dim=1)  # (B, 2C, H, W)
        elif x_self_cond is not None:
            raise ValueError("x_self_cond was given but the UNet was built with self_condition=False")
        emb = self.embed(t, y)  # (B, E)
        h = self.stem(F.pixel_unshuffle(h, self.patch) if self.patch > 1 else h)  # (B, c0, H/p, W/p)
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
        out = F.pixel_shuffle(h, self.patch) if self.patch > 1 else h  # (B, C, H, W)
        if self.v_param:  # out is v: eps = sqrt(1 - a) x_t + sqrt(a) v
            abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            out = (1 - abar).sqrt() * x + abar.sqrt() * out
        return out


# --------------------------------------------------------------------------------------------------
# 3. The loss and the samplers
# --------------------------------------------------------------------------------------------------


def drop_labels(y: Tensor, p_uncond: float, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class ``num_classes`` with probability ``p_uncond``
    (condition dropout: one network learns eps(x, y) and eps(x), Ho & Salimans Algorithm 1)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, num_classes), y)


def ddpm_loss(eps_pred: Tensor, eps: Tensor, weight: Tensor | None = None) -> Tensor:
    """The simple loss, DDPM eq. 14: || eps - eps_theta(x_t, t) ||^2, averaged over all elements.

    ``weight``: optional per-sample weights ``(B,)`` (e.g. :func:`min_snr_weight`); each sample's
    mean squared error is multiplied by its weight before averaging.
    """
    if weight is None:
        return F.mse_loss(eps_pred, eps)
    if weight.shape != (eps.shape[0],):
        raise ValueError(f"weight must have shape ({eps.shape[0]},), got {tuple(weight.shape)}")
    per_sample = (eps_pred - eps).pow(2).flatten(1).mean(1)  # (B,)
    return (weight.to(per_sample) * per_sample).mean()


def min_snr_weight(alphas_cumprod: Tensor, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma weights for the epsilon loss (Hang et al. 2023, eq. 9 for eps-prediction):
    w_t = min(SNR_t, gamma) / SNR_t with SNR_t = alpha-bar_t / (1 - alpha-bar_t).

    The simple loss (w = 1) spends most of its gradient on nearly clean images, where eps is hard
    to see and details are decided; capping the weight there gives the high-noise steps, where the
    layout and shape of an image are decided, their share. Returns ``(B,)``, each in (0, 1].
    """
    gamma = _check_positive("gamma", gamma)
    abar = alphas_cumprod.to(t.device)[t].float()
    snr = abar / (1 - abar)
    return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 where SNR = 0


def sample_timesteps(
    batch_size: int,
    num_steps: int,
    method: str = "uniform",
    generator: torch.Generator | None = None,
    split_t: int = 300,
    low_fraction: float = 0.5,
) -> Tensor:
    """Training timesteps ``(B,)`` in ``[0, num_steps)``.

    - ``"uniform"``: DDPM Algorithm 1.
    - ``"logit_normal"``: SD3's sec. 3.1, t / T = sigmoid(n) with n ~ N(0, 1); trains the middle noise
      levels more often and the two ends (almost clean, almost pure noise) less.
    - ``"split"``: two halves with two jobs. A fraction ``low_fraction`` of the batch is uniform in
      ``[0, split_t)``, the low-noise end where a denoiser keeps or loses fine geometry (the corners of a
      square); the rest is logit-normal truncated to ``[split_t, num_steps)``, where layout and class are
      decided. Returned in that order (low part first).
    """
    method = _check_choice("t_sampling", method, T_SAMPLING)
    if method == "uniform":
        return torch.randint(0, num_steps, (batch_size,), generator=generator)
    if method == "logit_normal":
        u = torch.sigmoid(torch.randn(batch_size, generator=generator))
        return (u * num_steps).long().clamp(max=num_steps - 1)
    split_t = _check_int("split_t", split_t, 1, num_steps - 1)
    low_fraction = _check_fraction("low_fraction", low_fraction, zero_ok=True)
    n_low = round(low_fraction * batch_size)
    low = torch.randint(0, split_t, (n_low,), generator=generator)
    # n ~ N(0, 1) conditioned on sigmoid(n) >= split_t / T, drawn by the inverse CDF (no rejection loop)
    p_min = torch.special.ndtr(torch.logit(torch.tensor(split_t / num_steps, dtype=torch.float64)))
    u = p_min + (1 - p_min) * torch.rand(batch_size - n_low, generator=generator, dtype=torch.float64)
    high = (torch.sigmoid(torch.special.ndtri(u)) * num_steps).long().clamp(split_t, num_steps - 1)
    return torch.cat([low, high])


def guidance_at(t: int, scale: float, interval: tuple[int, int] | None = None) -> float:
    """The guidance scale at timestep ``t``: ``scale`` inside ``interval = (lo, hi)`` (``lo <= t < hi``),
    1 (the plain conditional model, one forward pass) outside it; ``None``: every step is guided.

    Guidance at the highest noise levels mostly pushes every sample of a class towards the same
    layout (less variety, a worse FD) while the class is decided later; Kynkaanniemi et al. 2024,
    "Applying Guidance in a Limited Interval", leave it out there."""
    if interval is None:
        return scale
    lo, hi = interval
    return scale if lo <= t < hi else 1.0


def _check_interval(interval, num_steps: int) -> tuple[int, int] | None:
    """``None`` or ``(lo, hi)``: ints with ``0 <= lo < hi <= num_steps``."""
    if interval is None:
        return None
    ok = isinstance(interval, (tuple, list)) and len(interval) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in interval)
    if not (ok and 0 <= interval[0] < interval[1] <= num_steps):
        raise ValueError(
            f"guidance_interval must be None or (lo, hi), ints with 0 <= lo < hi <= {num_steps}, got {interval!r}"
        )
    return tuple(interval)


def _guided_eps(
    model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None, scale: float, x_self_cond: Tensor | None = None
) -> Tensor:
    """eps for one sampling step: conditional, unconditional, or guided (one batched forward).
    ``x_self_cond``: the previous step's x_0 estimate, for a self-conditioned model."""
    sc = {} if x_self_cond is None else {"x_self_cond": x_self_cond}
    if y is None:
        return model(x, t, None, **sc)
    if scale == 1.0:
        return model(x, t, y, **sc)
    null = torch.full_like(y, model.num_classes)
    sc2 = {} if x_self_cond is None else {"x_self_cond": torch.cat([x_self_cond, x_self_cond])}
    eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **sc2).chunk(2)
    return cfg_mix(eps_cond, eps_uncond, scale)


def _next_self_cond(
    model: nn.Module, eps: Tensor, x_t: Tensor, abar_t: Tensor, clip: float | None, threshold: float | None = None
) -> Tensor | None:
    """The x_0 estimate a self-conditioned model sees at the next step (``None`` for other models)."""
    if not getattr(model, "self_condition", False):
        return None
    return _limit_x0(predict_x0(eps, x_t, abar_t.to(x_t)), clip, threshold)


@torch.no_grad()
def sample_ancestral(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    trajectory_every: int = 100,
    clip_sample: float | None = 1.0,
    threshold: float | None = None,
    guidance_interval: tuple[int, int] | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """DDPM Algorithm 2: start from N(0, I) and apply :meth:`NoiseSchedule.step` for t = T-1..0.

    Arguments:
        model: eps_theta(x, t, y); a model with ``self_condition = True`` also gets the previous
            step's x_0 estimate (``x_self_cond``, clamped like the sampler's x_0).
        shape: ``(B, C, H, W)``.
        y: labels ``(B,)`` or ``None`` (unconditional).
        guidance_scale: classifier-free guidance scale (1 = plain conditional).
        generator: a CPU ``torch.Generator`` for the noise (reproducible on any device).
        return_trajectory: also return x_t every ``trajectory_every`` steps (and x_0), for pictures.
        clip_sample: clamp each predicted x_0 to this range (DDPM's sampler does, for data in [-1, 1]);
            ``None`` for no clipping (latents).
        threshold: :func:`dynamic_threshold` each predicted x_0 at this quantile instead of clipping it
            (Imagen's remedy for large guidance scales); ``None``: clip.
        guidance_interval: ``(lo, hi)``: guide only the steps with ``lo <= t < hi`` (:func:`guidance_at`);
            ``None``: every step.
    """
    interval = _check_interval(guidance_interval, schedule.num_steps)
    device = next(model.parameters()).device
    x = torch.randn(shape, generator=generator).to(device)
    traj = [x.cpu()]
    x0_est = None  # the previous step's x_0 estimate (self-conditioned models)
    for t in reversed(range(schedule.num_steps)):
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = _guided_eps(model, x, tt, y, guidance_at(t, guidance_scale, interval), x0_est)
        x0_est = _next_self_cond(model, eps, x, schedule.alphas_cumprod[t], clip_sample, threshold)
        noise = torch.randn(shape, generator=generator).to(device) if t > 0 else None
        x = schedule.step(eps, t, x, noise, clip_sample=clip_sample, threshold=threshold)
        if return_trajectory and (t % trajectory_every == 0):
            traj.append(x.cpu())
    return (x, traj) if return_trajectory else x


@torch.no_grad()
def sample_ddim(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_sample: float | None = 1.0,
    threshold: float | None = None,
    guidance_interval: tuple[int, int] | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. eq. 12) on ``num_steps`` evenly spaced timesteps; eta = 0 is deterministic.
    ``clip_sample`` and ``threshold`` as in :func:`sample_ancestral`; when either limits x_0, each step
    re-derives eps from the limited x_0 (``use_clipped_model_output``): a strongly guided eps that
    disagrees with the x_0 it is paired with sends the sample out of range. ``guidance_interval``: guide
    only the steps with ``lo <= t < hi`` (:func:`guidance_at`); ``None``: every step."""
    interval = _check_interval(guidance_interval, schedule.num_steps)
    device = next(model.parameters()).device
    x = torch.randn(shape, generator=generator).to(device)
    ts = schedule.ddim_timesteps(num_steps)
    limited = clip_sample is not None or threshold is not None
    x0_est = None
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = _guided_eps(model, x, tt, y, guidance_at(t, guidance_scale, interval), x0_est)
        x0_est = _next_self_cond(model, eps, x, schedule.alphas_cumprod[t], clip_sample, threshold)
        noise = torch.randn(shape, generator=generator).to(device) if eta > 0 else None
        x = schedule.ddim_step(eps, t, t_prev, x, eta=eta, noise=noise, clip_sample=clip_sample, threshold=threshold,
                               use_clipped_model_output=limited)  # fmt: skip
    return x


# --------------------------------------------------------------------------------------------------
# 4. Config, LightningModule
# --------------------------------------------------------------------------------------------------


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
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (None: the plain simple loss)
    t_sampling: str = "split"  # training timesteps: "uniform", "logit_normal" or "split" (see sample_timesteps)
    t_split: int = 300  # "split": the boundary between the low-noise part and the logit-normal part
    t_low_fraction: float = 0.5  # "split": the fraction of each batch below t_split
    self_condition: bool = False  # the U-Net also sees its previous x_0 estimate (Analog Bits)
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    max_steps: int = 4000  # optimizer steps (cpu: ~0.11 s each on 2 cores, 0.18 s on one)
    warmup_steps: int = 100
    ema_decay: float = 0.995
    num_train: int = 8192  # Shapes training images (seed 0)
    guidance_scale: float = 8.0  # classifier-free guidance used for the reported samples
    # guide only the steps with lo <= t < hi; above t = 850 the conditional model alone (pixels only;
    # cpu, 3 training seeds, 480 DDIM samples: FD 56 vs 74, sample_acc 0.820 vs 0.797 guiding every step)
    guidance_interval: tuple[int, int] | None = (0, 850)
    clip_sample: float | None = 1.0  # clamp predicted x0 while sampling pixels (latents: never)
    threshold: float | None = 0.99  # dynamic thresholding quantile instead of clipping (pixels only)
    num_samples: int = 256  # images for the 1000-step sample_fd (and the 50-step DDIM one)
    ddim_steps: int = 50
    # latent diffusion: the same DDPM on the VAE's latents
    latent_channels_unet: tuple[int, ...] = (64, 128)
    latent_attention: tuple[bool, ...] = (False, True)  # one flag per level of latent_channels_unet
    latent_max_steps: int = 600
    latent_guidance_scale: float = 3.0  # the latent model's samples (scale 8 overshoots: FD 320 vs 274 at 3)

    @classmethod
    def preset(cls, profile: str | None = None) -> DDPMConfig:
        import minivfm

        p = minivfm.profile(profile)
        if p == "ci":
            return cls(channels=(32, 64), patch=4, emb_dim=64, batch_size=32, max_steps=150, warmup_steps=10,
                       ema_decay=0.9, num_train=512, num_samples=32, latent_channels_unet=(32, 64),
                       latent_max_steps=60)  # fmt: skip
        if p == "cpu":
            return cls()
        return cls(channels=(128, 256), emb_dim=256, batch_size=256, max_steps=20000, warmup_steps=500,
                   ema_decay=0.9995, num_train=50000, num_samples=2000, latent_channels_unet=(128, 256),
                   latent_max_steps=20000)  # fmt: skip

    def unet(self, in_channels: int | None = None, image_size: int | None = None, latent: bool = False) -> UNet:
        return UNet(
            in_channels=in_channels or self.in_channels,
            image_size=image_size or self.image_size,
            channels=self.latent_channels_unet if latent else self.channels,
            num_classes=self.num_classes,
            patch=1 if latent else self.patch,
            attention=self.latent_attention if latent else self.attention,
            emb_dim=self.emb_dim,
        )


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """One step of the exponential moving average of ``model``'s weights into ``ema`` (buffers copied).

    The decay has a warm-up, ``min(decay, (1 + step) / (10 + step))``: until it reaches ``decay`` the
    average weights step k about as k**8 (centred at 90% of the steps so far), not the raw early weights."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


class DDPM(L.LightningModule):
    """Trains a :class:`UNet` with the simple loss (DDPM Algorithm 1) plus condition dropout;
    ``min_snr_gamma`` weights it per sample with :func:`min_snr_weight` (``None``: unweighted).

    Keeps an exponential moving average of the weights (``ema``, used for sampling). Sampling limits each
    predicted x_0 by ``clip_sample`` or, if set, by dynamic thresholding at the quantile ``threshold``.
    ``batch`` is a dict with ``image`` ``(B, C, H, W)`` and ``label`` ``(B,)``; for latent
    diffusion pass latents as ``image`` (and ``in_channels``/``image_size`` of the latents).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 12,
        channels: tuple[int, ...] = (64, 128),
        patch: int = 4,
        attention: tuple[bool, ...] = (False, True),
        emb_dim: int = 128,
        num_steps: int = 1000,
        schedule: str = "cosine",
        p_uncond: float = 0.1,
        min_snr_gamma: float | None = None,
        t_sampling: str = "uniform",
        t_split: int = 300,
        t_low_fraction: float = 0.5,
        self_condition: bool = False,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        max_steps: int = 600,
        ema_decay: float = 0.995,
        clip_sample: float | None = 1.0,
        threshold: float | None = None,
    ) -> None:
        super().__init__()
        _check_fraction("threshold", threshold, none_ok=True)
        # check the timestep options now (a private generator: the global RNG stream is left alone)
        sample_timesteps(2, num_steps, t_sampling, torch.Generator(), split_t=t_split, low_fraction=t_low_fraction)
        self.save_hyperparameters()
        self.schedule = NoiseSchedule(num_steps, schedule)
        args = (in_channels, image_size, tuple(channels), num_classes, patch, tuple(attention), emb_dim)
        kw = dict(alphas_cumprod=self.schedule.alphas_cumprod, self_condition=self_condition)
        self.model = UNet(*args, **kw)
        self.ema = UNet(*args, **kw)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: DDPMConfig, latent_shape: tuple[int, int, int] | None = None) -> DDPM:
        kw = dict(channels=cfg.channels, patch=cfg.patch, attention=cfg.attention)
        in_channels, image_size = cfg.in_channels, cfg.image_size
        if latent_shape is not None:
            in_channels, image_size = latent_shape[0], latent_shape[1]
            kw = dict(channels=cfg.latent_channels_unet, patch=1, attention=cfg.latent_attention)
        return cls(
            in_channels=in_channels, image_size=image_size, num_classes=cfg.num_classes,
            emb_dim=cfg.emb_dim, num_steps=cfg.num_steps, schedule=cfg.schedule,
            p_uncond=cfg.p_uncond, min_snr_gamma=cfg.min_snr_gamma, t_sampling=cfg.t_sampling,
            t_split=cfg.t_split, t_low_fraction=cfg.t_low_fraction, self_condition=cfg.self_condition,
            lr=cfg.lr, weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.latent_max_steps if latent_shape is not None else cfg.max_steps,
            ema_decay=cfg.ema_decay, clip_sample=None if latent_shape is not None else cfg.clip_sample,
            threshold=None if latent_shape is not None else cfg.threshold, **kw,
        )  # fmt: skip

    def _step(self, batch: dict, stage: str) -> Tensor:
        x0, y = batch["image"], batch["label"].long()
        B = x0.shape[0]
        hp = self.hparams
        t = sample_timesteps(B, hp.num_steps, hp.t_sampling, split_t=hp.t_split, low_fraction=hp.t_low_fraction)
        t = t.to(x0.device)
        eps = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, eps, t)  # eq. 4
        x_sc = None
        if stage == "train":
            y = drop_labels(y, self.hparams.p_uncond, self.hparams.num_classes)
            if self.hparams.self_condition:
                x_sc = self._self_cond_estimate(x_t, t, y)
        gamma = self.hparams.min_snr_gamma
        weight = None if gamma is None else min_snr_weight(self.schedule.alphas_cumprod, t, gamma)
        loss = ddpm_loss(self.model(x_t, t, y, x_sc), eps, weight)  # eq. 14 (Min-SNR weighted if gamma)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=B)
        return loss

    @torch.no_grad()
    def _self_cond_estimate(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Analog Bits' training trick: for a random half of the batch, a first forward pass (no
        gradient) gives an x_0 estimate that the real pass then sees; the other half sees zeros, as
        the first sampling step does."""
        x_sc = torch.zeros_like(x_t)
        use = torch.rand(x_t.shape[0], device=x_t.device) < 0.5
        if use.any():
            eps = self.model(x_t[use], t[use], y[use])
            abar = _gather(self.schedule.alphas_cumprod.to(x_t.device), t[use], x_t)
            hp = self.hparams
            x_sc[use] = _next_self_cond(self.model, eps, x_t[use], abar, hp.clip_sample, hp.threshold)
        return x_sc

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        update_ema(self.ema, self.model, self.hparams.ema_decay, self.global_step)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm, total = self.hparams.warmup_steps, max(self.hparams.max_steps, 1)

        def lr_lambda(step: int) -> float:  # linear warm-up, then cosine decay to 10%
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def sample(
        self,
        y: Tensor | None = None,
        num_samples: int | None = None,
        guidance_scale: float = 1.0,
        sampler: str = "ddim",
        num_steps: int = 50,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        guidance_interval: tuple[int, int] | None = None,
    ) -> Tensor:
        """Samples ``(B, C, H, W)`` from the (EMA) model: ``sampler`` is ``"ddim"`` (``num_steps``)
        or ``"ancestral"`` (all T steps). Give labels ``y`` or, unconditionally, ``num_samples``.
        ``guidance_interval``: ``(lo, hi)`` guides only the steps with ``lo <= t < hi``; ``None``: all."""
        if sampler not in ("ddim", "ancestral"):
            raise ValueError(f"sampler must be 'ddim' or 'ancestral', got {sampler!r}")
        if y is None and num_samples is None:
            raise ValueError("give labels y (B,) or num_samples")
        net = (self.ema if use_ema else self.model).eval()
        B = y.shape[0] if y is not None else num_samples
        shape = (B, self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)
        if y is not None:
            y = y.to(self.device)
        limits = dict(clip_sample=self.hparams.clip_sample, threshold=self.hparams.threshold,
                      guidance_interval=guidance_interval)  # fmt: skip
        if sampler == "ancestral":
            return sample_ancestral(net, self.schedule, shape, y, guidance_scale, generator, **limits)
        return sample_ddim(net, self.schedule, shape, y, guidance_scale, num_steps, generator=generator, **limits)


# --------------------------------------------------------------------------------------------------
# 5. Results: pixel and latent diffusion, measured with minivfm.metrics
# --------------------------------------------------------------------------------------------------


class _Pairs(torch.utils.data.Dataset):
    """In-memory ``{"image", "label"}`` items (images or latents)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


def shapes_tensors(num: int, image_size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``num`` Shapes images ``(N, 3, H, W)`` in [-1, 1] and labels ``(N,)``, rendered at once."""
    from minivfm.data import Shapes

    batch = Shapes(num, image_size=image_size, seed=seed).get_batch(range(num))
    return batch["image"], batch["label"]


def _trainer(max_steps: int, profile: str) -> L.Trainer:
    import minivfm

    gpu = minivfm.profile(profile) == "gpu"
    return L.Trainer(
        max_steps=max_steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, precision="bf16-mixed" if gpu else "32-true",
    )  # fmt: skip


def fit(module: L.LightningModule, images: Tensor, labels: Tensor, batch_size: int, max_steps: int, profile: str):
    """Train ``module`` for ``max_steps`` optimizer steps on in-memory ``images``/``labels``."""
    loader = torch.utils.data.DataLoader(
        _Pairs(images, labels), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0
    )
    _trainer(max_steps, profile).fit(module, loader)
    return module


def train_vae(profile: str, images: Tensor, labels: Tensor):
    """Train minivfm's VAE (``VAEConfig.preset(profile)``) on ``images``; returns the ``VAE`` in eval mode."""
    from minivfm.models.vae import LitVAE, VAEConfig

    vcfg = VAEConfig.preset(profile)
    lit = LitVAE.from_config(vcfg)
    n = min(len(images), vcfg.num_train)
    steps = vcfg.max_epochs * (n // vcfg.batch_size)
    fit(lit, images[:n], labels[:n], vcfg.batch_size, steps, profile)
    return lit.model.eval()


@torch.no_grad()
def encode_latents(vae, images: Tensor, batch_size: int = 512) -> Tensor:
    """Posterior means of ``images`` under the VAE, ``(N, Z, h, w)``."""
    device = next(vae.parameters()).device
    out = [vae.encode(images[i : i + batch_size].to(device))[0].cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, z: Tensor, batch_size: int = 512) -> Tensor:
    device = next(vae.parameters()).device
    out = [vae.decode(z[i : i + batch_size].to(device)).clamp(-1, 1).cpu() for i in range(0, len(z), batch_size)]
    return torch.cat(out)


class _Reporter:
    """Collects results, prints them (``verbose``) and writes them to ``out_dir`` as they come."""

    def __init__(self, profile: str, out_dir: str | None, verbose: bool, name: str) -> None:
        self.profile, self.out_dir, self.verbose, self.name = profile, out_dir, verbose, name
        self.out: dict[str, float] = {}
        self.start = time.perf_counter()

    def __call__(self, **kw: float) -> None:
        import json
        from pathlib import Path

        self.out.update({k: float(v) for k, v in kw.items()})
        if self.verbose:
            items = " ".join(f"{k}={v:.4g}" for k, v in kw.items())
            print(f"{items} [{time.perf_counter() - self.start:.0f} s]", flush=True)
        if self.out_dir is not None:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            Path(self.out_dir, f"ddpm_{self.name}.json").write_text(json.dumps(self.out, indent=1))

    def grid(self, name: str, x: Tensor) -> None:
        if self.out_dir is not None:
            from minivfm.viz import image_grid

            title = f"DDPM {name} ({self.profile})"
            image_grid(x[:48], nrow=12, title=title, path=f"{self.out_dir}/ddpm_{name}.png")


def _timed(fn):
    t = time.perf_counter()
    x = fn().float().cpu()
    return x, time.perf_counter() - t


def results_pixel(profile: str, out_dir: str | None = None, verbose: bool = False) -> dict[str, float]:
    """The pixel-space half of :func:`results` (seeded on its own, so it can run in its own process)."""
    from minivfm import metrics

    cfg = DDPMConfig.preset(profile)
    report = _Reporter(profile, out_dir, verbose, "pixel")
    L.seed_everything(0, workers=True)
    images, labels = shapes_tensors(cfg.num_train, cfg.image_size, seed=0)
    model = DDPM.from_config(cfg)
    t0 = time.perf_counter()
    fit(model, images, labels, cfg.batch_size, cfg.max_steps, profile)
    report(train_seconds=time.perf_counter() - t0)
    n, K = cfg.num_samples, cfg.num_classes
    y = torch.arange(n) % K
    report(num_samples=n, real_fd=metrics.real_fd(n))

    def draw(sampler: str):
        return model.sample(y, guidance_scale=cfg.guidance_scale, sampler=sampler, num_steps=cfg.ddim_steps,
                            generator=torch.Generator().manual_seed(1),
                            guidance_interval=cfg.guidance_interval)  # fmt: skip

    ddim, secs = _timed(lambda: draw("ddim"))
    report.grid("ddim", ddim)
    report(ddim_seconds=secs, ddim_sample_fd=metrics.sample_fd(ddim), ddim_sample_acc=metrics.sample_acc(ddim, y))
    # the full 1000-step ancestral sampler (DDPM Algorithm 2): the slow one
    anc, secs = _timed(lambda: draw("ancestral"))
    report.grid("ancestral", anc)
    report(ancestral_seconds=secs, sample_fd=metrics.sample_fd(anc), sample_acc=metrics.sample_acc(anc, y))
    report(pixel_seconds=time.perf_counter() - report.start)
    return report.out


def results_latent(profile: str, out_dir: str | None = None, verbose: bool = False) -> dict[str, float]:
    """The latent-diffusion half of :func:`results`: train minivfm's VAE, then the same DDPM on its
    latents (posterior means scaled to unit variance, LDM's scale factor), DDIM-sample and decode."""
    from minivfm import metrics

    cfg = DDPMConfig.preset(profile)
    report = _Reporter(profile, out_dir, verbose, "latent")
    L.seed_everything(1, workers=True)
    images, labels = shapes_tensors(cfg.num_train, cfg.image_size, seed=0)
    t0 = time.perf_counter()
    vae = train_vae(profile, images, labels)
    z = encode_latents(vae, images)
    scale = 1.0 / z.std().item()
    n, K = cfg.num_samples, cfg.num_classes
    report(vae_train_seconds=time.perf_counter() - t0,
           vae_recon_fd=metrics.sample_fd(decode_latents(vae, encode_latents(vae, images[:n]))))  # fmt: skip
    lmodel = DDPM.from_config(cfg, latent_shape=tuple(z.shape[1:]))
    fit(lmodel, z * scale, labels, cfg.batch_size, cfg.latent_max_steps, profile)
    report(latent_train_seconds=time.perf_counter() - t0)
    y = torch.arange(n) % K
    t = time.perf_counter()
    zs = lmodel.sample(y, guidance_scale=cfg.latent_guidance_scale, sampler="ddim", num_steps=cfg.ddim_steps,
                       generator=torch.Generator().manual_seed(1)) / scale  # fmt: skip
    lat = decode_latents(vae, zs.float().cpu())
    secs = time.perf_counter() - t
    report.grid("latent_ddim", lat)
    report(latent_ddim_seconds=secs, latent_sample_fd=metrics.sample_fd(lat),
           latent_sample_acc=metrics.sample_acc(lat, y))  # fmt: skip
    report(latent_seconds=time.perf_counter() - report.start)
    return report.out


def results(profile: str, out_dir: str | None = None, verbose: bool = False) -> dict[str, float]:
    """Train the pixel-space DDPM and the latent DDPM under ``profile``; measure them.

    Samples are class-conditional (labels cycling through the classes), guided with
    ``cfg.guidance_scale``, from the EMA weights, ``cfg.num_samples`` of each kind. Returns:

    - ``sample_fd``, ``sample_acc``: the 1000-step ancestral sampler;
    - ``ddim_sample_fd``, ``ddim_sample_acc``: the same labels, 50-step DDIM (eta 0);
    - ``latent_sample_fd``, ``latent_sample_acc``: DDPM on the VAE's latents, 50-step DDIM guided with
      ``cfg.latent_guidance_scale``, decoded;
      ``vae_recon_fd``: the FD of the VAE's reconstructions of real images (the latent model's ceiling);
    - ``real_fd``: the floor, real images vs real images at the same N;
    - ``ancestral_seconds``, ``ddim_seconds``, ``latent_ddim_seconds``: sampling times;
      ``train_seconds``, ``latent_train_seconds`` (VAE included), ``seconds`` (everything).

    ``out_dir``: also write sample grids and the partial results (JSON) there as they come.
    ``verbose``: print each number as it is measured.
    """
    start = time.perf_counter()
    out = results_pixel(profile, out_dir, verbose)
    out.update(results_latent(profile, out_dir, verbose))
    out["seconds"] = time.perf_counter() - start
    return out
