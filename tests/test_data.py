"""Tests for minivfm.data: Shapes, collate, Digits, the torchvision sets and the DataModules."""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from minivfm.data import (
    Digits,
    DigitsDataModule,
    Shapes,
    ShapesDataModule,
    TorchvisionDataModule,
    TorchvisionDataset,
    collate,
    data_root,
    read_cifar_batch,
    read_idx,
)
from minivfm.data.shapes import POSITION_PHRASES

REPO = Path(__file__).resolve().parents[1]


def items_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


# --- Shapes: format --------------------------------------------------------------------------


def test_shapes_item_format():
    ds = Shapes(num_samples=200)
    assert len(ds) == 200
    assert ds.num_classes == len(ds.class_names) == len(ds.shapes) * len(ds.colors) >= 12
    assert {"circle", "square", "triangle"} <= set(Shapes.SHAPES) and len(Shapes.COLORS) >= 4
    for i in range(200):
        item = ds[i]
        assert set(item) == {"image", "label", "caption", "mask", "boxes"}
        image, mask, boxes = item["image"], item["mask"], item["boxes"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert isinstance(item["label"], int) and 0 <= item["label"] < ds.num_classes
        assert mask.shape == (32, 32) and mask.dtype == torch.long
        k = len(boxes)
        assert boxes.shape == (k, 4) and boxes.dtype == torch.float32 and 1 <= k <= 3
        assert set(mask.unique().tolist()) == set(range(k + 1))  # background and every instance
        assert isinstance(item["caption"], str) and item["caption"].count(" and ") == k - 1
    images = torch.stack([ds[i]["image"] for i in range(200)])
    assert images.std() > 0.2  # not a constant image
    assert len({ds[i]["label"] for i in range(200)}) == ds.num_classes  # every class shows up


def test_shapes_vocab_covers_captions():
    ds = Shapes(num_samples=300, colors=list(Shapes.COLORS))
    assert len(set(Shapes.vocab)) == len(Shapes.vocab)
    words = {w for i in range(300) for w in ds[i]["caption"].split()}
    assert words <= set(Shapes.vocab)
    assert set(ds.colors) | set(ds.shapes) | {"small", "medium", "large"} <= words


# --- Shapes: determinism ---------------------------------------------------------------------


def test_shapes_same_seed_same_items_different_seed_different_items():
    a, b, c = Shapes(num_samples=64, seed=5), Shapes(num_samples=64, seed=5), Shapes(num_samples=64, seed=6)
    assert all(items_equal(a[i], b[i]) for i in range(64))
    assert sum(torch.equal(a[i]["image"], c[i]["image"]) for i in range(64)) == 0
    assert sum(a[i]["caption"] != c[i]["caption"] for i in range(64)) > 48


def test_shapes_item_independent_of_batch_and_length():
    small, large = Shapes(num_samples=10), Shapes(num_samples=1_000)
    indices = [999, 3, 512, 7, 0, 255, 256]
    rendered = large.__getitems__(indices)  # the DataLoader path, one batch in any order
    for i, item in zip(indices, rendered, strict=True):
        assert items_equal(item, large[i])  # the cached-chunk path
    for i in range(10):
        assert items_equal(small[i], large[i])
    assert items_equal(large[-1], large[999])


def test_shapes_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002
    torch.manual_seed(0)
    Shapes(num_samples=300).get_batch(range(300))
    assert torch.equal(torch.rand(3), expected)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # noqa: NPY002


def test_shapes_identical_across_dataloader_workers():
    ds = Shapes(num_samples=96, seed=3)
    loader = DataLoader(ds, batch_size=16, shuffle=True, num_workers=2, collate_fn=collate)
    torch.manual_seed(0)
    seen = 0
    for batch in loader:
        for b in range(len(batch["label"])):
            item = {
                "image": batch["image"][b], "label": int(batch["label"][b]), "caption": batch["caption"][b],
                "mask": batch["mask"][b], "boxes": batch["boxes"][b],
            }  # fmt: skip
            matches = [i for i in range(96) if ds[i]["caption"] == item["caption"]]
            assert any(items_equal(ds[i], item) for i in matches)
            seen += 1
    assert seen == 96


DIGEST = """
import hashlib
from minivfm.data.shapes import Shapes

def digest(ds, indices):
    h = hashlib.sha256()
    for i in indices:
        item = ds[i]
        for key in ("image", "mask", "boxes"):
            h.update(item[key].numpy().tobytes())
        h.update(f"{item['label']}|{item['caption']}".encode())
    return h.hexdigest()

result = digest(Shapes(num_samples=300, seed=11, image_size=24), range(0, 300, 7))
"""


def test_shapes_identical_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", DIGEST + "print(result)"], capture_output=True, text=True, check=True)
    here: dict = {}
    exec(DIGEST, here)
    assert out.stdout.strip() == here["result"]


# --- Shapes: content -------------------------------------------------------------------------


def test_shapes_label_is_the_largest_shape():
    ds = Shapes(num_samples=300, colors=list(Shapes.COLORS))
    palette = torch.tensor([Shapes.RGB[c] for c in ds.colors]) * 2 - 1
    for i in range(300):
        item, scene = ds[i], ds.describe(i)
        areas = torch.bincount(item["mask"].flatten(), minlength=len(scene) + 1)[1:]
        largest = int(areas.argmax())
        assert largest == 0, f"item {i}: instance {largest + 1} covers more pixels than the labelled one"
        if len(scene) > 1:
            assert areas[0] >= 1.3 * areas[1:].max(), f"item {i}: the largest shape is not clearly the largest"
        name = ds.class_names[item["label"]]
        assert name == f"{scene[0]['color']} {scene[0]['shape']}"
        # the pixels of the labelled shape have its colour (nearest palette colour of their median)
        pixels = item["image"][:, item["mask"] == 1].median(dim=1).values
        nearest = ds.colors[int(((palette - pixels) ** 2).sum(1).argmin())]
        assert nearest == scene[0]["color"], f"item {i}: {name} looks {nearest}"


def test_shapes_caption_names_every_shape():
    ds = Shapes(num_samples=300, image_size=48, colors=list(Shapes.COLORS))
    checked = 0
    for i in range(300):
        item, scene = ds[i], ds.describe(i)
        assert item["caption"].split(" and ") == [
            f"a {s['size']} {s['color']} {s['shape']} {POSITION_PHRASES[Shapes.POSITIONS.index(s['position'])]}"
            for s in scene
        ]
        for s in scene:  # the position word agrees with where the mask is
            ys, xs = torch.nonzero(item["mask"] == s["id"], as_tuple=True)
            cx, cy = xs.float().mean().item() + 0.5, ys.float().mean().item() + 0.5
            third = 48 / 3
            if min(abs(cx - third), abs(cx - 2 * third), abs(cy - third), abs(cy - 2 * third)) < 2.5:
                continue  # too near a border between regions to judge
            col, row = int(cx // third), int(cy // third)
            assert Shapes.POSITIONS[row * 3 + col] == s["position"], f"item {i}, {s}"
            checked += 1
    assert checked > 300


def test_shapes_mask_ids_match_boxes():
    ds = Shapes(num_samples=200, image_size=40)
    for i in range(200):
        item = ds[i]
        for k, box in enumerate(item["boxes"]):
            ys, xs = torch.nonzero(item["mask"] == k + 1, as_tuple=True)
            expected = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.equal(box, expected), f"item {i}, instance {k + 1}: box {box} vs mask {expected}"


def test_shapes_little_overlap():
    ds = Shapes(num_samples=200, image_size=64, min_shapes=3, max_shapes=3)
    for i in range(200):
        item = ds[i]
        for k, s in enumerate(ds.describe(i)):
            visible = (item["mask"] == k + 1).sum().item()
            assert visible >= 0.6 * s["scale"] ** 2, f"item {i}: instance {k + 1} is mostly hidden"


@pytest.mark.parametrize("size", [8, 16, 33, 64, 128])
def test_shapes_any_image_size(size):
    ds, ref = Shapes(num_samples=40, image_size=size), Shapes(num_samples=40)
    batch = collate([ds[i] for i in range(40)])
    assert batch["image"].shape == (40, 3, size, size) and batch["mask"].shape == (40, size, size)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    for i in range(40):
        boxes = batch["boxes"][i]
        assert set(batch["mask"][i].unique().tolist()) == set(range(len(boxes) + 1))
        assert (boxes >= 0).all() and (boxes <= size).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert batch["caption"][i] == ref[i]["caption"]  # the same scene at every size


@pytest.mark.parametrize("background", Shapes.BACKGROUNDS)
def test_shapes_backgrounds(background):
    ds = Shapes(num_samples=16, background=background, shapes=["triangle"], colors=["red", "blue", "green", "yellow"])
    batch = ds.get_batch(range(16))
    bg = batch["image"].permute(0, 2, 3, 1)[batch["mask"] == 0]  # (P, 3) background pixels
    assert bg.std(0).mean() > 0.01
    assert all(ds.class_names[label].endswith("triangle") for label in batch["label"].tolist())
    for b in range(16):  # plain: one flat colour (up to anti-aliased edges); otherwise noise everywhere
        pixels = batch["image"][b].permute(1, 2, 0)[batch["mask"][b] == 0]
        flat = (pixels == pixels.mode(0).values).all(1).float().mean()
        assert flat > 0.8 if background == "plain" else flat < 0.05


def test_shapes_counts():
    ds = Shapes(num_samples=300, min_shapes=2, max_shapes=3)
    counts = [len(ds[i]["boxes"]) for i in range(300)]
    assert set(counts) == {2, 3}
    assert {len(Shapes(num_samples=20, min_shapes=1, max_shapes=1)[i]["boxes"]) for i in range(20)} == {1}


# --- Shapes: errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image_size": 4}, ValueError, "image_size"),
        ({"image_size": 32.0}, TypeError, "image_size"),
        ({"image_size": "32"}, TypeError, "image_size"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": -5}, ValueError, "num_samples"),
        ({"min_shapes": 0}, ValueError, "min_shapes"),
        ({"max_shapes": 0}, ValueError, "max_shapes"),
        ({"min_shapes": 3, "max_shapes": 2}, ValueError, "max_shapes"),
        ({"colors": ["red", "pink"]}, ValueError, "colors.*pink"),
        ({"colors": "red"}, TypeError, "colors"),
        ({"colors": []}, ValueError, "colors"),
        ({"colors": ["red", "red"]}, ValueError, "colors"),
        ({"shapes": ["circle", "hexagon"]}, ValueError, "shapes.*hexagon"),
        ({"background": "stars"}, ValueError, "background"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_shapes_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Shapes(**kwargs)


def test_shapes_bad_index():
    ds = Shapes(num_samples=10)
    with pytest.raises(IndexError, match="index 10 is out of range"):
        ds[10]
    with pytest.raises(IndexError, match="index -11"):
        ds[-11]
    with pytest.raises(TypeError, match="index"):
        ds[1.0]
    with pytest.raises(IndexError, match="index 12"):
        ds.get_batch([0, 12])
    assert len(list(iter(ds))) == 10  # iteration stops at the end


# --- collate ---------------------------------------------------------------------------------


def test_collate():
    items = [
        {"image": torch.zeros(3, 4, 4), "label": 1, "caption": "a", "boxes": torch.zeros(2, 4), "w": 0.5},
        {"image": torch.ones(3, 4, 4), "label": 2, "caption": "b", "boxes": torch.zeros(2, 4), "w": 1.5},
    ]
    batch = collate(items)
    assert batch["image"].shape == (2, 3, 4, 4) and torch.equal(batch["image"][1], torch.ones(3, 4, 4))
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [1, 2]
    assert batch["caption"] == ["a", "b"]
    assert isinstance(batch["boxes"], list) and len(batch["boxes"]) == 2  # a list even when sizes agree
    assert batch["w"].dtype == torch.float32
    ragged = collate([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}])
    assert isinstance(ragged["x"], list)
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="different keys"):
        collate([{"a": 1}, {"b": 1}])
    with pytest.raises(TypeError, match="batch"):
        collate({"a": 1})


# --- Digits ----------------------------------------------------------------------------------


def test_digits_splits():
    from sklearn.datasets import load_digits

    splits = {s: Digits(s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 1212, "val": 135, "test": 450}
    labels = {s: d.labels for s, d in splits.items()}
    for digit in range(10):  # stratified: each class is about 25% test
        total = sum((labels[s] == digit).sum().item() for s in splits)
        assert abs((labels["test"] == digit).sum().item() - 0.25 * total) <= 1
    # disjoint and covering: compare the raw 8x8 images with load_digits
    raw = torch.from_numpy(load_digits().images).float() / 16
    keys = {s: {tuple(d.images[i].flatten().tolist()) for i in range(len(d))} for s, d in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"] and not keys["train"] & keys["val"]
    assert len(keys["train"] | keys["val"] | keys["test"]) == len({tuple(x.flatten().tolist()) for x in raw})
    assert torch.equal(Digits("test").labels, Digits("test").labels)
    assert not torch.equal(Digits("test", seed=1).labels, Digits("test").labels)


def test_digits_items():
    ds = Digits("train", image_size=16, channels=3)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert torch.equal(item["image"][0], item["image"][2])
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].max() > 0.5
    assert item["caption"] == f"a handwritten {ds.class_names[item['label']]}"
    assert Digits("test")[5]["image"].shape == (1, 32, 32)
    batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate)))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["label"].dtype == torch.long


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "dev"}, ValueError, "split"),
        ({"image_size": 2}, ValueError, "image_size"),
        ({"channels": 2}, ValueError, "channels"),
        ({"val_fraction": 1.0}, ValueError, "val_fraction"),
    ],
)
def test_digits_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Digits(**kwargs)


# --- torchvision sets: files in their real formats ------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(root: Path, folder="mnist", subdir="MNIST", n_train=60, n_test=20, gz=False) -> dict:
    raw = root / folder / subdir / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(raw / (name + (".gz" if gz else "")), array)
    return arrays


def make_cifar(root: Path, n=12, protocol=2) -> dict:
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": f"{name} of 6",
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = batch
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile"], "num_vis": 3072}, f, protocol=protocol)
    return batches


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_matches_what_was_written_and_torchvision(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    for name, array in arrays.items():
        read = read_idx(raw / (name + (".gz" if gz else "")))
        assert read.dtype == np.uint8 and np.array_equal(read, array)
    if not gz:  # torchvision reads the same files the same way
        import torchvision

        tv = torchvision.datasets.MNIST(str(tmp_path / "mnist"), train=False, download=False)
        assert np.array_equal(tv.data.numpy(), arrays["t10k-images-idx3-ubyte"])
        assert np.array_equal(tv.targets.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04" + bytes(10))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(ValueError, match="header"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_sets_from_tiny_files(tmp_path, name):
    arrays = make_mnist(tmp_path, folder=name, subdir="MNIST" if name == "mnist" else "FashionMNIST", gz=True)
    train = TorchvisionDataset(name, "train", root=str(tmp_path), val_fraction=0.25)
    val = TorchvisionDataset(name, "val", root=str(tmp_path), val_fraction=0.25)
    test = TorchvisionDataset(name, "test", root=str(tmp_path))
    assert (len(train), len(val), len(test)) == (45, 15, 20)
    item = test[3]
    assert item["image"].shape == (1, 28, 28) and item["label"] == 9
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][3]).float() / 127.5 - 1
    assert torch.allclose(item["image"][0], expected)
    assert item["caption"] == ("a handwritten nine" if name == "mnist" else "a photo of an ankle boot")
    # train and val split the official train set without overlap
    all_train = {arrays["train-images-idx3-ubyte"][i].tobytes() for i in range(60)}
    seen = [((d[i]["image"][0] + 1) * 127.5).round().to(torch.uint8).numpy().tobytes() for d in (train, val)
            for i in range(len(d))]  # fmt: skip
    assert len(set(seen)) == 60 and set(seen) == all_train
    resized = TorchvisionDataset(name, "test", root=str(tmp_path), image_size=32, channels=3, num_samples=5)
    assert len(resized) == 5 and resized[0]["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_from_tiny_files(tmp_path, protocol):
    batches = make_cifar(tmp_path, protocol=protocol)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    images, labels = read_cifar_batch(folder / "test_batch")
    assert images.shape == (12, 3, 32, 32) and images.dtype == np.uint8
    assert np.array_equal(images.reshape(12, -1), batches["test_batch"]["data"])
    assert labels.tolist() == batches["test_batch"]["labels"]
    test = TorchvisionDataset("CIFAR-10", "test", root=str(tmp_path))
    train = TorchvisionDataset("cifar10", "train", root=str(tmp_path), val_fraction=0.0)
    assert len(test) == 12 and len(train) == 60
    item = test[0]
    assert item["image"].shape == (3, 32, 32)
    assert item["caption"] == "a photo of " + ("an " if item["label"] == 0 else "a ") + test.class_names[item["label"]]
    assert torch.allclose(item["image"], torch.from_numpy(images[0]).float() / 127.5 - 1)
    grey = TorchvisionDataset("cifar10", "test", root=str(tmp_path), channels=1)
    assert grey[0]["image"].shape == (1, 32, 32)


def test_cifar_reader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        read_cifar_batch(path)
    assert not marker.exists()


def test_missing_files_say_what_to_put_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        TorchvisionDataset("mnist", root=str(tmp_path))
    message = str(info.value)
    for needle in (
        str(tmp_path / "mnist" / "MNIST" / "raw"), "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "torchvision.datasets.MNIST('datasets/mnist', download=True", "download=True", "MINIVFM_DATA",
    ):  # fmt: skip
        assert needle in message, f"{needle!r} not in the message:\n{message}"
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar-10-batches-py.*test_batch.*CIFAR10"):
        TorchvisionDataset("cifar10", "test", root=str(tmp_path))
    monkeypatch.setenv("MINIVFM_DATA", str(tmp_path / "elsewhere"))
    assert data_root() == tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        TorchvisionDataModule("fashion_mnist")
    monkeypatch.delenv("MINIVFM_DATA")
    assert data_root() == REPO / "datasets"
    with pytest.raises(ValueError, match="name='svhn'"):
        TorchvisionDataset("svhn")


# --- DataModules -----------------------------------------------------------------------------


@pytest.fixture
def ci(monkeypatch):
    monkeypatch.setenv("MINIVFM_PROFILE", "ci")


@pytest.mark.parametrize("cls", [ShapesDataModule, DigitsDataModule, TorchvisionDataModule])
def test_datamodule_signatures_are_cli_ready(cls):
    params = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"]
    for p in params:
        assert p.annotation is not inspect.Parameter.empty, f"{cls.__name__}({p.name}) has no type annotation"
        assert f"{p.name}:" in cls.__doc__, f"{cls.__name__} docstring does not describe {p.name}"
    assert "Arguments:" in cls.__doc__
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    assert {f"data.{p.name}" for p in params} <= {a.dest for a in parser._actions}


def test_shapes_datamodule(ci):
    dm = ShapesDataModule(num_workers=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (12, 3, 32)  # before setup
    assert dm.class_names[0] == "red circle"
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (2_000, 500, 1_000)
    assert dm.batch_size == 64
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 3, 32, 32) and batch["label"].shape == (64,)
    assert len(batch["boxes"]) == 64 and len(batch["caption"]) == 64
    val = next(iter(dm.val_dataloader()))
    assert not torch.equal(val["image"][0], dm.train_set[0]["image"])  # splits use different seeds
    assert not torch.equal(dm.test_set[0]["image"], dm.train_set[0]["image"])
    other = ShapesDataModule(seed=1, image_size=16, colors=["red", "blue"], shapes=["circle"], batch_size=8)
    assert (other.num_classes, other.image_size, other.class_names) == (2, 16, ("red circle", "blue circle"))
    assert next(iter(other.test_dataloader()))["image"].shape == (8, 3, 16, 16)
    with pytest.raises(ValueError, match="colors"):
        ShapesDataModule(colors=["mauve"])
    with pytest.raises(ValueError, match="batch_size"):
        ShapesDataModule(batch_size=0)


def test_shapes_datamodule_profiles(monkeypatch):
    monkeypatch.setenv("MINIVFM_PROFILE", "cpu")
    assert len(ShapesDataModule().train_set) == 20_000
    monkeypatch.setenv("MINIVFM_PROFILE", "gpu")
    assert len(ShapesDataModule().train_set) == 100_000


def test_digits_datamodule(ci):
    dm = DigitsDataModule(channels=3, image_size=16)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 16)
    assert dm.class_names[7] == "seven"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 3, 16, 16)
    assert sum(len(b["label"]) for b in dm.test_dataloader()) == 450


def test_torchvision_datamodule_on_tiny_files(tmp_path, ci):
    make_mnist(tmp_path, folder="mnist", n_train=2_600, n_test=1_200)
    dm = TorchvisionDataModule("mnist", root=str(tmp_path), image_size=32)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 32)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (2_000, 260, 1_000)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 1, 32, 32) and batch["caption"][0].startswith("a handwritten")
    full = TorchvisionDataModule("mnist", root=str(tmp_path), num_train=0, num_test=0)
    full.setup()
    assert (len(full.train_set), len(full.test_set)) == (2_340, 1_200)
    make_cifar(tmp_path)
    dm = TorchvisionDataModule("cifar10", root=str(tmp_path), batch_size=4)
    assert (dm.in_channels, dm.image_size, dm.class_names[0]) == (3, 32, "airplane")
    dm.setup()
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 32, 32)


# --- speed -----------------------------------------------------------------------------------


@pytest.mark.benchmark
def test_shapes_speed_benchmark():
    """Images per second on one thread, by wall clock and by this process's CPU time (the second is
    what one free core would do when the machine is shared)."""

    def rate(run, n: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = Shapes(num_samples=10_240)
        ds.get_batch(range(256))  # warm up
        rates = {
            "get_batch(256 indices)": rate(
                lambda: [ds.get_batch(range(i, i + 256)) for i in range(0, 10_240, 256)], 10_240
            ),
            "DataLoader(batch_size=256, shuffle=True, collate_fn=collate)": rate(
                lambda: list(DataLoader(ds, batch_size=256, shuffle=True, collate_fn=collate)), 10_240
            ),
            "ds[i] one by one (cached chunks)": rate(lambda: [ds[i] for i in range(2_560)], 2_560),
        }
    finally:
        torch.set_num_threads(threads)
    print("\nShapes 32x32, 1 thread, images/s (wall clock, CPU time):")
    for name, (wall, cpu) in rates.items():
        print(f"  {name}: {wall:,.0f}, {cpu:,.0f}")
    assert all(wall > 0 and cpu > 0 for wall, cpu in rates.values())
