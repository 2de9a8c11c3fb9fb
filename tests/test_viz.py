import matplotlib
import pytest
import torch

from minivfm import viz

matplotlib.use("Agg")


@pytest.fixture
def images():
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_image_grid_writes_png(images, tmp_path):
    fig = viz.image_grid(images, nrow=3, titles=[str(i) for i in range(6)], path=tmp_path / "a" / "grid.png")
    assert len([ax for ax in fig.axes if ax.images]) == 6
    assert (tmp_path / "a" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_grid_grayscale_and_unit_range():
    arr = viz.to_numpy_images(torch.zeros(2, 1, 8, 8), value_range=(0, 1))
    assert arr.shape == (2, 8, 8, 3)
    assert viz.to_numpy_images(torch.full((3, 4, 4), -1.0)).max() == 0.0


@pytest.mark.parametrize(
    "bad, match",
    [(torch.zeros(2, 5, 8, 8), "images"), (torch.zeros(8, 8), "images")],
)
def test_image_grid_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        viz.image_grid(bad)


def test_image_grid_titles_must_match(images):
    with pytest.raises(ValueError, match="titles"):
        viz.image_grid(images, titles=["x"])


def test_mask_overlay(images, tmp_path):
    masks = torch.zeros(6, 16, 16, dtype=torch.long)
    masks[:, 2:6, 2:6] = 1
    boxes = [torch.tensor([[2.0, 2.0, 6.0, 6.0]])] * 6
    fig = viz.mask_overlay(images, masks, boxes=boxes, captions=["a small red square"] * 6, path=tmp_path / "m.png")
    assert (tmp_path / "m.png").exists()
    assert sum(len(ax.patches) for ax in fig.axes) == 6
    with pytest.raises(ValueError, match="masks"):
        viz.mask_overlay(images, masks[:, :8])


def test_attention_maps(images, tmp_path):
    attn = torch.softmax(torch.randn(2, 3, 17, 17), -1)
    fig = viz.attention_maps(images[:2], attn, patch_size=4, path=tmp_path / "attn.png")
    assert len(fig.axes) == 2 * 4
    with pytest.raises(ValueError, match="patch_size"):
        viz.attention_maps(images[:2], attn, patch_size=8)


def test_training_curves_from_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/acc\n0,9,2.0,\n0,9,,0.5\n1,19,1.0,\n1,19,,0.8\n")
    fig = viz.training_curves(tmp_path, path=tmp_path / "curves.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "acc"]
    with pytest.raises(KeyError, match="keys"):
        viz.training_curves(csv, keys=["nope"])
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        viz.training_curves(tmp_path / "missing")
