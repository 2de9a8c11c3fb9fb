"""Pictures: image grids, mask overlays, attention maps, training curves.

Every function returns a matplotlib ``Figure`` and, given ``path=``, also writes
it to a PNG, so each figure a lesson shows can be looked at without Jupyter.
Images are batch-first tensors ``(B, C, H, W)`` in ``[-1, 1]`` (the data sets'
convention) or ``[0, 1]`` with ``value_range=(0, 1)``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = [
    "attention_maps",
    "image_grid",
    "mask_overlay",
    "prompt_masks",
    "save_figure",
    "to_numpy_images",
    "training_curves",
]

# Distinct colours for instance ids 1..K (0 = background stays transparent).
_PALETTE = np.array(
    [
        [0.90, 0.10, 0.29],
        [0.24, 0.71, 0.29],
        [0.26, 0.39, 0.85],
        [1.00, 0.88, 0.10],
        [0.57, 0.12, 0.71],
        [0.27, 0.94, 0.94],
        [0.96, 0.51, 0.19],
        [0.94, 0.20, 0.90],
    ]
)


def save_figure(fig: Figure, path: str | os.PathLike | None, dpi: int = 120) -> Figure:
    """Write ``fig`` to ``path`` (a PNG; parent folders are created) and return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def to_numpy_images(images: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)):
    """``(B, C, H, W)`` or ``(C, H, W)`` tensor -> ``(B, H, W, C)`` float array in ``[0, 1]``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images: expected shape (B, C, H, W) with C in (1, 3), got {tuple(images.shape)}"
        )
    lo, hi = value_range
    x = (images.detach().float().cpu() - lo) / (hi - lo)
    x = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def _grid_axes(n: int, nrow: int, cell: float = 1.3, title: str | None = None):
    if n < 1:
        raise ValueError("images: expected at least one image")
    if nrow < 1:
        raise ValueError(f"nrow: expected a positive number of columns, got {nrow}")
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrows, ncol, figsize=(cell * ncol, cell * nrows + (0.4 if title else 0)))
    axes = np.atleast_1d(axes).reshape(-1)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig, axes


def image_grid(
    images: torch.Tensor,
    nrow: int = 8,
    titles: Sequence[str] | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    title_colors: Sequence[str] | None = None,
) -> Figure:
    """Show ``images`` ``(B, C, H, W)`` in a grid of ``nrow`` columns, with optional titles."""
    arr = to_numpy_images(images, value_range)
    if titles is not None and len(titles) != len(arr):
        raise ValueError(f"titles: expected {len(arr)} titles, one per image, got {len(titles)}")
    fig, axes = _grid_axes(len(arr), nrow, title=title)
    for i, img in enumerate(arr):
        axes[i].imshow(img, interpolation="nearest")
        if titles is not None:
            color = title_colors[i] if title_colors is not None else "black"
            axes[i].set_title(str(titles[i]), fontsize=7, color=color)
    fig.tight_layout()
    return save_figure(fig, path)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines)


def mask_overlay(
    images: torch.Tensor,
    masks: torch.Tensor,
    boxes: Sequence[torch.Tensor] | None = None,
    captions: Sequence[str] | None = None,
    nrow: int = 4,
    alpha: float = 0.45,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Figure:
    """Overlay instance ``masks`` ``(B, H, W)`` (0 = background) and ``boxes`` on ``images``."""
    arr = to_numpy_images(images, value_range)
    masks = torch.as_tensor(masks)
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.shape[0] != arr.shape[0] or tuple(masks.shape[1:]) != arr.shape[1:3]:
        raise ValueError(
            f"masks: expected shape {(arr.shape[0], *arr.shape[1:3])} to match the images, "
            f"got {tuple(masks.shape)}"
        )
    fig, axes = _grid_axes(len(arr), nrow, cell=2.0, title=title)
    for i, img in enumerate(arr):
        m = masks[i].cpu().numpy().astype(int)
        over = img.copy()
        for k in np.unique(m):
            if k == 0:
                continue
            sel = m == k
            over[sel] = (1 - alpha) * over[sel] + alpha * _PALETTE[(k - 1) % len(_PALETTE)]
        axes[i].imshow(over, interpolation="nearest")
        if boxes is not None:
            for k, (x0, y0, x1, y1) in enumerate(torch.as_tensor(boxes[i]).tolist()):
                rect = plt.Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2,
                    edgecolor=_PALETTE[k % len(_PALETTE)],
                )
                axes[i].add_patch(rect)
        if captions is not None:
            axes[i].set_title(_wrap(captions[i]), fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def prompt_masks(
    images: torch.Tensor,
    masks: torch.Tensor,
    points: Sequence[torch.Tensor] | torch.Tensor | None = None,
    point_labels: Sequence[torch.Tensor] | torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    titles: Sequence[str] | None = None,
    nrow: int = 6,
    alpha: float = 0.6,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Figure:
    """One binary mask per panel (outlined in white, the outside darkened by ``alpha``) with the prompt
    that asked for it: points (``(N, 2)`` pixel coordinates ``x, y`` per panel; label 1 a green star, 0 a
    red cross, -1 not drawn) and boxes (``(4,)`` ``x0, y0, x1, y1`` pixel edges per panel, NaN for none),
    as promptable segmentation shows them.

    Arguments:
        images: ``(B, C, H, W)``; masks: ``(B, H, W)`` bool (or 0/1).
        points, point_labels: ``B`` tensors ``(N, 2)`` and ``(N,)`` (or stacked ``(B, N, 2)``, ``(B, N)``).
        boxes: ``(B, 4)``.
        titles: one per panel (a score, say).
    """
    arr = to_numpy_images(images, value_range)
    masks = torch.as_tensor(masks).detach().cpu()
    if masks.ndim != 3 or masks.shape[0] != len(arr) or tuple(masks.shape[1:]) != arr.shape[1:3]:
        raise ValueError(
            f"masks: expected shape {(len(arr), *arr.shape[1:3])} to match the images, got {tuple(masks.shape)}"
        )
    for name, value in (("points", points), ("point_labels", point_labels), ("boxes", boxes), ("titles", titles)):
        if value is not None and len(value) != len(arr):
            raise ValueError(f"{name}: expected one entry per image ({len(arr)}), got {len(value)}")
    fig, axes = _grid_axes(len(arr), nrow, cell=1.6, title=title)
    for i, img in enumerate(arr):
        sel = masks[i].bool().numpy()
        over = img.copy()
        over[~sel] *= 1 - alpha  # outside the mask darkened, whatever the colours of the shapes
        axes[i].imshow(over, interpolation="nearest")
        if sel.any() and not sel.all():
            axes[i].contour(sel.astype(float), levels=[0.5], colors="white", linewidths=0.9)
        if boxes is not None and not torch.isnan(torch.as_tensor(boxes[i]).float()).any():
            x0, y0, x1, y1 = torch.as_tensor(boxes[i]).float().tolist()
            axes[i].add_patch(
                plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2, edgecolor="lime")
            )
        if points is not None:
            pts = torch.as_tensor(points[i]).float().reshape(-1, 2).tolist()
            labs = torch.ones(len(pts)) if point_labels is None else torch.as_tensor(point_labels[i]).reshape(-1)
            for (x, y), lab in zip(pts, labs.tolist()):
                if lab == 1:
                    axes[i].plot(x, y, marker="*", ms=9, color="lime", markeredgecolor="black", mew=0.6)
                elif lab == 0:
                    axes[i].plot(x, y, marker="X", ms=7, color="red", markeredgecolor="black", mew=0.6)
        if titles is not None:
            axes[i].set_title(str(titles[i]), fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def attention_maps(
    images: torch.Tensor,
    attentions: torch.Tensor,
    patch_size: int,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Figure:
    """Class-token attention of each head, as heat maps beside each image.

    Arguments:
        images: ``(B, C, H, W)``.
        attentions: ``(B, heads, 1 + N, 1 + N)`` weights of one layer, class token first.
        patch_size: the ViT's patch size, so ``N = (H / P) * (W / P)``.
    Returns:
        a figure with one row per image: the image, then one map per head.
    """
    arr = to_numpy_images(images, value_range)
    attentions = torch.as_tensor(attentions).detach().float().cpu()
    if attentions.ndim != 4 or attentions.shape[0] != len(arr):
        raise ValueError(
            f"attentions: expected shape (B={len(arr)}, heads, 1 + N, 1 + N), got {tuple(attentions.shape)}"
        )
    gh, gw = arr.shape[1] // patch_size, arr.shape[2] // patch_size
    if attentions.shape[-1] != 1 + gh * gw:
        raise ValueError(
            f"attentions: last dim {attentions.shape[-1]} != 1 + {gh}*{gw} patches for patch_size={patch_size}"
        )
    heads = attentions.shape[1]
    cls_attn = attentions[:, :, 0, 1:].reshape(len(arr), heads, gh, gw)
    fig, axes = plt.subplots(len(arr), heads + 1, figsize=(1.4 * (heads + 1), 1.4 * len(arr) + 0.3))
    axes = np.atleast_2d(axes).reshape(len(arr), heads + 1)
    for i, img in enumerate(arr):
        axes[i, 0].imshow(img, interpolation="nearest")
        for h in range(heads):
            axes[i, h + 1].imshow(img, interpolation="nearest")
            heat = cls_attn[i, h].numpy()
            heat = (heat - heat.min()) / (np.ptp(heat) + 1e-8)
            axes[i, h + 1].imshow(
                heat, cmap="inferno", alpha=0.6, interpolation="bilinear",
                extent=(-0.5, arr.shape[2] - 0.5, arr.shape[1] - 0.5, -0.5),
            )
            if i == 0:
                axes[i, h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """Lightning ``CSVLogger`` metrics.csv -> ``{name: [(step, value), ...]}``."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step") or row.get("epoch") or "0"
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(key, []).append((float(step), float(value)))
    return series


def training_curves(
    metrics: str | os.PathLike | Mapping[str, Sequence[float]],
    keys: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Plot training curves, one panel per metric family (``loss``, ``acc``...).

    Arguments:
        metrics: a Lightning ``CSVLogger`` ``metrics.csv`` path (or its log dir), or
            ``{name: values}`` with one value per step.
        keys: which metrics to plot; default all.
    """
    if isinstance(metrics, (str, os.PathLike)):
        p = Path(metrics)
        if p.is_dir():
            p = p / "metrics.csv"
        if not p.exists():
            raise FileNotFoundError(f"metrics: no metrics.csv at {p}")
        series = _read_metrics_csv(p)
    elif isinstance(metrics, Mapping):
        series = {k: list(enumerate(map(float, v))) for k, v in metrics.items()}
    else:
        raise TypeError(f"metrics: expected a metrics.csv path or a dict of lists, got {type(metrics).__name__}")
    if keys is not None:
        missing = [k for k in keys if k not in series]
        if missing:
            raise KeyError(f"keys: {missing} not among the logged metrics {sorted(series)}")
        series = {k: series[k] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError("metrics: nothing to plot")
    # Group by the metric's last name part: train/loss and val/loss share a panel.
    groups: dict[str, list[str]] = {}
    for k in series:
        groups.setdefault(k.replace("_epoch", "").replace("_step", "").split("/")[-1], []).append(k)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 2.8), squeeze=False)
    for ax, (name, ks) in zip(axes[0], groups.items()):
        for k in ks:
            xs, ys = zip(*series[k])
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
