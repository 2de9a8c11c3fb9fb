"""Checks for lesson 05 (MAE): random masking, the decoder's unshuffle, the masked loss.

Each check runs the student's function on fixed, seeded inputs, compares it with
:mod:`minivfm.models.mae`, prints one deterministic line when it matches, and raises
``AssertionError`` with a hint when it does not. Before comparing values, the checks test the
properties that the values must have (the kept tokens come from the input, ``ids_restore`` undoes
the shuffle, the loss ignores visible patches), so a wrong function is told which property it breaks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from minivfm.course.checks import assert_close, assert_tensor, call, fmt_shape, passed
from minivfm.models.mae import mae_loss, random_masking

__all__ = ["check_random_masking", "check_unshuffle", "check_masked_mse"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tuple3(name: str, result, what: str) -> tuple:
    if not (isinstance(result, tuple) and len(result) == 3):
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise AssertionError(f"{name}: return a tuple {what}, got {got}")
    return result


# -- random_masking -----------------------------------------------------------------------------------


def _masking_case(fn: Callable, B: int, N: int, D: int, ratio: float, seed: int) -> None:
    """One call of the student's ``random_masking``: properties first, then the values."""
    x = torch.randn(B, N, D, generator=_generator(100 + seed))
    K = int(N * (1 - ratio))
    args = f"x of shape {fmt_shape(x.shape)} and mask_ratio={ratio}"
    result = call("random_masking", fn, x.clone(), ratio, _generator(seed))
    x_visible, mask, ids_restore = _tuple3("random_masking", result, "(x_visible, mask, ids_restore)")
    exp_visible, exp_mask, exp_restore = random_masking(x, ratio, _generator(seed))

    # shapes and types
    hint_k = f"keep K = int(N * (1 - mask_ratio)) = {K} tokens"
    assert_tensor("random_masking: x_visible", x_visible)
    if tuple(x_visible.shape) == (B, N - K, D) and N - K != K:
        raise AssertionError(
            f"random_masking: x_visible has {N - K} tokens, the number to remove, for {args}. Hint: {hint_k}"
        )
    assert_tensor(f"random_masking: x_visible (for {args}; {hint_k})", x_visible, (B, K, D))
    assert_tensor("random_masking: mask", mask, (B, N))
    assert_tensor("random_masking: ids_restore", ids_restore, (B, N))
    if mask.dtype == torch.bool or not mask.is_floating_point():
        raise AssertionError(
            f"random_masking: mask has dtype {mask.dtype}; return a float mask (1.0 removed, 0.0 kept), as "
            "MAE does: torch.ones(B, N), zeros in the first K places, then gathered into the original order"
        )
    if ids_restore.dtype != torch.long:
        raise AssertionError(f"random_masking: ids_restore has dtype {ids_restore.dtype}; expected indices (long)")
    x_visible, mask, ids_restore = x_visible.detach(), mask.detach(), ids_restore.detach()

    # the mask: 1 for removed tokens, N - K of them per image, in the original order
    if not ((mask == 0) | (mask == 1)).all():
        raise AssertionError("random_masking: mask must hold only 0 (kept) and 1 (removed)")
    sums = mask.sum(1)
    if (sums == K).all() and K != N - K:
        raise AssertionError(
            f"random_masking: each row of mask sums to {K}, the number of kept tokens. Hint: mask is 1 for a "
            f"removed token and 0 for a kept one, so it sums to N - K = {N - K}"
        )
    if not (sums == N - K).all():
        raise AssertionError(
            f"random_masking: each row of mask must sum to N - K = {N - K} (the removed tokens), got sums "
            f"{sums.long().tolist()}. Hint: {hint_k}"
        )
    shuffled_order = torch.cat([torch.zeros(B, K), torch.ones(B, N - K)], dim=1)
    if torch.equal(mask.float(), shuffled_order):
        raise AssertionError(
            "random_masking: mask is [0] * K + [1] * (N - K) in every row: that is the mask in the shuffled "
            "order. Hint: put it back into the original order with torch.gather(mask, 1, ids_restore)"
        )

    # ids_restore: a permutation of 0..N-1 in each row
    if not torch.equal(ids_restore.sort(1).values, torch.arange(N).expand(B, N)):
        raise AssertionError("random_masking: each row of ids_restore must be a permutation of 0 .. N-1")

    # the kept tokens come from the input, are the ones the mask keeps, and ids_restore finds them
    for b in range(B):
        kept = (mask[b] == 0).nonzero().flatten()
        matches = (x_visible[b][:, None, :] - x[b][None, :, :]).abs().amax(-1) < 1e-6  # (K, N)
        if not matches.any(1).all():
            raise AssertionError(
                "random_masking: some rows of x_visible are not tokens of x. Hint: gather whole tokens, "
                "torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D)), with ids_keep the first K of ids_shuffle"
            )
        source = matches.float().argmax(1)  # (K,): which token of x each visible one is
        if sorted(source.tolist()) != kept.tolist():
            raise AssertionError(
                "random_masking: x_visible does not hold the tokens that mask marks as kept (mask == 0). "
                "Hint: both must come from the same shuffle: keep ids_shuffle[:, :K], and mark the first K "
                "places of the shuffled mask with 0 before gathering it with ids_restore"
            )
        if not torch.equal(ids_restore[b, kept].sort().values, torch.arange(K)):
            hint = "ids_restore = torch.argsort(ids_shuffle, dim=1), the position of each original token in the shuffle"
            if torch.equal(ids_restore[b, :K].sort().values, kept):  # its first K are the kept tokens: ids_shuffle
                hint = "you returned ids_shuffle; return its inverse: " + hint
            raise AssertionError(
                "random_masking: ids_restore does not undo the shuffle (the kept tokens must sit at positions "
                f"0 .. K-1 of the shuffled sequence). Hint: {hint}"
            )
        if not torch.equal(ids_restore[b, source], torch.arange(K)):
            raise AssertionError(
                "random_masking: x_visible is not in the shuffled order that ids_restore undoes "
                "(x_visible[b, ids_restore[b, i]] must be x[b, i] for every kept i). Hint: keep the tokens in "
                "the order of ids_shuffle[:, :K]; do not sort them"
            )

    # the same tokens as the library's, with the same generator
    if not torch.equal(mask, exp_mask):
        raise AssertionError(
            f"random_masking: a valid mask, but not the reference's for the same generator ({args}). Hint: draw "
            "the noise as torch.rand(B, N, generator=generator, device=x.device), one value per token, and keep "
            "the tokens with the smallest noise: ids_shuffle = torch.argsort(noise, dim=1), ascending"
        )
    assert_close("random_masking: ids_restore", ids_restore, exp_restore)
    assert_close("random_masking: x_visible", x_visible, exp_visible, atol=0, rtol=0)


def check_random_masking(fn: Callable) -> None:
    """``fn(x (B, N, D), mask_ratio, generator) -> (x_visible (B, K, D), mask (B, N), ids_restore (B, N))``,
    as :func:`minivfm.models.mae.random_masking`."""
    _masking_case(fn, 4, 16, 8, 0.75, seed=0)
    _masking_case(fn, 3, 10, 5, 0.75, seed=1)  # K = int(2.5) = 2: rounding shows
    _masking_case(fn, 2, 49, 6, 0.5, seed=2)
    passed("random_masking", "x_visible (4, 4, 8), mask (4, 16), ids_restore (4, 16); same tokens as the reference")


# -- unshuffle ----------------------------------------------------------------------------------------


def _ref_unshuffle(x_visible: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    B, K, D = x_visible.shape
    x = torch.cat([x_visible, mask_token.expand(B, ids_restore.shape[1] - K, D)], dim=1)  # (B, N, D), shuffled
    return torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, D))  # (B, N, D)


def check_unshuffle(fn: Callable) -> None:
    """``fn(x_visible (B, K, D), mask_token (1, 1, D), ids_restore (B, N)) -> (B, N, D)``: the visible
    tokens back in their places and the mask token everywhere else (MAE's ``forward_decoder``)."""
    B, N, D = 4, 16, 8
    x = torch.randn(B, N, D, generator=_generator(10))
    # with nothing masked, unshuffling the shuffled tokens gives the input back
    visible, _, ids_restore = random_masking(x, 0.0, _generator(11))
    token = torch.zeros(1, 1, D)
    got = call("unshuffle", fn, visible.clone(), token, ids_restore.clone())
    assert_close(
        "unshuffle with mask_ratio=0 (nothing masked)", got, x,
        hint="the tokens must come back in their original order: torch.gather(x, 1, ids_restore[..., None]"
        ".expand(-1, -1, D)). Gathering with ids_shuffle shuffles them a second time",
    )  # fmt: skip

    visible, mask, ids_restore = random_masking(x, 0.75, _generator(12))
    token = torch.randn(1, 1, D, generator=_generator(13)).requires_grad_()
    got = call("unshuffle", fn, visible.clone(), token, ids_restore.clone())
    expected = _ref_unshuffle(visible, token.detach(), ids_restore)
    got = assert_tensor("unshuffle", got, expected.shape)
    hint = (
        "append N - K copies of mask_token after the K visible tokens (the visible ones are the first K of "
        "the shuffle), then gather with ids_restore"
    )
    K = visible.shape[1]
    tokens_first = torch.cat([token.detach().expand(B, N - K, D), visible], dim=1)  # (B, N, D)
    if torch.allclose(got.detach(), tokens_first.gather(1, ids_restore[..., None].expand(-1, -1, D)), atol=1e-6):
        hint = "the mask tokens went first; " + hint
    elif not torch.allclose(got.detach()[mask.bool()], token.detach().reshape(1, D).expand(B * (N - K), D)):
        hint = "the places where mask == 1 must hold mask_token; " + hint
    assert_close("unshuffle", got, expected, hint=hint)
    if not got.requires_grad:
        raise AssertionError("unshuffle: no gradient reaches mask_token (use it, not a detached copy or zeros)")
    got.sum().backward()
    if token.grad is None or not token.grad.abs().sum():
        raise AssertionError("unshuffle: no gradient reaches mask_token (use it, not a detached copy or zeros)")
    passed("unshuffle", f"shape {fmt_shape(expected.shape)}, values match, the mask token gets a gradient")


# -- masked_mse ---------------------------------------------------------------------------------------


def check_masked_mse(fn: Callable) -> None:
    """``fn(pred, target, mask, norm_pix=False) -> scalar``, as :func:`minivfm.models.mae.mae_loss`:
    the per-pixel MSE of each patch, averaged over the masked patches only."""
    B, N, PPC = 4, 16, 48
    g = _generator(20)
    pred, target = torch.randn(B, N, PPC, generator=g), torch.randn(B, N, PPC, generator=g) * 0.7 + 0.2
    _, mask, _ = random_masking(torch.zeros(B, N, 1), 0.75, _generator(21))
    pred_leaf = pred.clone().requires_grad_()
    got = call("masked_mse", fn, pred_leaf, target.clone(), mask.clone())
    got = assert_tensor("masked_mse", got)
    if got.ndim:
        raise AssertionError(
            f"masked_mse: expected a scalar, got shape {fmt_shape(got.shape)}. Hint: the mean squared error of "
            "each patch (mean over its pixels, the last dim) averaged over the masked patches"
        )
    expected = mae_loss(pred, target, mask)
    per_patch = (pred - target).pow(2).mean(-1)  # (B, N)
    summed = (pred - target).pow(2).sum(-1)  # (B, N)
    visible = 1 - mask
    wrong = {  # what a common mistake computes -> the hint for it
        "you averaged over all patches, the visible ones included; weight each patch's loss by mask and "
        "divide by mask.sum()": per_patch.mean(),
        "you averaged over the visible patches (mask == 0); mask is 1 for the removed patches, and those are "
        "the ones that count": (per_patch * visible).sum() / visible.sum(),
        "you divided by the number of all patches; divide by the number of masked ones, mask.sum()": (
            (per_patch * mask).sum() / mask.numel()
        ),
        "you summed each patch's squared errors; take their mean over the pixels (the last dim) first": (
            (summed * mask).sum() / mask.sum()
        ),
    }
    hint = "the mean over each patch's pixels (last dim), then sum(loss * mask) / mask.sum()"
    for message, value in wrong.items():
        if torch.allclose(got.detach(), value, atol=1e-6, rtol=1e-5):
            hint = message
    assert_close("masked_mse", got, expected, hint=hint)

    # the visible patches do not count: changing the prediction there changes nothing
    pred2 = pred + 5.0 * (1 - mask)[..., None]
    got2 = call("masked_mse", fn, pred2, target.clone(), mask.clone())
    assert_close(
        "masked_mse after changing the prediction on visible patches only", got2, expected,
        hint="visible patches (mask == 0) must not count in the loss",
    )  # fmt: skip
    if got.requires_grad:
        got.backward()
    if pred_leaf.grad is None or not pred_leaf.grad.abs().sum():
        raise AssertionError("masked_mse: no gradient reaches pred (no .detach(), .item() or numpy inside)")
    if pred_leaf.grad[mask == 0].abs().sum() > 0:
        raise AssertionError("masked_mse: the visible patches get a gradient; only the masked ones must")

    # norm_pix: each target patch normalised by its own mean and variance
    got = call("masked_mse", fn, pred.clone(), target.clone(), mask.clone(), norm_pix=True)
    t = target
    biased = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=False) + 1e-6) ** 0.5
    hint = (
        "with norm_pix=True, first normalise each target patch: (target - mean) / (var + 1e-6) ** 0.5, with "
        "mean and var over its pixels (dim=-1, keepdim=True)"
    )
    if isinstance(got, Tensor) and torch.allclose(got.detach(), mae_loss(pred, biased, mask), atol=1e-6):
        hint = "use the unbiased variance, target.var(dim=-1, keepdim=True), as MAE does; " + hint
    elif isinstance(got, Tensor) and torch.allclose(got.detach(), expected, atol=1e-6):
        hint = "norm_pix=True changed nothing; " + hint
    assert_close("masked_mse with norm_pix=True", got, mae_loss(pred, target, mask, norm_pix=True), hint=hint)
    passed("masked_mse", f"pred {fmt_shape(pred.shape)}: values match (norm_pix too), visible patches ignored")
