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
