"""Checks for lesson 08 (SAM): random Fourier features, point and box tokens, the hypernetwork's masks,
the choice by predicted IoU, and the IoU head's target.

Each check runs the student's function on fixed, seeded inputs, compares it with
:mod:`minivfm.models.sam`, prints one deterministic line when it matches, and raises ``AssertionError``
with a hint when it does not. Before giving up with "values differ", a check tries the common mistakes
(a missing 2 pi, coordinates not mapped to [-1, 1], the pixel-centre shift, soft IoU...) and names the
one that reproduces the student's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from minivfm.course.checks import assert_close, assert_tensor, call, fmt_shape, passed
from minivfm.models.sam import (
    best_mask,
    embed_boxes,
    embed_points,
    fourier_features,
    hypernetwork_masks,
    mask_iou_targets,
)

__all__ = [
    "check_fourier_features", "check_embed_points", "check_embed_boxes", "check_hypernetwork_masks",
    "check_best_mask", "check_mask_iou_targets",
]  # fmt: skip


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _diagnose(name: str, actual: Tensor, expected: Tensor, mistakes: dict[str, Tensor], atol: float = 1e-5) -> None:
    """Pass silently if ``actual`` matches ``expected``; else fail naming the first mistake that
    reproduces ``actual`` (or the plain difference)."""
    actual = assert_tensor(name, actual, tuple(expected.shape)).detach().to(expected.dtype)
    if torch.allclose(actual, expected, atol=atol, rtol=1e-4):
        return
    for hint, wrong in mistakes.items():
        if wrong.shape == actual.shape and torch.allclose(actual, wrong.to(actual.dtype), atol=atol, rtol=1e-4):
            raise AssertionError(f"{name}: values differ from the reference. Hint: {hint}")
    assert_close(name, actual, expected, atol=atol)


# -- Fourier features ---------------------------------------------------------------------------------


def _ff(coords: Tensor, G: Tensor, two_pi: float = 2 * math.pi, centre: bool = True, cos_first: bool = False):
    v = 2 * coords - 1 if centre else coords
    proj = two_pi * (v @ G)
    parts = [torch.cos(proj), torch.sin(proj)] if cos_first else [torch.sin(proj), torch.cos(proj)]
    return torch.cat(parts, dim=-1)


def check_fourier_features(fn: Callable) -> None:
    """``fn(coords (..., 2) in [0, 1], gaussian_matrix (2, F)) -> (..., 2F)``."""
    G = torch.randn(2, 6, generator=_g(0))
    coords = torch.rand(3, 5, 2, generator=_g(1))
    out = call("fourier_features", fn, coords.clone(), G.clone())
    expected = fourier_features(coords, G)
    assert_tensor(f"fourier_features (coords {fmt_shape(coords.shape)}, gaussian_matrix (2, 6))", out, expected.shape)
    mistakes = {
        "multiply by 2 pi: sin(2 pi (2v - 1) G)": _ff(coords, G, two_pi=1.0),
        "map the coordinates from [0, 1] to [-1, 1] first: 2 * coords - 1": _ff(coords, G, centre=False),
        "map to [-1, 1] and multiply by 2 pi": _ff(coords, G, two_pi=1.0, centre=False),
        "the sines come first, then the cosines: torch.cat([sin, cos], dim=-1)": _ff(coords, G, cos_first=True),
        "interleaved features: concatenate all the sines, then all the cosines (dim=-1)": torch.stack(
            [torch.sin(2 * math.pi * ((2 * coords - 1) @ G)), torch.cos(2 * math.pi * ((2 * coords - 1) @ G))], -1
        ).flatten(-2),
    }
    _diagnose("fourier_features", out, expected, mistakes)
    # any leading shape
    try:
        flat = call("fourier_features", fn, coords[0, 0].clone(), G.clone())
    except (ValueError, RuntimeError, IndexError, TypeError) as err:
        raise AssertionError(
            f"fourier_features: failed on a single (2,) position ({type(err).__name__}: {err}). Hint: work on the "
            "last dimension only (coords @ gaussian_matrix, torch.cat(..., dim=-1)) so that any leading shape works"
        ) from err
    assert_close("fourier_features of a single (2,) position", flat, expected[0, 0])
    passed("fourier_features", f"shape {fmt_shape(expected.shape)}, values match")


# -- points and boxes ----------------------------------------------------------------------------------


def _point_case():
    g = _g(2)
    G = torch.randn(2, 4, generator=g)
    emb, nap = torch.randn(2, 8, generator=g), torch.randn(8, generator=g)
    points = torch.randint(0, 32, (3, 4, 2), generator=g).float()
    labels = torch.tensor([[1, 0, -1, -1], [1, 1, 0, -1], [0, 1, 1, 0]])
    return points, labels, G, emb, nap


def check_embed_points(fn: Callable) -> None:
    """``fn(points (M, N, 2), labels (M, N), gaussian_matrix, point_embeddings (2, C), not_a_point (C,),
    image_size) -> (M, N, C)``."""
    points, labels, G, emb, nap = _point_case()
    S = 32
    out = call("embed_points", fn, points.clone(), labels.clone(), G.clone(), emb.clone(), nap.clone(), S)
    expected = embed_points(points, labels, G, emb, nap, S)
    assert_tensor(f"embed_points (points {fmt_shape(points.shape)}, C = 8)", out, expected.shape)
    lab = labels[..., None]
    pe = fourier_features((points + 0.5) / S, G)
    mistakes = {
        "a point sits at its pixel's centre: (points + 0.5) / image_size": embed_points(points - 0.5, labels, G, emb,
                                                                                          nap, S),
        "normalise the coordinates to [0, 1]: divide by image_size": torch.where(
            lab == -1, nap, fourier_features(points + 0.5, G)) + (lab == 0) * emb[0] + (lab == 1) * emb[1],
        "a padding point (label -1) is the not_a_point embedding alone: drop its Fourier features":
            pe + (lab == -1) * nap + (lab == 0) * emb[0] + (lab == 1) * emb[1],
        "point_embeddings[0] is for negative points (label 0), point_embeddings[1] for positive ones (label 1)":
            torch.where(lab == -1, nap, pe) + (lab == 1) * emb[0] + (lab == 0) * emb[1],
        "add the label's embedding to the point's Fourier features (do not replace them)":
            torch.where(lab == -1, nap, (lab == 0) * emb[0] + (lab == 1) * emb[1]),
    }  # fmt: skip
    _diagnose("embed_points", out, expected, mistakes)
    passed("embed_points", f"shape {fmt_shape(expected.shape)}, values match (positive, negative, padding)")


def check_embed_boxes(fn: Callable) -> None:
    """``fn(boxes (M, 4), gaussian_matrix, corner_embeddings (2, C), image_size) -> (M, 2, C)``."""
    g = _g(3)
    G, emb = torch.randn(2, 4, generator=g), torch.randn(2, 8, generator=g)
    xy0 = torch.randint(0, 16, (5, 2), generator=g).float()
    boxes = torch.cat([xy0, xy0 + torch.randint(2, 16, (5, 2), generator=g)], dim=1)
    S = 32
    out = call("embed_boxes", fn, boxes.clone(), G.clone(), emb.clone(), S)
    expected = embed_boxes(boxes, G, emb, S)
    assert_tensor(f"embed_boxes (boxes {fmt_shape(boxes.shape)}, C = 8)", out, expected.shape)
    corners = boxes.reshape(-1, 2, 2)
    mistakes = {
        "box coordinates are pixel edges already: do not add 0.5": embed_boxes(boxes + 0.5, G, emb, S),
        "the corners are (x0, y0) and (x1, y1): boxes.reshape(M, 2, 2), not (x0, x1) and (y0, y1)": fourier_features(
            boxes[:, [0, 2, 1, 3]].reshape(-1, 2, 2) / S, G) + emb,
        "corner_embeddings[0] goes to the top-left corner, corner_embeddings[1] to the bottom-right one":
            fourier_features(corners / S, G) + emb.flip(0),
        "normalise the corners to [0, 1]: divide by image_size": fourier_features(corners, G) + emb,
        "each corner gets its own learned embedding, added to its Fourier features": fourier_features(corners / S, G),
    }  # fmt: skip
    _diagnose("embed_boxes", out, expected, mistakes)
    passed("embed_boxes", f"shape {fmt_shape(expected.shape)}, values match")


# -- the decoder's outputs -----------------------------------------------------------------------------


def check_hypernetwork_masks(fn: Callable) -> None:
    """``fn(hyper_in (M, T, Cu), upscaled (M, Cu, H, W)) -> (M, T, H, W)``."""
    g = _g(4)
    hyper, up = torch.randn(2, 4, 5, generator=g), torch.randn(2, 5, 6, 7, generator=g)
    out = call("hypernetwork_masks", fn, hyper.clone(), up.clone())
    expected = hypernetwork_masks(hyper, up)
    if isinstance(out, Tensor) and tuple(out.shape) == (2, 4, 7, 6):
        raise AssertionError(
            "hypernetwork_masks: got shape (2, 4, 7, 6), H and W swapped. Hint: flatten the H x W pixels in their "
            "own order (reshape(M, Cu, H * W)) and reshape the result back to (M, T, H, W)"
        )
    assert_tensor("hypernetwork_masks (hyper_in (2, 4, 5), upscaled (2, 5, 6, 7))", out, expected.shape)
    mistakes = {
        "sum over the channels Cu of hyper_in[m, t] * upscaled[m, :, y, x]; do not pass the logits through a "
        "sigmoid (the loss and the threshold at 0 expect logits)": torch.sigmoid(expected),
    }
    _diagnose("hypernetwork_masks", out, expected, mistakes)
    passed("hypernetwork_masks", f"shape {fmt_shape(expected.shape)}, values match")


def check_best_mask(fn: Callable) -> None:
    """``fn(masks (M, T, H, W), scores (M, T)) -> (chosen (M, H, W), index (M,))``."""
    g = _g(5)
    masks = torch.rand(4, 3, 5, 5, generator=g) > 0.5
    scores = torch.tensor([[0.2, 0.9, 0.1], [0.7, 0.3, 0.6], [0.1, 0.2, 0.95], [0.5, 0.4, 0.45]])
    out = call("best_mask", fn, masks.clone(), scores.clone())
    if not (isinstance(out, tuple) and len(out) == 2):
        raise AssertionError(f"best_mask: return a tuple (chosen masks, index), got {type(out).__name__}")
    chosen, idx = out
    exp_chosen, exp_idx = best_mask(masks, scores)
    assert_tensor("best_mask: index", idx, exp_idx.shape)
    if torch.equal(idx.long(), scores.argmin(1)):
        raise AssertionError("best_mask: you chose the lowest score. Hint: the best mask has the HIGHEST predicted IoU")
    if not torch.equal(idx.long(), exp_idx):
        raise AssertionError(
            f"best_mask: index {idx.tolist()} for scores {scores.tolist()}, expected {exp_idx.tolist()}. Hint: "
            "argmax over the T outputs of each prompt (dim=1)"
        )
    assert_tensor("best_mask: chosen", chosen, exp_chosen.shape)
    if not torch.equal(chosen.bool(), exp_chosen):
        raise AssertionError(
            "best_mask: the chosen masks are not masks[m, index[m]]. Hint: masks[torch.arange(M), index]"
        )
    passed("best_mask", f"index {exp_idx.tolist()}, masks match")


def check_mask_iou_targets(fn: Callable) -> None:
    """``fn(mask_logits (M, T, H, W), target (M, H, W)) -> (M, T)`` IoUs of ``logits > 0`` with the truth."""
    g = _g(6)
    logits = torch.randn(3, 3, 8, 8, generator=g) * 3
    target = torch.rand(3, 8, 8, generator=g) > 0.6
    logits[2, 0] = -5.0  # an empty prediction
    target_e = target.clone()
    target_e[2] = False  # the third prompt: an empty truth, so output 0 is empty against empty
    leaf = logits.clone().requires_grad_(True)
    out = call("mask_iou_targets", fn, leaf, target_e.clone())
    expected = mask_iou_targets(logits, target_e)
    assert_tensor("mask_iou_targets (logits (3, 3, 8, 8), target (3, 8, 8))", out, expected.shape)
    p, t = torch.sigmoid(logits), target_e.float()[:, None]
    soft = (p * t).flatten(2).sum(-1) / (p + t - p * t).flatten(2).sum(-1)
    hard = logits > 0
    inter = (hard & target_e[:, None]).flatten(2).sum(-1).float()
    union = (hard | target_e[:, None]).flatten(2).sum(-1).float()
    half = logits > 0.5
    inter5 = (half & target_e[:, None]).flatten(2).sum(-1).float()
    union5 = (half | target_e[:, None]).flatten(2).sum(-1).float()
    sizes = hard.flatten(2).sum(-1).float() + target_e[:, None].flatten(2).sum(-1).float()
    mistakes = {
        "the target is the IoU of the binary mask (logits > 0) with the truth, not a soft IoU of probabilities": soft,
        "threshold the logits at 0 (probability 0.5), not at 0.5": torch.where(
            union5 > 0, inter5 / union5.clamp_min(1), torch.ones_like(union5)),
        "that is the Dice coefficient 2|A n B| / (|A| + |B|); IoU is |A n B| / |A u B|": torch.where(
            sizes > 0, 2 * inter / sizes.clamp_min(1), torch.ones_like(sizes)),
        "an empty prediction of an empty truth is perfect: IoU 1 where the union is empty (not 0)": torch.where(
            union > 0, inter / union.clamp_min(1), torch.zeros_like(union)),
    }  # fmt: skip
    _diagnose("mask_iou_targets", out, expected, mistakes)
    if out.requires_grad:
        raise AssertionError(
            "mask_iou_targets: the result carries a gradient. Hint: it is a target for the IoU head, a constant: "
            "compute it from mask_logits.detach() (thresholding cuts the gradient anyway; keep it explicit)"
        )
    passed("mask_iou_targets", f"shape {fmt_shape(expected.shape)}, values match (an empty pair counts 1)")
