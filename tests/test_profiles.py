import pytest

import minivfm
from minivfm.profiles import PROFILES, pick, profile


def test_profile_reads_env(monkeypatch):
    for name in PROFILES:
        monkeypatch.setenv("MINIVFM_PROFILE", name.upper())
        assert profile() == name


def test_profile_default_without_env(monkeypatch):
    monkeypatch.delenv("MINIVFM_PROFILE", raising=False)
    monkeypatch.setattr("minivfm.profiles._cuda_available", lambda: False)
    assert profile() == "cpu"
    monkeypatch.setattr("minivfm.profiles._cuda_available", lambda: True)
    assert profile() == "gpu"


def test_bad_profile_lists_choices(monkeypatch):
    monkeypatch.setenv("MINIVFM_PROFILE", "laptop")
    with pytest.raises(ValueError, match=r"MINIVFM_PROFILE='laptop'.*ci, cpu, gpu"):
        profile()
    with pytest.raises(ValueError, match=r"profile='tiny'.*ci, cpu, gpu"):
        profile("tiny")


def test_pick(monkeypatch):
    monkeypatch.setenv("MINIVFM_PROFILE", "ci")
    assert pick(ci=1, cpu=2, gpu=3) == 1
    assert pick(ci=1, cpu=2, gpu=3, name="gpu") == 3
    assert pick(ci=1, cpu=2, name="gpu") == 2  # gpu falls back to cpu
    assert minivfm.pick(ci="a", cpu="b", name="cpu") == "b"


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_configure_threads_uses_the_idle_cores(monkeypatch, restore_threads, capsys):
    import torch

    monkeypatch.delenv("MINIVFM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr("minivfm.profiles._busy_cores", lambda: 0.2)
    assert minivfm.configure_threads() == 4 and torch.get_num_threads() == 4
    assert capsys.readouterr().out == ""  # nothing to say on an idle machine
    monkeypatch.setattr("minivfm.profiles._busy_cores", lambda: 1.9)
    assert minivfm.configure_threads() == 2 and torch.get_num_threads() == 2
    assert "other processes are busy" in capsys.readouterr().out
    monkeypatch.setattr("minivfm.profiles._busy_cores", lambda: 7.0)
    assert minivfm.configure_threads() == 1  # never fewer than one
    monkeypatch.setattr("minivfm.profiles._busy_cores", lambda: None)  # no /proc/stat: all cores
    assert minivfm.configure_threads() == 4


def test_configure_threads_respects_the_user(monkeypatch, restore_threads):
    import torch

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr("minivfm.profiles._busy_cores", lambda: 3.0)
    monkeypatch.setenv("MINIVFM_THREADS", "3")
    assert minivfm.configure_threads() == 3
    assert minivfm.configure_threads(2) == 2  # an explicit count wins over the variable
    assert minivfm.configure_threads(16) == 4  # capped at the cores
    monkeypatch.setenv("MINIVFM_THREADS", "many")
    with pytest.raises(ValueError, match="MINIVFM_THREADS='many'"):
        minivfm.configure_threads()
    monkeypatch.delenv("MINIVFM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert minivfm.configure_threads() == 1  # OMP_NUM_THREADS set by the user: left alone


def test_busy_cores_reads_proc_stat() -> None:
    from minivfm.profiles import _busy_cores

    busy = _busy_cores(0.05)
    assert busy is None or -0.01 <= busy <= (__import__("os").cpu_count() or 1) + 0.01


def test_fill_from_preset_reaches_through_a_subclass_that_takes_kwargs() -> None:
    """Lesson 04 subclasses ViTClassifier with ``__init__(self, **kwargs)``: the preset must still fill it."""
    from minivfm.models.vit import ViTClassifier, ViTConfig

    class Yours(ViTClassifier):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    model = Yours(profile="ci", depth=1)
    cfg = ViTConfig.preset("ci")
    assert model.hparams["depth"] == 1 and model.hparams["embed_dim"] == cfg.embed_dim
    assert all(v is not None for v in model.hparams.values())


def test_preset_arguments_keeps_the_constructor_arguments_only() -> None:
    from dataclasses import dataclass

    from minivfm.profiles import preset_arguments

    @dataclass
    class Config:
        width: int = 8
        depth: int = 2
        num_train: int = 100  # data size, not a model argument

    class Model:
        def __init__(self, width: int | None = None, depth: int | None = None, profile: str | None = None) -> None:
            pass

    assert preset_arguments(Config(width=16), Model) == {"width": 16, "depth": 2}
