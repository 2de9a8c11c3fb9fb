"""Digits: scikit-learn's handwritten digits, the real-data set that needs no network.

1,797 grey 8x8 images of the digits 0 to 9 (UCI optical recognition of
handwritten digits, shipped inside scikit-learn), resized to ``image_size``
and returned in the common item format. The split is fixed for a seed:
a stratified 75/25 train/test split, then a stratified validation part
carved from train. For scale: an RBF SVM scores about 0.99 on the test part.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from minivfm.data._common import ArrayDataset, check_choice, check_fraction, check_int

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test", "all")
TEST_FRACTION = 0.25


def digits_split(split: str, val_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Sorted indices into ``load_digits()`` for ``split`` (``train``, ``val``, ``test``, ``all``)."""
    split = check_choice("split", split, SPLITS)
    val_fraction = check_fraction("val_fraction", val_fraction)
    seed = check_int("seed", seed, minimum=0)
    y = load_digits().target
    index = np.arange(len(y))
    if split == "all":
        return index
    train, test = train_test_split(index, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    if split == "test":
        return np.sort(test)
    if val_fraction == 0.0:
        val = train[:0]
    else:
        train, val = train_test_split(train, test_size=val_fraction, stratify=y[train], random_state=seed)
    return np.sort(train if split == "train" else val)


class Digits(ArrayDataset):
    """scikit-learn's handwritten digits in the common item format.

    Items: ``image`` float32 ``(channels, image_size, image_size)`` in ``[-1, 1]``
    (ink is bright), ``label`` (0-9), ``caption`` (``"a handwritten seven"``).

    Arguments:
        split: ``"train"``, ``"val"``, ``"test"`` (25%, stratified) or ``"all"``.
        image_size: height and width; the 8x8 originals are resized bilinearly.
        channels: 1 (grey) or 3 (grey repeated, for models that expect RGB).
        val_fraction: part of the 75% train split held out as ``"val"``, in [0, 1).
        seed: fixes the split (``random_state`` of the stratified splits).
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        channels: int = 1,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        index = digits_split(split, val_fraction, seed)
        data = load_digits()
        images = torch.from_numpy(data.images[index].astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
        labels = torch.from_numpy(data.target[index].astype(np.int64))
        super().__init__(
            images, labels, DIGIT_NAMES, [f"a handwritten {n}" for n in DIGIT_NAMES],
            image_size=check_int("image_size", image_size, minimum=8), channels=channels,
        )  # fmt: skip
        self.split = split
