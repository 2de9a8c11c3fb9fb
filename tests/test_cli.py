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


def test_print_config_resolves_the_vit_config():
    out = run("fit", "--config", "configs/vit.yaml", "--print_config")
    assert out.returncode == 0, out.stderr
    assert "minivfm.models.vit.ViTClassifier" in out.stdout
    assert "minivfm.data.ShapesDataModule" in out.stdout


def test_results_rejects_unknown_model():
    out = run("results", "resnet")
    assert out.returncode == 2
    assert "unknown model" in out.stderr


def test_course_without_build_is_usage_error():
    out = run("course")
    assert out.returncode == 2
    assert "course build" in out.stderr


@pytest.mark.slow
def test_fit_writes_checkpoint_figures_and_prints_accuracy(tmp_path):
    out = run(
        "fit", "--config", str(ROOT / "configs/vit.yaml"),
        "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir", str(tmp_path),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/acc = " in out.stdout
    version = tmp_path / "vit" / "version_0"
    assert list(version.glob("checkpoints/*.ckpt"))
    assert (version / "curves.png").exists() and (version / "predictions.png").exists()


@pytest.mark.slow
def test_results_json(tmp_path):
    path = tmp_path / "r.json"
    out = run("results", "vit", "--profile", "ci", "--json", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(path.read_text())
    assert set(data["vit"]) >= {"shapes_acc", "digits_acc", "seconds"}
    assert "| vit | shapes_acc |" in out.stdout
