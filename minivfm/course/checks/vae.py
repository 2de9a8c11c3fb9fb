"""Checks for lesson 01 (VAE, VQ-VAE): the student's functions against ``minivfm.models.vae``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from minivfm.course.checks import assert_close, assert_tensor, call, fmt_shape, passed
from minivfm.models import vae as ref

__all__ = ["check_reparameterize", "check_kl_divergence", "check_elbo_loss", "check_quantize"]


def _posterior(seed: int, shape=(8, 4, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g)
    logvar = torch.randn(shape, generator=g).mul(0.5)
    return mu, logvar


def check_reparameterize(fn: Callable) -> None:
    """``fn(mu, logvar, noise)`` must return ``mu + exp(logvar / 2) * noise`` and be differentiable."""
    name = "reparameterize"
    mu, logvar = _posterior(0)
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    mu_, logvar_ = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    z = call(name, fn, mu_, logvar_, noise)
    hint = "z = mu + sigma * noise with sigma = exp(0.5 * logvar) (logvar is a log-variance, not a std)"
    assert_close(name, z, ref.reparameterize(mu, logvar, noise), hint=hint)
    if not z.requires_grad:
        raise AssertionError(f"{name}: the result has no gradient; build z from mu and logvar with torch ops")
    z.sum().backward()
    if mu_.grad is None or logvar_.grad is None:
        raise AssertionError(f"{name}: the gradient does not reach mu and logvar")
    assert_close(f"{name} (d/d logvar)", logvar_.grad, 0.5 * torch.exp(0.5 * logvar) * noise,
                 hint="the gradient w.r.t. logvar should be 0.5 * sigma * noise")
    passed(name, f"shape {fmt_shape(mu.shape)}, values and gradients match")


def check_kl_divergence(fn: Callable) -> None:
    """``fn(mu, logvar)`` must return the closed-form KL to N(0, I), one value per sample."""
    name = "kl_divergence"
    mu, logvar = _posterior(2)
    kl = call(name, fn, mu, logvar)
    assert_tensor(name, kl, (mu.shape[0],))
    zero = call(name, fn, torch.zeros(2, 3), torch.zeros(2, 3))
    assert_close(f"{name} at mu=0, logvar=0", zero, torch.zeros(2),
                 hint="q = N(0, I) equals the prior, so the KL must be 0")
    assert_close(name, kl, ref.kl_divergence(mu, logvar), atol=1e-3,
                 hint="0.5 * (mu^2 + exp(logvar) - 1 - logvar), summed over every dimension but the batch")
    passed(name, f"shape {fmt_shape(kl.shape)}, values match")


def check_elbo_loss(fn: Callable) -> None:
    """``fn(x, x_rec, mu, logvar, beta)``: batch mean of the summed squared error + beta * KL."""
    name = "elbo_loss"
    g = torch.Generator().manual_seed(3)
    x, x_rec = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1, torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    mu, logvar = _posterior(4)
    for beta in (1.0, 4.0):
        loss = call(name, fn, x, x_rec, mu, logvar, beta)
        assert_tensor(name, loss, ())
        assert_close(f"{name} (beta={beta:g})", loss, ref.elbo_loss(x, x_rec, mu, logvar, beta), atol=1e-2,
                     hint="sum the squared error over pixels, add beta * KL per sample, then average over the batch")
    passed(name, "scalar, values match for beta 1 and 4")


def check_quantize(fn: Callable) -> None:
    """``fn(z, codebook) -> (z_q, indices)``: nearest codes, straight-through gradient to ``z``."""
    name = "quantize"
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(16, 8, generator=g)
    z = torch.randn(4, 6, 6, 8, generator=g)
    z_ = z.clone().requires_grad_(True)
    out = call(name, fn, z_, codebook)
    if not isinstance(out, tuple) or len(out) != 2:
        raise AssertionError(f"{name}: expected a tuple (z_q, indices), got {type(out).__name__}")
    z_q, indices = out
    ref_zq, ref_idx = ref.quantize(z, codebook)
    assert_tensor(f"{name} indices", indices, ref_idx.shape)
    if indices.dtype != torch.long:
        raise AssertionError(f"{name}: indices should be torch.long, got {indices.dtype}")
    wrong = (indices != ref_idx).sum().item()
    if wrong:
        raise AssertionError(f"{name}: {wrong} of {ref_idx.numel()} indices are not the nearest code. "
                             "Hint: argmin over codes of the squared distance ||z - e_k||^2")
    assert_close(f"{name} z_q", z_q, ref_zq, hint="z_q should equal codebook[indices] in value")
    if not z_q.requires_grad:
        raise AssertionError(f"{name}: z_q has no gradient to z. Hint: straight-through, z_q = z + (e - z).detach()")
    weight = torch.randn(z.shape, generator=g)
    (z_q * weight).sum().backward()
    if z_.grad is None:
        raise AssertionError(f"{name}: no gradient reaches the encoder output z")
    assert_close(f"{name} gradient", z_.grad, weight,
                 hint="the straight-through estimator copies the gradient of z_q to z unchanged")
    passed(name, f"z_q {fmt_shape(ref_zq.shape)}, indices {fmt_shape(ref_idx.shape)}, "
                 "nearest codes and straight-through gradient match")

