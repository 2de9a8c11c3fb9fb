"""Shapes: the procedural data set behind every lesson.

Each image holds 1 to 3 coloured shapes (circle, square, triangle) at random
size, position and rotation on a noisy or textured background, with a class
label (shape and colour of the largest shape), a caption that names every
shape, instance masks and boxes. One data set serves generation,
classification, self-supervision, image-text pairs and promptable segmentation.

How it stays fast and deterministic:

- every random number is a hash of ``(seed, index, slot)`` (splitmix64 in
  numpy), so item ``i`` is the same in any process, DataLoader worker, batch
  or chunk, and no global RNG state is read or changed;
- a batch of items is rendered at once in torch over the pixel grid with
  signed distances (circle, rotated square, rotated triangle) and a one-pixel
  anti-aliasing ramp; only exactly rounded operations (+, -, *, /, sqrt, min,
  max, table look-ups) touch the per-item numbers, so an item comes out
  bit-identical whatever batch it is rendered in;
- the DataLoader path (``__getitems__``) renders each requested batch at once;
  single-item access renders and caches aligned chunks.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from minivfm.data._common import check_choice, check_index, check_int, check_names

# --- vocabulary -----------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
RGB = {  # the palette, RGB in [0, 1]
    "red": (0.90, 0.13, 0.13),
    "green": (0.15, 0.72, 0.22),
    "blue": (0.16, 0.36, 0.96),
    "yellow": (0.96, 0.86, 0.16),
    "purple": (0.62, 0.26, 0.88),
    "cyan": (0.12, 0.82, 0.86),
}
COLORS = tuple(RGB)
DEFAULT_COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "medium", "large")
# sqrt(area) / image side, per size; the areas of neighbouring sizes differ by 1.5x or more
SIZE_RANGES = ((0.14, 0.17), (0.22, 0.26), (0.32, 0.38))
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)  # fmt: skip
BACKGROUNDS = ("noise", "texture", "plain")
VOCAB = ("a", "and", "at", "in", "on", "the", *SIZES, *COLORS, *SHAPES, "top", "bottom", "left", "right", "center")

# --- geometry, in units of s = sqrt(area) -------------------------------------------------------

_CIRCLE_R = 1.0 / math.sqrt(math.pi)  # circle radius
_INRADIUS = (0.0, 0.5, 0.5 * math.sqrt(4.0 / (3.0 * math.sqrt(3.0))))  # square half side, triangle R/2
_BOUND = (_CIRCLE_R, math.sqrt(0.5), math.sqrt(4.0 / (3.0 * math.sqrt(3.0))))  # circumradius
_SPACING = (_CIRCLE_R, 0.62, 0.68)  # radius used to keep shapes apart (between in- and circumradius)
_NUM_ANGLES = 1536  # rotation table (divisible by 3 and 4); look-ups keep rendering exact
_ANGLE_TABLE = np.stack([np.cos(2 * np.pi * np.arange(_NUM_ANGLES) / _NUM_ANGLES),
                         np.sin(2 * np.pi * np.arange(_NUM_ANGLES) / _NUM_ANGLES)], 1)  # fmt: skip
_PLACEMENT_TRIES = 16
_RENDER_ELEMENTS = 2**20  # pixels x shapes per rendering step (bounds the memory of a large batch)

# --- counter-based random numbers ---------------------------------------------------------------

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64_int(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform(seed: int, stream: int, index: np.ndarray, n: int) -> np.ndarray:
    """``(B, n)`` float64 uniforms in [0, 1): a pure function of (seed, stream, index, column)."""
    key = _mix64_int(_mix64_int(seed) + stream * _GOLDEN)
    row = _mix64(np.uint64(key) + index.astype(np.uint64)[:, None] * np.uint64(_GOLDEN))
    z = _mix64(row + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN))[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _index_array(indices: Iterable[int], length: int) -> np.ndarray:
    """Indices as an int64 array, checked like ``check_index`` but vectorised."""
    if isinstance(indices, range):
        index = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
    else:
        index = np.asarray(indices.numpy() if isinstance(indices, torch.Tensor) else list(indices))
    if index.size == 0:
        return np.zeros(0, dtype=np.int64)
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise TypeError(f"indices must be a sequence of ints, got {index.dtype} array of shape {index.shape}")
    bad = (index < -length) | (index >= length)
    if bad.any():
        raise IndexError(f"index {index[bad][0]} is out of range for a data set of {length} items")
    return np.where(index < 0, index + length, index).astype(np.int64)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Render on one thread: these small element-wise ops gain little from more, and on a busy
    machine the idle threads of the pool spin and slow everything down (5x measured on 2 cores)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Shapes(Dataset):
    """Procedural images of coloured shapes, with labels, captions, masks and boxes.

    Item ``i`` is a dict:

    - ``image``: float32 ``(3, H, W)`` in ``[-1, 1]``;
    - ``label``: int, the class (``class_names``, e.g. ``"red circle"``) of the largest shape;
    - ``caption``: str naming every shape, e.g. ``"a large red circle at the top left and
      a small blue square at the bottom"``; shapes are named in instance-id order;
    - ``mask``: long ``(H, W)``, instance ids, 0 = background, 1..K; id 1 is the largest
      shape (the labelled one), ids go by decreasing size, smaller shapes are drawn on top;
    - ``boxes``: float32 ``(K, 4)``, ``x0, y0, x1, y1`` in pixels (pixel ``j`` spans
      ``[j, j + 1)``), row ``i`` tight around the mask of instance ``i + 1``.

    Item ``i`` depends only on ``(seed, i)`` and the options, not on ``num_samples``,
    the process, the DataLoader worker or the batch it is rendered in. The same
    scene comes out at every ``image_size`` (only the noise texture differs).

    Arguments:
        num_samples: number of items.
        image_size: height and width in pixels (>= 8).
        seed: any int; a different seed gives different items.
        min_shapes: fewest shapes in an image (>= 1).
        max_shapes: most shapes in an image (>= min_shapes, <= 3 keeps them apart).
        colors: colour names from ``COLORS``; ``None`` means ``DEFAULT_COLORS``.
        shapes: shape names from ``SHAPES``; ``None`` means all.
        background: ``"noise"`` (smooth and pixel noise on a gradient), ``"texture"``
            (stripes or checks plus pixel noise) or ``"plain"`` (flat colour, no noise).
    """

    SHAPES = SHAPES
    COLORS = COLORS
    RGB = RGB
    DEFAULT_COLORS = DEFAULT_COLORS
    SIZES = SIZES
    POSITIONS = POSITIONS
    POSITION_PHRASES = POSITION_PHRASES
    BACKGROUNDS = BACKGROUNDS
    vocab = VOCAB

    def __init__(
        self,
        num_samples: int = 10_000,
        image_size: int = 32,
        seed: int = 0,
        min_shapes: int = 1,
        max_shapes: int = 3,
        colors: Sequence[str] | None = None,
        shapes: Sequence[str] | None = None,
        background: str = "noise",
    ) -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.image_size = check_int("image_size", image_size, minimum=8)
        self.seed = check_int("seed", seed)
        self.min_shapes = check_int("min_shapes", min_shapes, minimum=1)
        self.max_shapes = check_int("max_shapes", max_shapes, minimum=1)
        if self.max_shapes < self.min_shapes:
            raise ValueError(f"max_shapes must be >= min_shapes={self.min_shapes}, got {self.max_shapes}")
        if self.max_shapes > 8:
            raise ValueError(f"max_shapes must be <= 8 (shapes must stay visible), got {self.max_shapes}")
        self.colors = DEFAULT_COLORS if colors is None else check_names("colors", colors, COLORS, "colour")
        self.shapes = SHAPES if shapes is None else check_names("shapes", shapes, SHAPES, "shape")
        self.background = check_choice("background", background, BACKGROUNDS)
        self.class_names = tuple(f"{c} {s}" for s in self.shapes for c in self.colors)
        self.num_classes = len(self.class_names)
        self.in_channels = 3
        size = self.image_size
        self._chunk = int(min(256, max(8, 2**18 // (size * size))))
        chunk_bytes = self._chunk * size * size * (3 * 4 + 8)
        self._max_chunks = max(1, (64 << 20) // chunk_bytes)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._banks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._num_tiles = max(2, min(16, 2**22 // (3 * 4 * size * size)))

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"Shapes(num_samples={self.num_samples}, image_size={self.image_size}, seed={self.seed}, "
            f"min_shapes={self.min_shapes}, max_shapes={self.max_shapes}, colors={list(self.colors)}, "
            f"shapes={list(self.shapes)}, background={self.background!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # workers rebuild what they need
        state["_banks"] = None
        return state

    # --- access -------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, self.num_samples)
        chunk_id, offset = divmod(index, self._chunk)
        chunk = self._cache.get(chunk_id)
        if chunk is None:
            start = chunk_id * self._chunk
            chunk = self.get_batch(range(start, min(start + self._chunk, self.num_samples)))
            self._cache[chunk_id] = chunk
            while len(self._cache) > self._max_chunks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(chunk_id)
        return {
            "image": chunk["image"][offset].clone(),
            "label": int(chunk["label"][offset]),
            "caption": chunk["caption"][offset],
            "mask": chunk["mask"][offset].clone(),
            "boxes": chunk["boxes"][offset].clone(),
        }

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Items for a list of indices, rendered as one batch (the DataLoader's fast path)."""
        batch = self.get_batch(indices)
        labels = batch["label"].tolist()
        return [
            {
                "image": batch["image"][i],
                "label": labels[i],
                "caption": batch["caption"][i],
                "mask": batch["mask"][i],
                "boxes": batch["boxes"][i],
            }
            for i in range(len(labels))
        ]

    def get_batch(self, indices: Iterable[int]) -> dict[str, Any]:
        """Render items straight into a batch, as ``collate`` would return it.

        Arguments:
            indices: item indices (ints, negative counts from the end).

        Returns:
            dict: ``image`` ``(B, 3, H, W)``, ``label`` ``(B,)``, ``caption`` list of B str,
            ``mask`` ``(B, H, W)``, ``boxes`` list of B ``(K_i, 4)``.
        """
        index = _index_array(indices, self.num_samples)
        with _one_thread():
            return self._get_batch(index)

    def _get_batch(self, index: np.ndarray) -> dict[str, Any]:
        scene = self._scene(index)
        size = self.image_size
        step = max(1, _RENDER_ELEMENTS // (self.max_shapes * size * size))
        images, masks, boxes = [], [], []
        for start in range(0, len(index), step):
            part = {k: v[start : start + step] for k, v in scene.items()}
            image, mask, box = self._render(part)
            images.append(image)
            masks.append(mask)
            boxes.append(box)
        count = scene["count"].tolist()
        image = torch.cat(images) if images else torch.zeros(0, 3, size, size)
        mask = torch.cat(masks) if masks else torch.zeros(0, size, size, dtype=torch.long)
        box = torch.cat(boxes) if boxes else torch.zeros(0, self.max_shapes, 4)
        return {
            "image": image,
            "label": torch.from_numpy(scene["label"].copy()),
            "caption": [self._caption(scene, b) for b in range(len(index))],
            "mask": mask,
            "boxes": [box[b, : count[b]] for b in range(len(index))],
        }

    def describe(self, index: int) -> list[dict[str, Any]]:
        """The shapes of item ``index``, one dict per instance id (1, 2, ...).

        Each dict has ``id``, ``shape``, ``color``, ``size`` (a word in ``SIZES``),
        ``position`` (a word in ``POSITIONS``), ``center`` ``(x, y)`` in pixels
        (a good point prompt), ``scale`` (sqrt of the area, in pixels) and ``angle``
        (radians).
        """
        index = check_index(index, self.num_samples)
        scene = self._scene(np.array([index], dtype=np.int64))
        size = self.image_size
        out = []
        for k in range(int(scene["count"][0])):
            out.append(
                {
                    "id": k + 1,
                    "shape": self.shapes[scene["shape"][0, k]],
                    "color": self.colors[scene["color"][0, k]],
                    "size": SIZES[scene["size"][0, k]],
                    "position": POSITIONS[scene["position"][0, k]],
                    "center": (float(scene["cx"][0, k] * size), float(scene["cy"][0, k] * size)),
                    "scale": float(scene["s"][0, k] * size),
                    "angle": float(2 * math.pi * scene["angle"][0, k] / _NUM_ANGLES),
                }
            )
        return out

    # --- the scene: every random choice, as numpy arrays -------------------------------------

    def _scene(self, index: np.ndarray) -> dict[str, np.ndarray]:
        B, K, T = len(index), self.max_shapes, _PLACEMENT_TRIES
        u_bg = _uniform(self.seed, 1, index, 19)
        u = _uniform(self.seed, 2, index, 8 * K).reshape(B, K, 8)
        u_pos = _uniform(self.seed, 3, index, 2 * T * K).reshape(B, K, T, 2)

        spread = self.max_shapes - self.min_shapes + 1
        count = self.min_shapes + np.minimum((u_bg[:, 0] * spread).astype(np.int64), spread - 1)
        active = np.arange(K)[None, :] < count[:, None]  # (B, K)
        shape = np.minimum((u[..., 0] * len(self.shapes)).astype(np.int64), len(self.shapes) - 1)
        color = np.minimum((u[..., 1] * len(self.colors)).astype(np.int64), len(self.colors) - 1)
        # the first shape is medium or large; the others are strictly smaller than it
        size = np.empty((B, K), dtype=np.int64)
        size[:, 0] = 1 + (u[:, 0, 2] >= 0.5)
        size[:, 1:] = np.minimum((u[:, 1:, 2] * size[:, :1]).astype(np.int64), size[:, :1] - 1)
        lo, hi = np.array(SIZE_RANGES).T
        s = lo[size] + u[..., 3] * (hi[size] - lo[size])
        angle = (u[..., 4] * _NUM_ANGLES).astype(np.int64) % _NUM_ANGLES
        tint = 0.88 + 0.2 * u[..., 5:6] + 0.08 * (u[..., 5:8] - 0.5)  # (B, K, 3) brightness and hue

        # draw order = id order = decreasing size (the first shape is the largest)
        order = np.argsort(np.where(active, -s, np.inf), axis=1, kind="stable")
        take = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)  # noqa: E731
        shape, color, size, s, angle, tint = map(take, (shape, color, size, s, angle, tint))

        kind = np.array([SHAPES.index(n) for n in self.shapes])[shape]  # geometry: index into SHAPES
        margin = np.where(kind == 0, _CIRCLE_R, 0.85 * np.array(_BOUND)[kind]) * s
        spacing = np.array(_SPACING)[kind] * s
        cx = np.zeros((B, K))
        cy = np.zeros((B, K))
        for k in range(K):
            cand = margin[:, k, None, None] + u_pos[:, k] * (1 - 2 * margin[:, k, None, None])  # (B, T, 2)
            slack = np.full((B, T), np.inf)
            for j in range(k):
                dist = np.sqrt((cand[..., 0] - cx[:, j, None]) ** 2 + (cand[..., 1] - cy[:, j, None]) ** 2)
                slack = np.minimum(slack, dist - (spacing[:, k, None] + spacing[:, j, None]))
            ok = slack >= 0
            pick = np.where(ok.any(1), ok.argmax(1), slack.argmax(1))
            cx[:, k] = cand[np.arange(B), pick, 0]
            cy[:, k] = cand[np.arange(B), pick, 1]
        position = np.minimum((cy * 3).astype(np.int64), 2) * 3 + np.minimum((cx * 3).astype(np.int64), 2)
        rgb = np.clip(np.array([RGB[c] for c in self.colors])[color] * tint, 0.0, 1.0)
        label = shape[:, 0] * len(self.colors) + color[:, 0]
        return {
            "count": count, "active": active, "shape": shape, "kind": kind, "color": color,
            "size": size, "s": s, "angle": angle, "cx": cx, "cy": cy, "position": position,
            "rgb": rgb, "label": label, "bg": u_bg,
        }  # fmt: skip

    def _caption(self, scene: dict[str, np.ndarray], b: int) -> str:
        parts = []
        for k in range(int(scene["count"][b])):
            parts.append(
                f"a {SIZES[scene['size'][b, k]]} {self.colors[scene['color'][b, k]]} "
                f"{self.shapes[scene['shape'][b, k]]} {POSITION_PHRASES[scene['position'][b, k]]}"
            )
        return " and ".join(parts)

    # --- rendering -----------------------------------------------------------------------------

    def _get_banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise tiles for this seed and size, twice the image size so that items crop them at
        random offsets: fine ``(T, 3, 2S, 2S)`` and smooth ``(T, 1, 2S, 2S)``."""
        if self._banks is None:
            size = 2 * self.image_size
            gen = torch.Generator().manual_seed(_mix64_int(self.seed + 0x5EED) >> 1)
            fine = torch.randn(self._num_tiles, 3, size, size, generator=gen)
            # smooth noise: 8 random low-frequency waves, cos(a_x + b_y) = cos a cos b - sin a sin b
            grid = 2 * math.pi * torch.arange(size, dtype=torch.float64) / self.image_size
            freq = torch.randint(-3, 4, (self._num_tiles, 8, 2), generator=gen).double()
            freq[..., 0] += (freq[..., 0] == 0) & (freq[..., 1] == 0)
            phase = 2 * math.pi * torch.rand(self._num_tiles, 8, 1, generator=gen, dtype=torch.float64)
            amp = freq.norm(dim=-1, keepdim=True).reciprocal()  # (T, 8, 1)
            a = freq[..., 0, None] * grid + phase  # (T, 8, W)
            b = freq[..., 1, None] * grid  # (T, 8, H)
            smooth = torch.zeros(self._num_tiles, size, size, dtype=torch.float64)
            for w in range(8):  # (made once per process, on one thread: see get_batch)
                smooth += (amp[:, w] * torch.cos(b[:, w]))[:, :, None] * torch.cos(a[:, w])[:, None, :]
                smooth -= (amp[:, w] * torch.sin(b[:, w]))[:, :, None] * torch.sin(a[:, w])[:, None, :]
            smooth = smooth[:, None]  # (T, 1, H, W)
            smooth = (smooth - smooth.mean((2, 3), keepdim=True)) / smooth.std((2, 3), keepdim=True)
            self._banks = (fine.contiguous(), smooth.float().contiguous())
        return self._banks

    def _tiles(self, bank: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        """An ``S x S`` crop of a random tile per item: ``u`` ``(B, 3)`` uniforms -> ``(B, C, S, S)``."""
        size, (_, channels, big, _) = self.image_size, bank.shape
        tile = np.minimum((u[:, 0] * self._num_tiles).astype(np.int64), self._num_tiles - 1)
        dy = np.minimum((u[:, 1] * size).astype(np.int64), size - 1)
        dx = np.minimum((u[:, 2] * size).astype(np.int64), size - 1)
        offset = torch.from_numpy(tile * (channels * big * big) + dy * big + dx)  # (B,)
        ar = torch.arange(size)
        pattern = torch.arange(channels)[:, None, None] * (big * big) + ar[:, None] * big + ar  # (C, S, S)
        return bank.take(offset[:, None, None, None] + pattern)

    def _render(self, scene: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, K, S = len(scene["count"]), self.max_shapes, self.image_size
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        grid = torch.arange(S, dtype=torch.float32) + 0.5  # pixel centres
        gx, gy = grid.view(1, 1, 1, S), grid.view(1, 1, S, 1)

        # coverage of every pixel by every shape, from signed distances in pixels: (B, K, S, S);
        # alpha = clamp(0.5 - distance, 0, 1), a one-pixel anti-aliasing ramp, so a pixel is
        # inside (mask) when alpha >= 0.5. Inactive slots sit far outside the image.
        active = scene["active"]
        s = scene["s"] * S
        cx = f32(np.where(active, scene["cx"] * S, -1e4))
        cy = f32(np.where(active, scene["cy"] * S, -1e4))
        dx = gx - cx[..., None, None]  # (B, K, 1, S)
        dy = gy - cy[..., None, None]  # (B, K, S, 1)
        kind = scene["kind"]
        circle = torch.sqrt(dx * dx + dy * dy).neg_().add_(f32(s * _CIRCLE_R + 0.5)[..., None, None])
        # polygons: max over edge normals of (normal . p) - inradius; a triangle repeats one normal
        step = np.where(kind == 1, _NUM_ANGLES // 4, _NUM_ANGLES // 3)
        poly = None
        for j in range(4):
            a = (scene["angle"] + np.where(kind == 1, j, j % 3) * step) % _NUM_ANGLES
            proj = f32(_ANGLE_TABLE[a, 0])[..., None, None] * dx + f32(_ANGLE_TABLE[a, 1])[..., None, None] * dy
            poly = proj if poly is None else torch.maximum(poly, proj, out=poly)
        poly = poly.neg_().add_(f32(s * np.array(_INRADIUS)[kind] + 0.5)[..., None, None])
        alpha = torch.where(torch.from_numpy(kind == 0)[..., None, None], circle, poly).clamp_(0.0, 1.0)

        # background: (B, 3, S, S)
        u = scene["bg"]
        tint = f32(0.2 + 0.35 * u[:, 1, None] + 0.12 * (u[:, 2:5] - 0.5))  # (B, 3) dim, desaturated
        fine, smooth = self._get_banks()
        if self.background == "plain":
            image = tint[:, :, None, None].expand(B, 3, S, S).contiguous()
        else:
            cos_sin = _ANGLE_TABLE[(u[:, 5] * _NUM_ANGLES).astype(np.int64) % _NUM_ANGLES] * (0.25 * u[:, 6:7] / S)
            ramp = (gx - S / 2) * f32(cos_sin[:, 0])[:, None, None, None]
            ramp = ramp + (gy - S / 2) * f32(cos_sin[:, 1])[:, None, None, None]  # (B, 1, S, S) a gradient
            if self.background == "noise":
                ramp = ramp + self._tiles(smooth, u[:, 7:10]) * f32(0.04 + 0.06 * u[:, 11])[:, None, None, None]
            else:  # texture: stripes or checks (a clipped triangle wave)
                cos_sin = _ANGLE_TABLE[(u[:, 12] * _NUM_ANGLES).astype(np.int64) % _NUM_ANGLES]
                freq = (2.0 + 5.0 * u[:, 13]) / S
                c, sn = (f32(cos_sin[:, i] * freq)[:, None, None, None] for i in (0, 1))
                wave = lambda w: (w - torch.floor(w)).mul_(4.0).sub_(2.0).abs_().sub_(1.0).mul_(2.0).clamp_(-1.0, 1.0)  # noqa: E731
                pattern = wave(gx * c + gy * sn + f32(u[:, 14])[:, None, None, None])
                checks = torch.from_numpy(u[:, 15] >= 0.5)
                pattern[checks] *= wave(gy[0] * c[checks] - gx[0] * sn[checks])
                ramp = ramp + pattern * f32(0.05 + 0.08 * u[:, 11])[:, None, None, None]
            image = ramp + tint[:, :, None, None]

        # shapes, largest first, smaller ones on top
        rgb = f32(scene["rgb"])
        mask = torch.zeros(B, S, S, dtype=torch.long)
        for k in range(K):
            a = alpha[:, k, None]  # (B, 1, S, S)
            image = image.add_(a * (rgb[:, k, :, None, None] - image))
            mask.masked_fill_(alpha[:, k] >= 0.5, k + 1)
        if self.background != "plain":
            image = image.add_(self._tiles(fine, u[:, 16:19]), alpha=0.035)
        image = image.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)

        # tight boxes around the masks: (B, K, 4); every instance keeps at least one pixel
        # (only tiny images need that: a small shape can fall between pixel centres)
        boxes = torch.zeros(B, K, 4)
        for k in range(K):
            inst = mask == k + 1
            cols, rows = inst.any(1), inst.any(2)  # (B, S)
            lost = np.nonzero(active[:, k] & ~cols.any(1).numpy())[0]
            for b in lost:
                mask[b, min(int(scene["cy"][b, k] * S), S - 1), min(int(scene["cx"][b, k] * S), S - 1)] = k + 1
            if len(lost):
                inst = mask == k + 1
                cols, rows = inst.any(1), inst.any(2)
            cols, rows = cols.to(torch.uint8), rows.to(torch.uint8)
            boxes[:, k, 0] = cols.argmax(1)
            boxes[:, k, 1] = rows.argmax(1)
            boxes[:, k, 2] = S - cols.flip(1).argmax(1)
            boxes[:, k, 3] = S - rows.flip(1).argmax(1)
        boxes *= torch.from_numpy(active)[..., None]
        return image, mask, boxes


def shapes_in_memory(num: int, image_size: int = 32, seed: int = 0, **kwargs: Any):
    """``num`` :class:`Shapes` items rendered at once and held in memory, as an
    :class:`~minivfm.data.ArrayDataset` (``.images`` ``(N, 3, H, W)`` in [0, 1], ``.labels``): the
    training and test sets of every ``results()`` and the real images of :mod:`minivfm.metrics`.
    ``kwargs`` go to :class:`Shapes` (``max_shapes=1``, ...)."""
    from minivfm.data._common import ArrayDataset

    data = Shapes(num, image_size=image_size, seed=seed, **kwargs)
    batch = data.get_batch(range(num))
    return ArrayDataset((batch["image"] + 1) / 2, batch["label"], data.class_names, data.class_names)
