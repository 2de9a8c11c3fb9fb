"""MNIST, Fashion-MNIST and CIFAR-10, read from files on disk in their own formats.

Nothing is downloaded unless asked (``download=True``). The files live in
``<root>/<name>/`` in the layout torchvision writes, so
``torchvision.datasets.MNIST("datasets/mnist", download=True)`` on a machine with
a network makes exactly the folder this module reads:

- ``datasets/mnist/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
- ``datasets/fashion_mnist/FashionMNIST/raw/`` with the same four file names
- ``datasets/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}``

The readers are our own (idx-ubyte, and CIFAR's python batches through a
restricted unpickler that only builds numpy arrays), so no pickle can run code
and small files in the real format can be tested without md5 checks.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minivfm.data._common import (
    ArrayDataset,
    article,
    check_choice,
    check_fraction,
    check_int,
    data_root,
)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class _Spec:
    title: str  # how people write it
    folder: str  # <root>/<folder>/
    torchvision_class: str
    subdir: str  # where torchvision puts the files inside the folder
    files: dict[str, tuple[str, ...]]  # per split ("train" also serves "val")
    class_names: tuple[str, ...]
    caption: str  # a format string for the class name with its article
    size: int
    channels: int


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPECS = {
    "mnist": _Spec(
        "MNIST", "mnist", "MNIST", "MNIST/raw", _MNIST_FILES,
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        "a handwritten {name}", 28, 1,
    ),
    "fashion_mnist": _Spec(
        "Fashion-MNIST", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw", _MNIST_FILES,
        ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"),
        "a photo of {a_name}", 28, 1,
    ),
    "cifar10": _Spec(
        "CIFAR-10", "cifar10", "CIFAR10", "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        "a photo of {a_name}", 32, 3,
    ),
}  # fmt: skip
NAMES = tuple(SPECS)


def canonical_name(name: str) -> str:
    """``"Fashion-MNIST"`` -> ``"fashion_mnist"``; raises ``ValueError`` for an unknown set."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {', '.join(NAMES)}; got {type(name).__name__}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    for canon in NAMES:
        if canon.replace("_", "") == key:
            return canon
    raise ValueError(f"name={name!r} is not a torchvision set this module reads; expected one of {', '.join(NAMES)}")


# --- readers --------------------------------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST's format: ``train-images-idx3-ubyte``), gzipped if it ends in ``.gz``.

    Returns:
        np.ndarray with the dimensions the header gives, e.g. ``(60000, 28, 28)`` uint8.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file: bad magic number {data[:4].hex()}")
    dtype, ndim = np.dtype(_IDX_TYPES[data[2]]), data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header names {ndim} dimensions")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = int(np.prod(shape))
    if len(data) != 4 + 4 * ndim + count * dtype.itemsize:
        raise ValueError(
            f"{path} holds {len(data) - 4 - 4 * ndim} bytes of data, its header {shape} says {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype, count, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


def _numpy_global(module: str, name: str) -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    table = {
        ("multiarray", "_reconstruct"): core.multiarray._reconstruct,
        ("numeric", "_frombuffer"): core.numeric._frombuffer,
    }
    return table.get((module.rsplit(".", 1)[-1], name))


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"):
            found = _numpy_global(module, name)
            if found is not None:
                return found
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles from Python 3 store bytes
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays, lists, strings and numbers"
        )


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (``data_batch_1``, ``test_batch``) without running any code.

    Returns:
        images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64.
    """
    path = Path(path)
    with open(path, "rb") as f:
        batch = _CifarUnpickler(f, encoding="latin1").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR batch: it holds a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or not ("labels" in batch or "fine_labels" in batch):
        raise ValueError(f"{path} is not a CIFAR batch: keys {sorted(batch)}, expected 'data' and 'labels'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: data {data.shape} and {len(labels)} labels, expected (N, 3072) and N labels")
    return data.reshape(-1, 3, 32, 32), labels


# --- finding files ----------------------------------------------------------------------------


def _find(folder: Path, spec: _Spec, filename: str) -> Path | None:
    for directory in (folder / spec.subdir, folder):
        for candidate in (directory / filename, directory / f"{filename}.gz"):
            if candidate.is_file():
                return candidate
    return None


def missing_message(spec: _Spec, folder: Path, missing: list[str]) -> str:
    where = folder / spec.subdir
    gz = " (or the same name + .gz)" if spec.subdir.endswith("raw") else ""
    return (
        f"{spec.title} files not found. Missing in {where}:\n"
        + "".join(f"  {name}{gz}\n" for name in missing)
        + "Nothing is downloaded by default. To get them:\n"
        f"  1. on a machine with a network run\n"
        f'       python -c "import torchvision; torchvision.datasets.{spec.torchvision_class}('
        f"'datasets/{spec.folder}', download=True, train=True); torchvision.datasets."
        f"{spec.torchvision_class}('datasets/{spec.folder}', download=True, train=False)\"\n"
        f"  2. copy the folder it writes, datasets/{spec.folder}/{spec.subdir}/, to {where}/\n"
        f"Or pass download=True here (needs a network), or point root= or MINIVFM_DATA at the folder "
        f"that holds {spec.folder}/{spec.subdir}/. See datasets/README.md."
    )


def load_arrays(name: str, split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` of the official ``"train"`` or ``"test"`` split.

    Raises:
        FileNotFoundError: the files are not there; the message says which, where, and how to get them.
    """
    spec = SPECS[canonical_name(name)]
    part = "test" if split == "test" else "train"
    folder = data_root(root) / spec.folder
    paths = {f: _find(folder, spec, f) for f in spec.files[part]}
    missing = [f for f, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(missing_message(spec, folder, missing))
    if spec.folder == "cifar10":
        batches = [read_cifar_batch(p) for p in paths.values()]
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    image_file, label_file = spec.files[part]
    images, labels = read_idx(paths[image_file]), read_idx(paths[label_file]).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{paths[image_file]} and {paths[label_file]} do not match: images {images.shape}, labels {labels.shape}"
        )
    return images[:, None], labels


def check_files(name: str, split: str = "train", root: str | os.PathLike | None = None) -> None:
    """Raise the ``FileNotFoundError`` of :func:`load_arrays` at once if files are missing; read nothing."""
    spec = SPECS[canonical_name(name)]
    folder = data_root(root) / spec.folder
    part = "test" if split == "test" else "train"
    missing = [f for f in spec.files[part] if _find(folder, spec, f) is None]
    if missing:
        raise FileNotFoundError(missing_message(spec, folder, missing))


def download_files(name: str, root: str | os.PathLike | None = None) -> None:
    """Download a set with torchvision into ``<root>/<name>/`` (needs a network)."""
    import torchvision

    spec = SPECS[canonical_name(name)]
    cls = getattr(torchvision.datasets, spec.torchvision_class)
    for train in (True, False):
        cls(str(data_root(root) / spec.folder), train=train, download=True)


class TorchvisionDataset(ArrayDataset):
    """MNIST, Fashion-MNIST or CIFAR-10 in the common item format, read from disk.

    Items: ``image`` float32 ``(C, H, W)`` in ``[-1, 1]``, ``label`` (0-9) and ``caption``
    (``"a handwritten seven"``, ``"a photo of an ankle boot"``, ``"a photo of a cat"``).

    Arguments:
        name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"`` (``"Fashion-MNIST"`` works too).
        split: ``"train"``, ``"val"`` (``val_fraction`` of the official train set) or ``"test"``.
        root: folder that holds ``<name>/``; ``None`` reads ``MINIVFM_DATA``, else ``datasets/``.
        image_size: resize to this size; ``None`` keeps 28 (MNIST sets) or 32 (CIFAR-10).
        channels: 1 or 3; ``None`` keeps 1 (MNIST sets) or 3 (CIFAR-10).
        val_fraction: part of the official train set held out as ``"val"``, in [0, 1).
        seed: fixes which train images go to ``"val"``.
        num_samples: keep only the first this many items of the split; ``None`` keeps all.
        download: fetch the files with torchvision first if they are missing (needs a network).
    """

    def __init__(
        self,
        name: str = "mnist",
        split: str = "train",
        root: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_samples: int | None = None,
        download: bool = False,
    ) -> None:
        self.name = canonical_name(name)
        self.split = check_choice("split", split, SPLITS)
        val_fraction = check_fraction("val_fraction", val_fraction)
        seed = check_int("seed", seed, minimum=0)
        if num_samples is not None:
            num_samples = check_int("num_samples", num_samples, minimum=1)
        spec = SPECS[self.name]
        if download:
            try:
                check_files(self.name, split, root)
            except FileNotFoundError:
                download_files(self.name, root)
        images, labels = load_arrays(self.name, split, root)
        if split != "test":
            order = np.random.default_rng(seed).permutation(len(labels))
            num_val = int(round(val_fraction * len(labels)))
            keep = np.sort(order[:num_val] if split == "val" else order[num_val:])
            images, labels = images[keep], labels[keep]
        if num_samples is not None:
            images, labels = images[:num_samples], labels[:num_samples]
        captions = [spec.caption.format(name=n, a_name=article(n)) for n in spec.class_names]
        super().__init__(
            torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), spec.class_names, captions,
            image_size=image_size, channels=channels,
        )  # fmt: skip
