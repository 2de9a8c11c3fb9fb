"""Checks for lesson 03 (DDPM): forward noising, the training loss, the x0-form posterior mean, DDIM, guidance.

Each check calls the student's function on fixed seeded random inputs, compares it with
:mod:`minivfm.models.ddpm`, and prints one deterministic line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minivfm.course.checks import assert_close, call, check_close, fmt_shape, passed
from minivfm.models import ddpm

SHAPE = (8, 3, 16, 16)


def _inputs(seed: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(n)]


def check_q_sample(fn: Callable) -> None:
    """``fn(x0, t, noise, alphas_cumprod)`` is DDPM eq. 4 for a ``(B,)`` tensor of timesteps."""
    for schedule in ("linear", "cosine"):
        ac = ddpm.NoiseSchedule(1000, schedule).alphas_cumprod
        x0, noise = _inputs(0, 2)
        t = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999])
        expected = ddpm.q_sample(x0, t, noise, ac)
        assert_close(
            "q_sample",
            call("q_sample", fn, x0, t, noise, ac),
            expected,
            hint="x_t = sqrt(alpha_bar[t]) * x0 + sqrt(1 - alpha_bar[t]) * noise, with alpha_bar[t] "
            "reshaped to (B, 1, 1, 1) so that it broadcasts over the image",
        )
    # it must broadcast over any number of trailing dimensions
    x0, noise = torch.randn(4, 5), torch.randn(4, 5)
    t = torch.tensor([0, 5, 50, 500])
    assert_close("q_sample on (B, D) inputs", call("q_sample", fn, x0, t, noise, ac), ddpm.q_sample(x0, t, noise, ac))
    passed("q_sample", f"shape {_fmt(SHAPE)}, values match (linear and cosine schedules)")


class _TinyDenoiser(torch.nn.Module):
    """A stand-in for the U-Net: eps(x_t, t, y) = conv(x_t) + a class embedding scaled by t / T."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.embed = torch.nn.Embedding(13, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.embed(y)[:, :, None, None] * (t.float() / 1000)[:, None, None, None]


def check_diffusion_loss(fn: Callable) -> None:
    """``fn(net, x0, y, t, noise, alphas_cumprod, weight=None)`` is DDPM Algorithm 1's loss (eq. 14), each
    sample's mean squared error multiplied by ``weight`` ``(B,)`` if given, averaged over the batch."""
    with torch.random.fork_rng():
        net = _TinyDenoiser()
    ac = ddpm.NoiseSchedule(1000, "cosine").alphas_cumprod
    x0, noise = _inputs(4, 2)
    y, t = torch.arange(SHAPE[0]) % 13, torch.tensor([0, 3, 40, 250, 500, 750, 990, 999])
    weight = torch.linspace(0.1, 1.0, SHAPE[0])
    for w in (None, weight):
        name = "diffusion_loss" + ("" if w is None else " with weight")
        got = call("diffusion_loss", fn, net, x0, y, t, noise, ac, w)
        if isinstance(got, torch.Tensor) and got.ndim:
            shape = fmt_shape(got.shape)
            raise AssertionError(f"{name}: expected a scalar (the mean over the batch), got shape {shape}")
        with torch.no_grad():
            expected = ddpm.ddpm_loss(net(ddpm.q_sample(x0, t, noise, ac), t, y), noise, w)
        assert_close(name, got, expected, hint="x_t = q_sample(x0, t, noise, alphas_cumprod) with your exercise 1; "
                     "the loss is the mean of (net(x_t, t, y) - noise)^2 over each sample's pixels, times its weight, "
                     "then the mean over the batch")  # fmt: skip
    net.zero_grad()
    if got.requires_grad:
        got.backward()
    if not got.requires_grad or any(p.grad is None or not p.grad.abs().sum() for p in net.parameters()):
        raise AssertionError("diffusion_loss: no gradient reaches the network (no .detach(), no .item())")
    passed("diffusion_loss", "values match with and without Min-SNR weights, gradients reach the network")


def check_posterior_mean_x0(fn: Callable) -> None:
    """``fn(x0, x_t, t, alphas_cumprod)`` is the posterior mean of DDPM eq. 7 (x0 form)."""
    ac = ddpm.NoiseSchedule(1000, "linear").alphas_cumprod
    x0, x_t = _inputs(1, 2)
    for t in (999, 500, 1, 0):
        assert_close(
            f"posterior_mean_x0 at t={t}",
            call("posterior_mean_x0", fn, x0, x_t, t, ac),
            ddpm.posterior_mean_x0(x0, x_t, t, ac),
            hint="alpha_t = alpha_bar[t] / alpha_bar[t-1], beta_t = 1 - alpha_t, and alpha_bar[-1] = 1 "
            "at t = 0 (use 1.0, not alpha_bar[-1], the last entry)",
        )
    passed("posterior_mean_x0", f"shape {_fmt(SHAPE)}, values match at t = 999, 500, 1, 0")


def check_ddim_update(fn: Callable) -> None:
    """``fn(eps, x_t, t, t_prev, alphas_cumprod)`` is the deterministic DDIM step (eq. 12, eta = 0)."""
    ac = ddpm.NoiseSchedule(1000, "cosine").alphas_cumprod
    eps, x_t = _inputs(2, 2)
    for t, t_prev in ((999, 979), (500, 480), (20, 0), (0, -20)):
        assert_close(
            f"ddim_update from t={t} to t_prev={t_prev}",
            call("ddim_update", fn, eps, x_t, t, t_prev, ac),
            ddpm.ddim_update(eps, x_t, t, t_prev, ac),
            hint="predict x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), then sqrt(a_prev) x0 + sqrt(1 - a_prev) eps; "
            "a_prev = 1 when t_prev < 0",
        )
    passed("ddim_update", f"shape {_fmt(SHAPE)}, values match (t_prev < 0 included)")


def check_cfg_mix(fn: Callable) -> None:
    """``fn(eps_cond, eps_uncond, scale)``: classifier-free guidance."""
    eps_c, eps_u = _inputs(3, 2)
    for scale in (0.0, 1.0, 3.0):
        check = assert_close if scale != 3.0 else check_close
        check(
            "cfg_mix",
            call("cfg_mix", fn, eps_c, eps_u, scale),
            ddpm.cfg_mix(eps_c, eps_u, scale),
            hint="eps = eps_uncond + scale * (eps_cond - eps_uncond); scale 1 gives eps_cond",
        )


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"
