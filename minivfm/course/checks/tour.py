"""Checks for lesson 00 (tour): small functions on Shapes images and masks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from minivfm.course.checks import assert_close, call, check_close, fmt_shape, passed


def _random_masks(batch: int = 4, size: int = 16, max_id: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for k in range(1, max_id + 1):
            if b == 0 and k == max_id:
                continue  # one image misses an instance: its area and box must be zero
            x0, y0 = torch.randint(0, size - 4, (2,), generator=g).tolist()
            w, h = torch.randint(2, 6, (2,), generator=g).tolist()
            masks[b, y0 : y0 + h, x0 : x0 + w] = k
    return masks


def reference_instance_areas(mask: torch.Tensor, num_instances: int) -> torch.Tensor:
    ids = torch.arange(1, num_instances + 1)
    return (mask.unsqueeze(1) == ids.view(1, -1, 1, 1)).sum(dim=(2, 3))  # (B, K)


def reference_mask_to_boxes(mask: torch.Tensor, num_instances: int) -> torch.Tensor:
    boxes = torch.zeros(mask.shape[0], num_instances, 4)
    for b in range(mask.shape[0]):
        for k in range(1, num_instances + 1):
            ys, xs = torch.nonzero(mask[b] == k, as_tuple=True)
            if len(xs):
                boxes[b, k - 1] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float)
    return boxes  # (B, K, 4)


def check_to_unit_range(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = call("to_unit_range", fn, x.clone())
    check_close("to_unit_range", out, (x + 1) / 2, hint="[-1, 1] -> [0, 1] is x -> (x + 1) / 2")


def check_instance_areas(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    mask = _random_masks()
    out = call("instance_areas", fn, mask.clone(), 3)
    expected = reference_instance_areas(mask, 3)
    assert_close(
        "instance_areas", out, expected.float(), atol=0,
        hint="count the pixels equal to each id 1..K; id 0 is the background and has no column",
    )
    passed("instance_areas", f"shape {fmt_shape(expected.shape)}, values match")


def check_mask_to_boxes(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    from minivfm.data import Shapes

    mask = _random_masks(seed=1)
    out = call("mask_to_boxes", fn, mask.clone(), 3)
    check_close(
        "mask_to_boxes", out, reference_mask_to_boxes(mask, 3), atol=0,
        hint="x0, y0 are the smallest column and row; x1, y1 are the largest plus one; all zeros if absent",
    )
    # And it reproduces the data set's own boxes.
    ds = Shapes(num_samples=4, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        k = len(item["boxes"])
        got = call("mask_to_boxes", fn, item["mask"][None], k)[0]
        assert_close(f"mask_to_boxes on Shapes item {i}", got, item["boxes"], atol=0)
    passed("mask_to_boxes", "matches the boxes of 4 Shapes items")
