"""Checks for lesson 02 (GAN): the student's losses against ``minivfm.models.gan``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from minivfm.course.checks import assert_close, assert_tensor, call, passed
from minivfm.models import gan as ref

__all__ = ["check_discriminator_loss", "check_generator_loss"]


def _logits(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def check_discriminator_loss(fn: Callable) -> None:
    """``fn(real_logits, fake_logits)``: ``-mean log D(x) - mean log(1 - D(G(z)))`` from logits."""
    name = "discriminator_loss"
    at_zero = call(name, fn, torch.zeros(4), torch.zeros(4))
    assert_tensor(name, at_zero, ())
    assert_close(f"{name} at logits 0", at_zero, torch.tensor(2 * math.log(2)),
                 hint="D = sigmoid(0) = 0.5 on both, so the loss is -log 0.5 - log 0.5 = 2 log 2")
    real, fake = _logits(0), _logits(1, n=12)
    assert_close(name, call(name, fn, real, fake), ref.discriminator_loss(real, fake),
                 hint="-log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l); "
                      "average each term over its own batch")
    big = call(name, fn, torch.full((4,), 200.0), torch.full((4,), -200.0))
    if not torch.isfinite(big) or big.item() > 1e-3:
        raise AssertionError(f"{name}: a perfect discriminator (logits +200 on real, -200 on fake) should give "
                             f"a loss near 0, got {big.item():.3g}. Hint: work with logits (F.softplus or "
                             "F.binary_cross_entropy_with_logits), not sigmoid then log")
    passed(name, "2 log 2 at logits 0, values match, stable at large logits")


def check_generator_loss(fn: Callable) -> None:
    """``fn(fake_logits)``: the non-saturating ``-mean log D(G(z))``."""
    name = "generator_loss"
    at_zero = call(name, fn, torch.zeros(4))
    assert_tensor(name, at_zero, ())
    assert_close(f"{name} at logits 0", at_zero, torch.tensor(math.log(2)), hint="-log sigmoid(0) = log 2")
    fake = _logits(2)
    got = call(name, fn, fake)
    if torch.allclose(got.detach(), -ref.discriminator_loss(torch.full_like(fake, 1e4), fake), atol=1e-4):
        raise AssertionError(f"{name}: this is the saturating loss mean log(1 - D(G(z))). Hint: the "
                             "non-saturating loss minimizes -log D(G(z)) = softplus(-logits)")
    assert_close(name, got, ref.generator_loss(fake), hint="-log sigmoid(l) = softplus(-l), averaged")
    # Non-saturating: a confident D (very negative logits) still gives G a strong gradient.
    logits = torch.full((4,), -10.0, requires_grad=True)
    call(name, fn, logits).backward()
    if logits.grad is None or logits.grad.abs().mean().item() < 0.1:
        raise AssertionError(f"{name}: the gradient vanishes where D confidently rejects the fakes "
                             "(logits -10); the non-saturating loss keeps it near -1/B per logit")
    passed(name, "log 2 at logits 0, values match, non-saturating gradient")
