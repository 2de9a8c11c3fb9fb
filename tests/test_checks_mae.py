"""Lesson 05's checks (minivfm.course.checks.mae): they pass the library's functions, fail the untouched
stubs, and fail common wrong implementations with a hint that names the mistake."""

from __future__ import annotations

import pytest
import torch

from minivfm.course.checks import mae as checks
from minivfm.models.mae import mae_loss, random_masking


def _unshuffle(x_visible, mask_token, ids_restore):
    B, K, D = x_visible.shape
    x = torch.cat([x_visible, mask_token.expand(B, ids_restore.shape[1] - K, D)], dim=1)
    return torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, D))


def test_checks_pass_the_library(capsys):
    checks.check_random_masking(random_masking)
    checks.check_unshuffle(_unshuffle)
    checks.check_masked_mse(mae_loss)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("✓ ") for line in lines), lines


def _stub(*args, **kwargs):
    raise NotImplementedError()


@pytest.mark.parametrize("check", ["check_random_masking", "check_unshuffle", "check_masked_mse"])
def test_checks_fail_the_stub(check):
    with pytest.raises(AssertionError, match="not implemented yet; fill in the exercise cell above"):
        getattr(checks, check)(_stub)


# -- wrong random_masking ---------------------------------------------------------------------------------


def _masking_parts(x, mask_ratio, generator):
    B, N, D = x.shape
    K = int(N * (1 - mask_ratio))
    ids_shuffle = torch.argsort(torch.rand(B, N, generator=generator), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(x, 1, ids_shuffle[:, :K, None].expand(-1, -1, D))
    mask = torch.ones(B, N)
    mask[:, :K] = 0
    return visible, mask, ids_shuffle, ids_restore


def _from_shuffle(x, ids_shuffle, K):  # MAE's steps after the shuffle, with K given
    B, N, D = x.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, N)
    mask[:, :K] = 0
    visible = torch.gather(x, 1, ids_shuffle[:, :K, None].expand(-1, -1, D))
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def _rm_returns_ids_shuffle(x, mask_ratio, generator=None):
    visible, mask, ids_shuffle, ids_restore = _masking_parts(x, mask_ratio, generator)
    return visible, torch.gather(mask, 1, ids_restore), ids_shuffle


def _rm_mask_in_shuffled_order(x, mask_ratio, generator=None):
    visible, mask, _, ids_restore = _masking_parts(x, mask_ratio, generator)
    return visible, mask, ids_restore


def _rm_inverted_mask(x, mask_ratio, generator=None):
    visible, mask, _, ids_restore = _masking_parts(x, mask_ratio, generator)
    return visible, torch.gather(1 - mask, 1, ids_restore), ids_restore


def _rm_keeps_the_masked_count(x, mask_ratio, generator=None):  # K = int(N * mask_ratio)
    return random_masking(x, 1 - mask_ratio, generator)


def _rm_rounds_k(x, mask_ratio, generator=None):  # K = N - int(N * mask_ratio): 3 instead of 2 for N = 10
    B, N, D = x.shape
    ids_shuffle = torch.argsort(torch.rand(B, N, generator=generator), dim=1)
    return _from_shuffle(x, ids_shuffle, N - int(N * mask_ratio))


def _rm_sorted_visible(x, mask_ratio, generator=None):  # keeps the right tokens, in the original order
    B, N, D = x.shape
    _, mask, ids_restore = random_masking(x, mask_ratio, generator)
    keep = (mask == 0).nonzero()[:, 1].reshape(B, -1)
    return torch.gather(x, 1, keep[..., None].expand(-1, -1, D)), mask, ids_restore


def _rm_keeps_largest_noise(x, mask_ratio, generator=None):  # descending argsort: valid, but not MAE's tokens
    B, N, D = x.shape
    ids_shuffle = torch.argsort(torch.rand(B, N, generator=generator), dim=1, descending=True)
    return _from_shuffle(x, ids_shuffle, int(N * (1 - mask_ratio)))


def _rm_bool_mask(x, mask_ratio, generator=None):
    visible, mask, ids_restore = random_masking(x, mask_ratio, generator)
    return visible, mask.bool(), ids_restore


def _rm_two_values(x, mask_ratio, generator=None):
    visible, mask, _ = random_masking(x, mask_ratio, generator)
    return visible, mask


# -- wrong unshuffle --------------------------------------------------------------------------------------


def _un_gathers_with_ids_shuffle(x_visible, mask_token, ids_restore):
    return _unshuffle(x_visible, mask_token, torch.argsort(ids_restore, dim=1))


def _un_mask_tokens_first(x_visible, mask_token, ids_restore):
    B, K, D = x_visible.shape
    x = torch.cat([mask_token.expand(B, ids_restore.shape[1] - K, D), x_visible], dim=1)
    return torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, D))


def _un_zeros_instead_of_the_token(x_visible, mask_token, ids_restore):
    return _unshuffle(x_visible, torch.zeros_like(mask_token), ids_restore)


def _un_detached_token(x_visible, mask_token, ids_restore):
    return _unshuffle(x_visible, mask_token.detach(), ids_restore)


# -- wrong masked_mse -------------------------------------------------------------------------------------


def _mse_all_patches(pred, target, mask, norm_pix=False):
    return (pred - target).pow(2).mean()


def _mse_visible_patches(pred, target, mask, norm_pix=False):
    return mae_loss(pred, target, 1 - mask, norm_pix)


def _mse_divides_by_all(pred, target, mask, norm_pix=False):
    return ((pred - target).pow(2).mean(-1) * mask).sum() / mask.numel()


def _mse_sums_pixels(pred, target, mask, norm_pix=False):
    return ((pred - target).pow(2).sum(-1) * mask).sum() / mask.sum()


def _mse_per_patch(pred, target, mask, norm_pix=False):
    return (pred - target).pow(2).mean(-1) * mask


def _mse_ignores_norm_pix(pred, target, mask, norm_pix=False):
    return mae_loss(pred, target, mask)


def _mse_biased_var(pred, target, mask, norm_pix=False):
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True, unbiased=False) + 1e-6) ** 0.5
    return mae_loss(pred, target, mask)


def _mse_detached(pred, target, mask, norm_pix=False):
    return mae_loss(pred.detach(), target, mask, norm_pix)


WRONG_IMPLEMENTATIONS = [  # (check, a wrong implementation, what its failure message must say)
    ("check_random_masking", _rm_returns_ids_shuffle, r"you returned ids_shuffle; return its inverse"),
    ("check_random_masking", _rm_mask_in_shuffled_order, r"mask in the shuffled order.*gather\(mask, 1, ids_restore\)"),
    ("check_random_masking", _rm_inverted_mask, r"sums to 4, the number of kept tokens.*1 for a removed token"),
    ("check_random_masking", _rm_keeps_the_masked_count, r"x_visible has 12 tokens, the number to remove"),
    ("check_random_masking", _rm_rounds_k, r"= 2 tokens\): expected shape \(3, 2, 5\), got \(3, 3, 5\)"),
    ("check_random_masking", _rm_sorted_visible, r"not in the shuffled order.*do not sort them"),
    ("check_random_masking", _rm_keeps_largest_noise, r"not the reference's for the same generator.*smallest noise"),
    ("check_random_masking", _rm_bool_mask, r"mask has dtype torch.bool; return a float mask"),
    ("check_random_masking", _rm_two_values, r"return a tuple \(x_visible, mask, ids_restore\), got a tuple of 2"),
    ("check_unshuffle", _un_gathers_with_ids_shuffle, r"mask_ratio=0.*Gathering with ids_shuffle"),
    ("check_unshuffle", _un_mask_tokens_first, r"Hint: the mask tokens went first"),
    ("check_unshuffle", _un_zeros_instead_of_the_token, r"the places where mask == 1 must hold mask_token"),
    ("check_unshuffle", _un_detached_token, r"no gradient reaches mask_token"),
    ("check_masked_mse", _mse_all_patches, r"you averaged over all patches, the visible ones included"),
    ("check_masked_mse", _mse_visible_patches, r"you averaged over the visible patches"),
    ("check_masked_mse", _mse_divides_by_all, r"divide by the number of masked ones, mask.sum\(\)"),
    ("check_masked_mse", _mse_sums_pixels, r"you summed each patch's squared errors"),
    ("check_masked_mse", _mse_per_patch, r"expected a scalar, got shape \(4, 16\)"),
    ("check_masked_mse", _mse_ignores_norm_pix, r"norm_pix=True changed nothing"),
    ("check_masked_mse", _mse_biased_var, r"use the unbiased variance"),
    ("check_masked_mse", _mse_detached, r"no gradient reaches pred"),
]


@pytest.mark.parametrize(
    "check, wrong, message", WRONG_IMPLEMENTATIONS, ids=[w.__name__[1:] for _, w, _ in WRONG_IMPLEMENTATIONS]
)
def test_checks_fail_wrong_implementations_with_a_hint(check, wrong, message):
    with pytest.raises(AssertionError, match=message):
        getattr(checks, check)(wrong)
