"""Data: Shapes (procedural, the default), Digits (scikit-learn), MNIST / Fashion-MNIST / CIFAR-10.

Every data set returns dicts (``image``, ``label``, ``caption``, and for Shapes
``mask`` and ``boxes``); :func:`collate` makes batches of them. See
CONTRIBUTING.md for the item format and ``datasets/README.md`` for the cards.

The DataModules (Lightning) and Digits (scikit-learn) are imported on first
use, so a DataLoader worker that only needs Shapes starts quickly.
"""

import importlib
from typing import Any

from minivfm.data._common import ArrayDataset, collate, data_root
from minivfm.data.shapes import Shapes, shapes_in_memory
from minivfm.data.vision import TorchvisionDataset, read_cifar_batch, read_idx

_LAZY = {
    "Digits": "minivfm.data.digits",
    "DigitsDataModule": "minivfm.data.modules",
    "ShapesDataModule": "minivfm.data.modules",
    "TorchvisionDataModule": "minivfm.data.modules",
}

__all__ = [
    "ArrayDataset",
    "Digits",
    "DigitsDataModule",
    "Shapes",
    "ShapesDataModule",
    "TorchvisionDataModule",
    "TorchvisionDataset",
    "collate",
    "data_root",
    "shapes_in_memory",
    "read_cifar_batch",
    "read_idx",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minivfm.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
