"""The ``minivfm`` command: Lightning's CLI plus the course commands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT, timeout=600, env=None):
    env = {**os.environ, "MINIVFM_PROFILE": "ci", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "minivfm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_lightning_and_course_commands():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    for word in ("fit", "test", "validate", "grade", "course build", "results"):
        assert word in out.stdout


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_model_has_a_config():
    assert {p.stem for p in CONFIGS} >= {"vae", "vqvae", "gan", "ddpm", "vit"}


@pytest.fixture
def printed_config(capsys, monkeypatch):
    """``minivfm fit ARGS --print_config`` under ci, in this process (a subprocess costs seconds of imports)."""
    import yaml

    from minivfm.cli import main

    monkeypatch.setenv("MINIVFM_PROFILE", "ci")
    monkeypatch.chdir(ROOT)

    def printed(*args) -> dict:
        capsys.readouterr()
        assert main(["fit", *args, "--print_config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    return printed


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_print_config_shows_the_values_that_will_be_used(config, printed_config):
    """No ``null`` left in the model's arguments: the preset and the linked data sizes fill them."""
    printed = printed_config("--config", str(config))
    assert printed["model"]["class_path"].startswith(f"minivfm.models.{config.stem.replace('vq', '')}.")
    assert printed["data"]["class_path"] == "minivfm.data.ShapesDataModule"
    model = printed["model"]["init_args"]
    assert model and all(v is not None for v in model.values()), model
    assert "profile" not in model
    trainer = printed["trainer"]
    assert trainer["max_epochs"] not in (None, -1) or trainer["max_steps"] not in (None, -1), trainer
    data = printed["data"]["init_args"]
    assert data["batch_size"] and data["num_train"], data


def test_data_sizes_reach_the_model_through_links(printed_config):
    printed = printed_config("--config", "configs/gan.yaml", "--data", "minivfm.data.DigitsDataModule")
    model = printed["model"]["init_args"]
    assert (model["in_channels"], model["num_classes"], model["image_size"]) == (1, 10, 32), model
    vit = printed_config("--config", "configs/vit.yaml", "--data.init_args.image_size", "24")
    assert (vit["model"]["init_args"]["image_size"], vit["model"]["init_args"]["in_chans"]) == (24, 3)


# what `minivfm fit` prints and draws for each kind of model
EXPECTED = {
    "vit": (["test/acc = "], ["predictions.png"]),
    "vae": (["test/recon_mse = ", "sample_fd = "], ["samples.png", "reconstructions.png"]),
    "vqvae": (["test/recon_mse = ", "test/codes_used = "], ["reconstructions.png"]),
    "gan": (["sample_fd = ", "sample_acc = "], ["samples.png"]),
    "ddpm": (["test/loss = ", "sample_fd = ", "sample_acc = "], ["samples.png"]),
    "mae": (["test/loss = "], ["reconstructions.png"]),
    "dino": (["test/loss = "], []),
    "clip": (["test/loss = ", "test/zeroshot_acc = "], []),
    "sam": (["test/miou_point = ", "test/miou_box = "], []),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_trains_tests_and_draws(config, tmp_path):
    """``minivfm fit --config configs/<model>.yaml`` end to end under ci (one short epoch)."""
    out = run(
        "fit", "--config", str(config), "--trainer.max_epochs", "1", "--data.init_args.num_train", "256",
        "--trainer.logger.init_args.save_dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    printed, figures = EXPECTED[config.stem]
    for line in printed:
        assert line in out.stdout, (line, out.stdout[-2000:])
    version = next(tmp_path.glob("*/version_0"))
    assert list(version.glob("checkpoints/*.ckpt"))
    for name in ["curves.png", *figures]:
        assert (version / name).exists(), name


def test_results_rejects_unknown_model():
    out = run("results", "resnet")
    assert out.returncode == 2
    assert "unknown model" in out.stderr


def test_course_without_build_is_usage_error():
    out = run("course")
    assert out.returncode == 2
    assert "course build" in out.stderr


@pytest.mark.slow
def test_results_json(tmp_path):
    path = tmp_path / "r.json"
    out = run("results", "vit", "--profile", "ci", "--json", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(path.read_text())
    assert set(data["vit"]) >= {"shapes_acc", "digits_acc", "seconds", "baselines"}
    assert data["vit"]["baselines"]["shapes_acc"] == pytest.approx(1 / 12)
    assert "`minivfm results vit --profile ci`" in out.stdout
    assert "| vit | shapes_acc |" in out.stdout and "| 0.08333 |" in out.stdout
