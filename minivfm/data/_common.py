"""What the data sets share: argument checks, the batch collate, the data root."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Keys whose tensors vary in size from item to item: always a list after collate,
# so a batch has the same type whatever its items happen to hold.
LIST_KEYS = frozenset({"boxes"})

DATA_ENV_VAR = "MINIVFM_DATA"


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` as an int, or raise ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0) -> float:
    """Return ``value`` as a float in ``[low, high)``, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, or raise naming ``name`` and the choices."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def check_names(name: str, values: Any, choices: Sequence[str], what: str) -> tuple[str, ...]:
    """Return ``values`` as a tuple of distinct names from ``choices``, or raise naming ``name``."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of {what} names from {', '.join(choices)}; got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must name at least one {what}; got an empty list")
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"{name} must hold {what} names (str), got {type(value).__name__} {value!r}")
        if value not in choices:
            raise ValueError(f"{name}: unknown {what} {value!r}; expected names from {', '.join(choices)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} names a {what} twice: {list(values)}")
    return tuple(values)


def check_index(index: Any, length: int) -> int:
    """Return a non-negative index into a data set of ``length`` items (negative counts from the end)."""
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise TypeError(f"index must be an int, got {type(index).__name__} {index!r}")
    index = int(index)
    if not -length <= index < length:
        raise IndexError(f"index {index} is out of range for a data set of {length} items")
    return index + length if index < 0 else index


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Turn a list of data items into one batch dict.

    Tensors of equal shape are stacked (batch first), ints become a ``torch.long``
    tensor and floats a ``torch.float32`` tensor; strings, tensors of different
    shapes and the keys in ``LIST_KEYS`` (``boxes``) stay lists.

    Arguments:
        batch: items, each a dict with the same keys (``image``, ``label``, ...).

    Returns:
        dict: ``image`` ``(B, C, H, W)``, ``label`` ``(B,)``, ``caption`` list of B str,
        ``mask`` ``(B, H, W)``, ``boxes`` list of B ``(K_i, 4)`` tensors.
    """
    if isinstance(batch, Mapping) or not isinstance(batch, Sequence):
        raise TypeError(f"batch must be a list of item dicts, got {type(batch).__name__}")
    if len(batch) == 0:
        raise ValueError("batch is empty; collate needs at least one item")
    keys = list(batch[0].keys())
    for item in batch:
        if not isinstance(item, Mapping):
            raise TypeError(f"batch must hold item dicts, got {type(item).__name__}")
        if list(item.keys()) != keys:
            raise ValueError(f"batch items have different keys: {keys} and {list(item.keys())}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            same = all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in values)
            out[key] = torch.stack(values) if same and key not in LIST_KEYS else values
        elif isinstance(first, numbers.Integral) and not isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, numbers.Real) and not isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:
            out[key] = values
    return out


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds downloaded data sets, one sub-folder per set.

    Arguments:
        root: an explicit folder; ``None`` reads ``MINIVFM_DATA`` and falls back to
            the repository's ``datasets/`` (or ``./datasets`` outside a checkout).
    """
    if root is not None:
        if not isinstance(root, str | os.PathLike):
            raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "datasets"
    return Path.cwd() / "datasets"


def article(word: str) -> str:
    """``"an airplane"``, ``"a truck"``."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory as a tensor, returned in the common item format.

    Item ``i`` is a dict with ``image`` (float32 ``(C, H, W)`` in ``[-1, 1]``), ``label``
    (int) and ``caption`` (str, the caption of its class).

    Arguments:
        images: ``(N, C, H, W)`` uint8 in ``[0, 255]`` or float in ``[0, 1]``.
        labels: ``(N,)`` class indices.
        class_names: one name per class.
        captions: one caption per class.
        image_size: resize to this size (bilinear); ``None`` keeps the stored size.
        channels: 1 or 3 (grey is repeated, colour is turned to luminance); ``None`` keeps them.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        captions: Sequence[str],
        image_size: int | None = None,
        channels: int | None = None,
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with N = len(labels); got {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.class_names = tuple(class_names)
        self.captions = tuple(captions)
        self.num_classes = len(self.class_names)
        self.stored_size = int(images.shape[-1])
        self.stored_channels = int(images.shape[1])
        if image_size is not None:
            image_size = check_int("image_size", image_size, minimum=8)
        self.image_size = self.stored_size if image_size is None else image_size
        if channels is not None:
            channels = check_int("channels", channels)
            if channels not in (1, 3):
                raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.in_channels = self.stored_channels if channels is None else channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self.labels))
        label = int(self.labels[index])
        return {"image": self.transform(self.images[index]), "label": label, "caption": self.captions[label]}

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        """Stored ``(C, h, w)`` image -> float32 ``(in_channels, image_size, image_size)`` in [-1, 1]."""
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if self.in_channels != x.shape[0]:
            if x.shape[0] == 1:
                x = x.expand(3, -1, -1)
            else:
                x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        if self.image_size != x.shape[-1]:
            down = self.image_size < x.shape[-1]
            x = torch.nn.functional.interpolate(
                x[None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                antialias=down,
            )[0].clamp(0.0, 1.0)  # fmt: skip
        return (x * 2.0 - 1.0).contiguous()
