"""LightningDataModules for Shapes, Digits and the torchvision sets.

Sizes not given come from the profile (``minivfm.pick``). ``num_classes``,
``in_channels``, ``image_size`` and ``class_names`` are there right after
``__init__``, so LightningCLI can link them into a model::

    parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from minivfm.data._common import check_int, collate
from minivfm.data.digits import DIGIT_NAMES, Digits
from minivfm.data.shapes import Shapes
from minivfm.data.vision import SPECS, TorchvisionDataset, canonical_name, check_files, download_files
from minivfm.profiles import pick


def _size(name: str, value: int | None, default: int, minimum: int = 1) -> int:
    return default if value is None else check_int(name, value, minimum=minimum)


class _DataModule(L.LightningDataModule):
    """Loaders and the linked properties; subclasses fill ``train_set``, ``val_set``, ``test_set``."""

    def __init__(self, batch_size: int | None, num_workers: int) -> None:
        super().__init__()
        self.batch_size = _size("batch_size", batch_size, pick(ci=64, cpu=128, gpu=256))
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._num_classes = 0
        self._in_channels = 0
        self._image_size = 0
        self._class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's output size)."""
        return self._num_classes

    @property
    def in_channels(self) -> int:
        """Image channels (1 or 3)."""
        return self._in_channels

    @property
    def image_size(self) -> int:
        """Image height and width in pixels."""
        return self._image_size

    @property
    def class_names(self) -> tuple[str, ...]:
        """One name per class (``"red circle"``, ``"seven"``), for plots and zero-shot prompts."""
        return self._class_names

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a DataLoader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class ShapesDataModule(_DataModule):
    """Shapes for training, validation and testing; each split has its own seed.

    Split ``k`` (train 0, val 1, test 2) uses ``Shapes(seed=3 * seed + k)``, so the
    splits never share a scene and two DataModule seeds never share a split.

    Arguments:
        batch_size: items per batch; ``None``: the profile's (ci 64, cpu 128, gpu 256).
        num_workers: DataLoader worker processes (items are identical in any worker).
        image_size: height and width in pixels (>= 8).
        num_train: training items; ``None``: the profile's (ci 2,000, cpu 20,000, gpu 100,000).
        num_val: validation items; ``None``: the profile's (ci 500, cpu 2,000, gpu 5,000).
        num_test: test items; ``None``: the profile's (ci 1,000, cpu 5,000, gpu 10,000).
        seed: the data seed (not the training seed).
        min_shapes: fewest shapes in an image.
        max_shapes: most shapes in an image.
        colors: colour names from ``Shapes.COLORS``; ``None``: ``Shapes.DEFAULT_COLORS``.
        shapes: shape names from ``Shapes.SHAPES``; ``None``: all.
        background: ``"noise"``, ``"texture"`` or ``"plain"``.
    """

    def __init__(
        self,
        batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int = 32,
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        seed: int = 0,
        min_shapes: int = 1,
        max_shapes: int = 3,
        colors: list[str] | None = None,
        shapes: list[str] | None = None,
        background: str = "noise",
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        seed = check_int("seed", seed)
        sizes = {
            "num_train": _size("num_train", num_train, pick(ci=2_000, cpu=20_000, gpu=100_000)),
            "num_val": _size("num_val", num_val, pick(ci=500, cpu=2_000, gpu=5_000)),
            "num_test": _size("num_test", num_test, pick(ci=1_000, cpu=5_000, gpu=10_000)),
        }
        options: dict[str, Any] = dict(
            image_size=image_size, min_shapes=min_shapes, max_shapes=max_shapes,
            colors=colors, shapes=shapes, background=background,
        )  # fmt: skip
        self.train_set, self.val_set, self.test_set = (
            Shapes(num_samples=n, seed=3 * seed + k, **options) for k, n in enumerate(sizes.values())
        )
        self._num_classes = self.train_set.num_classes
        self._in_channels = 3
        self._image_size = self.train_set.image_size
        self._class_names = self.train_set.class_names

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: Shapes renders on demand."""


class DigitsDataModule(_DataModule):
    """scikit-learn's handwritten digits: stratified 75/25 train/test, val carved from train.

    The whole set is small (1,797 images), so every profile uses all of it.

    Arguments:
        batch_size: items per batch; ``None``: the profile's (ci 64, cpu 128, gpu 256).
        num_workers: DataLoader worker processes.
        image_size: height and width (the 8x8 originals are resized bilinearly).
        channels: 1 (grey) or 3 (grey repeated).
        val_fraction: part of the train split held out for validation, in [0, 1).
        seed: fixes the split.
    """

    def __init__(
        self,
        batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int = 32,
        channels: int = 1,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.train_set, self.val_set, self.test_set = (
            Digits(split, image_size=image_size, channels=channels, val_fraction=val_fraction, seed=seed)
            for split in ("train", "val", "test")
        )
        self._num_classes = 10
        self._in_channels = self.train_set.in_channels
        self._image_size = self.train_set.image_size
        self._class_names = DIGIT_NAMES

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: the data is loaded in ``__init__`` (it is tiny)."""


class TorchvisionDataModule(_DataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 from ``<root>/<name>/``, never downloaded unless asked.

    Missing files raise ``FileNotFoundError`` in ``__init__``, with the files to put where.
    Validation is ``val_fraction`` of the official train set; test is the official test set.

    Arguments:
        name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        root: folder that holds ``<name>/``; ``None`` reads ``MINIVFM_DATA``, else ``datasets/``.
        batch_size: items per batch; ``None``: the profile's (ci 64, cpu 128, gpu 256).
        num_workers: DataLoader worker processes.
        image_size: resize to this size; ``None`` keeps 28 (MNIST sets) or 32 (CIFAR-10).
        channels: 1 or 3; ``None`` keeps the set's own.
        num_train: cap on training items, 0 for all; ``None``: the profile's (ci 2,000, otherwise all).
        num_val: cap on validation items, 0 for all; ``None``: the profile's (ci 500, otherwise all).
        num_test: cap on test items, 0 for all; ``None``: the profile's (ci 1,000, otherwise all).
        val_fraction: part of the official train set held out for validation, in [0, 1).
        seed: fixes the train/val split.
        download: fetch missing files with torchvision in ``prepare_data`` (needs a network).
    """

    def __init__(
        self,
        name: str = "mnist",
        root: str | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int | None = None,
        channels: int | None = None,
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.name = canonical_name(name)
        self.root = root
        self.download = bool(download)
        spec = SPECS[self.name]
        if image_size is not None:
            image_size = check_int("image_size", image_size, minimum=8)
        if channels is not None and check_int("channels", channels) not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self._options: dict[str, Any] = dict(
            root=root, image_size=image_size, channels=channels, val_fraction=val_fraction, seed=seed
        )
        self._caps = {
            "train": _size("num_train", num_train, pick(ci=2_000, cpu=0, gpu=0), minimum=0) or None,
            "val": _size("num_val", num_val, pick(ci=500, cpu=0, gpu=0), minimum=0) or None,
            "test": _size("num_test", num_test, pick(ci=1_000, cpu=0, gpu=0), minimum=0) or None,
        }
        if not self.download:
            check_files(self.name, "train", root)
            check_files(self.name, "test", root)
        self._num_classes = len(spec.class_names)
        self._in_channels = spec.channels if channels is None else channels
        self._image_size = spec.size if image_size is None else image_size
        self._class_names = spec.class_names

    def prepare_data(self) -> None:
        """Download the files if ``download=True`` and they are missing (one process only)."""
        if self.download:
            try:
                check_files(self.name, "train", self.root)
                check_files(self.name, "test", self.root)
            except FileNotFoundError:
                download_files(self.name, self.root)

    def setup(self, stage: str | None = None) -> None:
        """Read the files (once)."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = (
                TorchvisionDataset(self.name, split, num_samples=self._caps[split], **self._options)
                for split in ("train", "val", "test")
            )
