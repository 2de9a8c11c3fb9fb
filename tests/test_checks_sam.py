"""Lesson 08's checks (minivfm.course.checks.sam): they pass the library's functions, fail the untouched
stubs, and fail common wrong implementations with a hint that names the mistake."""

from __future__ import annotations

import math

import pytest
import torch

from minivfm.course.checks import sam as checks
from minivfm.models.sam import (
    best_mask,
    embed_boxes,
    embed_points,
    fourier_features,
    hypernetwork_masks,
    mask_iou_targets,
)

LIBRARY = {
    "check_fourier_features": fourier_features,
    "check_embed_points": embed_points,
    "check_embed_boxes": embed_boxes,
    "check_hypernetwork_masks": hypernetwork_masks,
    "check_best_mask": best_mask,
    "check_mask_iou_targets": mask_iou_targets,
}


def test_checks_pass_the_library(capsys):
    for name, fn in LIBRARY.items():
        getattr(checks, name)(fn)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(LIBRARY) and all(line.startswith("✓ ") for line in lines), lines


def _stub(*args, **kwargs):
    raise NotImplementedError()


@pytest.mark.parametrize("check", sorted(LIBRARY))
def test_checks_fail_the_stub(check):
    with pytest.raises(AssertionError, match="not implemented yet; fill in the exercise cell above"):
        getattr(checks, check)(_stub)


# -- wrong implementations ------------------------------------------------------------------------------


def _ff_no_2pi(coords, G):
    proj = (2 * coords - 1) @ G
    return torch.cat([torch.sin(proj), torch.cos(proj)], -1)


def _ff_not_centred(coords, G):
    proj = 2 * math.pi * coords @ G
    return torch.cat([torch.sin(proj), torch.cos(proj)], -1)


def _ff_cos_first(coords, G):
    proj = 2 * math.pi * ((2 * coords - 1) @ G)
    return torch.cat([torch.cos(proj), torch.sin(proj)], -1)


def _ff_interleaved(coords, G):
    proj = 2 * math.pi * ((2 * coords - 1) @ G)
    return torch.stack([torch.sin(proj), torch.cos(proj)], -1).flatten(-2)


def _ff_only_sin(coords, G):
    return torch.sin(2 * math.pi * ((2 * coords - 1) @ G))


def _ff_batch_only(coords, G):  # works for (B, N, 2) only
    B, N, _ = coords.shape
    return fourier_features(coords, G).reshape(B, N, -1)


def _pts_no_shift(points, labels, G, emb, nap, size):
    return embed_points(points - 0.5, labels, G, emb, nap, size)


def _pts_not_normalised(points, labels, G, emb, nap, size):
    lab = labels[..., None]
    pe = fourier_features(points + 0.5, G)
    return torch.where(lab == -1, nap, pe) + (lab == 0) * emb[0] + (lab == 1) * emb[1]


def _pts_pad_keeps_pe(points, labels, G, emb, nap, size):
    lab = labels[..., None]
    pe = fourier_features((points + 0.5) / size, G)
    return pe + (lab == -1) * nap + (lab == 0) * emb[0] + (lab == 1) * emb[1]


def _pts_labels_swapped(points, labels, G, emb, nap, size):
    return embed_points(points, labels, G, emb.flip(0), nap, size)


def _pts_replace(points, labels, G, emb, nap, size):
    lab = labels[..., None]
    return torch.where(lab == -1, nap, (lab == 0) * emb[0] + (lab == 1) * emb[1])


def _box_shift(boxes, G, emb, size):
    return embed_boxes(boxes + 0.5, G, emb, size)


def _box_wrong_pairs(boxes, G, emb, size):
    return fourier_features(boxes[:, [0, 2, 1, 3]].reshape(-1, 2, 2) / size, G) + emb


def _box_corners_swapped(boxes, G, emb, size):
    return embed_boxes(boxes, G, emb.flip(0), size)


def _box_no_embedding(boxes, G, emb, size):
    return fourier_features(boxes.reshape(-1, 2, 2) / size, G)


def _box_flat(boxes, G, emb, size):  # (M, 2C): the corners side by side
    return embed_boxes(boxes, G, emb, size).flatten(1)


def _hyper_sigmoid(hyper, up):
    return torch.sigmoid(hypernetwork_masks(hyper, up))


def _hyper_swapped_hw(hyper, up):
    M, C, H, W = up.shape
    return (hyper @ up.transpose(2, 3).reshape(M, C, H * W)).reshape(M, -1, W, H)


def _hyper_sum_channels_only(hyper, up):  # ignores the weights
    return up.sum(1, keepdim=True).expand(-1, hyper.shape[1], -1, -1)


def _best_argmin(masks, scores):
    idx = scores.argmin(1)
    return masks[torch.arange(len(masks)), idx], idx


def _best_wrong_dim(masks, scores):  # the best prompt per output, not the best output per prompt
    return masks[:, 0], scores.argmax(0)


def _best_second_highest(masks, scores):
    idx = scores.argsort(1)[:, 1]
    return masks[torch.arange(len(masks)), idx], idx


def _best_first_mask(masks, scores):
    return masks[:, 0], scores.argmax(1)


def _iou_soft(logits, target):
    p, t = torch.sigmoid(logits), target.float()[:, None]
    return (p * t).flatten(2).sum(-1) / (p + t - p * t).flatten(2).sum(-1)


def _iou_half(logits, target):
    return mask_iou_targets(logits - 0.5, target)


def _iou_dice(logits, target):
    pred, gt = logits > 0, target.bool()[:, None]
    inter = (pred & gt).flatten(2).sum(-1).float()
    sizes = pred.flatten(2).sum(-1) + gt.flatten(2).sum(-1)
    return torch.where(sizes > 0, 2 * inter / sizes.clamp_min(1), torch.ones_like(inter))


def _iou_empty_zero(logits, target):
    pred, gt = logits > 0, target.bool()[:, None]
    inter = (pred & gt).flatten(2).sum(-1).float()
    union = (pred | gt).flatten(2).sum(-1).float()
    return inter / union.clamp_min(1)


def _iou_no_broadcast(logits, target):  # the truth compared with output 0 only
    return mask_iou_targets(logits[:, :1], target).expand(-1, logits.shape[1])


WRONG = [
    ("check_fourier_features", _ff_no_2pi, "2 pi"),
    ("check_fourier_features", _ff_not_centred, r"\[-1, 1\]"),
    ("check_fourier_features", _ff_cos_first, "sines come first"),
    ("check_fourier_features", _ff_interleaved, "interleaved"),
    ("check_fourier_features", _ff_only_sin, r"expected shape \(3, 5, 12\)"),
    ("check_fourier_features", _ff_batch_only, "single"),
    ("check_embed_points", _pts_no_shift, "pixel's centre"),
    ("check_embed_points", _pts_not_normalised, "divide by image_size"),
    ("check_embed_points", _pts_pad_keeps_pe, "padding point"),
    ("check_embed_points", _pts_labels_swapped, "negative points"),
    ("check_embed_points", _pts_replace, "do not replace"),
    ("check_embed_boxes", _box_shift, "do not add 0.5"),
    ("check_embed_boxes", _box_wrong_pairs, r"reshape\(M, 2, 2\)"),
    ("check_embed_boxes", _box_corners_swapped, "top-left"),
    ("check_embed_boxes", _box_no_embedding, "own learned embedding"),
    ("check_embed_boxes", _box_flat, r"expected shape \(5, 2, 8\)"),
    ("check_hypernetwork_masks", _hyper_sigmoid, "sigmoid"),
    ("check_hypernetwork_masks", _hyper_swapped_hw, "H and W swapped"),
    ("check_hypernetwork_masks", _hyper_sum_channels_only, "values differ"),
    ("check_best_mask", _best_argmin, "HIGHEST"),
    ("check_best_mask", _best_wrong_dim, r"expected shape \(4\)"),
    ("check_best_mask", _best_second_highest, "dim=1"),
    ("check_best_mask", _best_first_mask, r"masks\[torch.arange\(M\), index\]"),
    ("check_mask_iou_targets", _iou_soft, "soft IoU"),
    ("check_mask_iou_targets", _iou_half, "not at 0.5"),
    ("check_mask_iou_targets", _iou_dice, "Dice"),
    ("check_mask_iou_targets", _iou_empty_zero, "IoU 1 where the union is empty"),
    ("check_mask_iou_targets", _iou_no_broadcast, "values differ"),
]


@pytest.mark.parametrize("check, fn, hint", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_checks_fail_wrong_implementations_with_a_hint(check, fn, hint):
    with pytest.raises(AssertionError, match=hint):
        getattr(checks, check)(fn)
