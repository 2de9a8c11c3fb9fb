"""Checks for lesson 01 (VAE, VQ-VAE): the student's functions against ``minivfm.models.vae``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from minivfm.course.checks import assert_close, assert_tensor, call, call_plain, fmt_shape, passed
from minivfm.models import vae as ref

__all__ = ["check_reparameterize", "check_kl_divergence", "check_elbo_loss", "check_quantize"]


def _posterior(seed: int, shape=(8, 4, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g)
    logvar = torch.randn(shape, generator=g).mul(0.5)
    return mu, logvar


def _run(name: str, fn: Callable, *args: Any, hint: str, what: str = "") -> Any:
    """``call`` the student's ``fn``; an error inside it becomes an ``AssertionError`` with ``hint``."""
    try:
        return call_plain(name, fn, *args)
    except AssertionError:
        raise
    except Exception as err:  # a shape or type mistake inside the student's code
        where = f" {what}" if what else ""
        raise AssertionError(f"{name}: calling it{where} raised {type(err).__name__}: {err}. Hint: {hint}") from err


def _same_shape(name: str, value: Any, shape: torch.Size, hint: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.shape != shape:
        raise AssertionError(f"{name}: expected shape {fmt_shape(shape)}, got {fmt_shape(value.shape)}. Hint: {hint}")
    return value


def check_reparameterize(fn: Callable) -> None:
    """``fn(mu, logvar, noise=None)`` must return ``mu + exp(logvar / 2) * noise`` and be differentiable.

    Both documented paths are checked: ``noise`` given (values and gradients against the
    reference), and ``noise`` left out (``None``: ``fn`` draws standard normal noise itself, of
    ``mu``'s shape, and its ``(z - mu) / sigma`` must look like N(0, 1)). The global random state is
    left as it was.
    """
    name = "reparameterize"
    shape_hint = "z has the shape of mu; draw the noise with torch.randn_like(mu), not with a shape of your own"
    mu, logvar = _posterior(0)
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    mu_, logvar_ = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    z = _run(name, fn, mu_, logvar_, noise, hint=shape_hint, what="with noise given")
    _same_shape(name, z, mu.shape, shape_hint)
    hint = "z = mu + sigma * noise with sigma = exp(0.5 * logvar) (logvar is a log-variance, not a std)"
    assert_close(name, z, ref.reparameterize(mu, logvar, noise), hint=hint)
    if not z.requires_grad:
        raise AssertionError(f"{name}: the result has no gradient; build z from mu and logvar with torch ops")
    z.sum().backward()
    if mu_.grad is None or logvar_.grad is None:
        raise AssertionError(f"{name}: the gradient does not reach mu and logvar")
    assert_close(f"{name} (d/d logvar)", logvar_.grad, 0.5 * torch.exp(0.5 * logvar) * noise,
                 hint="the gradient w.r.t. logvar should be 0.5 * sigma * noise")

    # the documented default: noise=None draws eps ~ N(0, I) itself
    default_hint = ("noise defaults to None (def reparameterize(mu, logvar, noise=None)); when it is None, draw it "
                    "yourself with noise = torch.randn_like(mu), the shape of mu, before using it")
    mu, logvar = torch.full((64, 4, 8, 8), 0.5), torch.full((64, 4, 8, 8), math.log(4.0))  # sigma = 2
    mu_, logvar_ = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        z = _run(name, fn, mu_, logvar_, hint=default_hint, what="without noise (noise=None)")
        z2 = _run(name, fn, mu, logvar, hint=default_hint, what="without noise (noise=None)")
    _same_shape(f"{name} (noise=None)", z, mu.shape, shape_hint)
    eps = (z.detach() - mu) / 2.0
    if torch.equal(z.detach(), z2.detach()) or eps.std().item() < 1e-3:
        raise AssertionError(f"{name} (noise=None): the result does not change between calls, so no noise was drawn. "
                             f"Hint: {default_hint}")
    mean, std = eps.mean().item(), eps.std().item()
    if abs(mean) > 0.05 or not 0.95 < std < 1.05:
        raise AssertionError(f"{name} (noise=None): (z - mu) / sigma has mean {mean:.3f} and std {std:.3f}, "
                             f"expected about 0 and 1 (standard normal noise). Hint: {default_hint}, "
                             "not torch.rand_like (uniform) or a fixed value")
    if not z.requires_grad:
        raise AssertionError(f"{name} (noise=None): the result has no gradient; build z from mu and logvar")
    passed(name, f"shape {fmt_shape(_posterior(0)[0].shape)}, values and gradients match")


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
    """``fn(z, codebook) -> (z_q, indices)``: nearest codes, straight-through gradient to ``z``.

    The gradient of ``z_q`` must reach ``z`` unchanged and must not reach the codebook: the
    codebook is trained only by the codebook loss (``vq_losses``), never through ``z_q``.
    """
    name = "quantize"
    shape_hint = ("z is channels-last (..., D) with any number of leading dimensions: flatten it to (N, D) with "
                  "z.reshape(-1, D) for the distances (N, K), then reshape the indices to z.shape[:-1]")
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(16, 8, generator=g)
    z = torch.randn(4, 6, 6, 8, generator=g)
    z_, codebook_ = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    out = _run(name, fn, z_, codebook_, hint=shape_hint, what="on z (4, 6, 6, 8) and a codebook (16, 8)")
    if not isinstance(out, tuple) or len(out) != 2:
        raise AssertionError(f"{name}: expected a tuple (z_q, indices), got {type(out).__name__}")
    z_q, indices = out
    ref_zq, ref_idx = ref.quantize(z, codebook)
    _same_shape(f"{name} indices", indices, ref_idx.shape, shape_hint)
    if indices.dtype != torch.long:
        raise AssertionError(f"{name}: indices should be torch.long, got {indices.dtype}")
    wrong = (indices != ref_idx).sum().item()
    if wrong:
        raise AssertionError(f"{name}: {wrong} of {ref_idx.numel()} indices are not the nearest code. "
                             "Hint: argmin over codes of the squared distance ||z - e_k||^2")
    _same_shape(f"{name} z_q", z_q, ref_zq.shape, "z_q = codebook[indices] has the shape of z")
    assert_close(f"{name} z_q", z_q, ref_zq, hint="z_q should equal codebook[indices] in value")
    if not z_q.requires_grad:
        raise AssertionError(f"{name}: z_q has no gradient to z. Hint: straight-through, z_q = z + (e - z).detach()")
    weight = torch.randn(z.shape, generator=g)
    (z_q * weight).sum().backward()
    if z_.grad is None:
        raise AssertionError(f"{name}: no gradient reaches the encoder output z. Hint: straight-through, "
                             "z_q = z + (e - z).detach(): the value is e, the gradient of z_q goes to z unchanged")
    assert_close(f"{name} gradient", z_.grad, weight,
                 hint="the straight-through estimator copies the gradient of z_q to z unchanged")
    if codebook_.grad is not None and codebook_.grad.abs().max().item() > 0:
        raise AssertionError(
            f"{name}: the gradient of z_q reaches the codebook (max |grad| {codebook_.grad.abs().max().item():.3g}); "
            "it must not. Hint: detach the whole difference, z_q = z + (e - z).detach(): the value is e, the "
            "gradient goes to z only, and the codebook is trained by the codebook loss alone"
        )
    passed(name, f"z_q {fmt_shape(ref_zq.shape)}, indices {fmt_shape(ref_idx.shape)}, "
                 "nearest codes and straight-through gradient match")
