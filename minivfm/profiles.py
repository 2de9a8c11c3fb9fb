"""Profiles: one place that decides how big everything is.

``MINIVFM_PROFILE`` picks the sizes of models, data and training runs:

- ``ci``: tiny, proves that the code runs and learns (the whole course under
  nbval in well under 30 minutes on 2 CPU cores);
- ``cpu``: the default without a GPU, each lesson in about 10 minutes on a laptop;
- ``gpu``: the default with CUDA, larger models, more data, bf16 mixed precision.

Every notebook, config and model preset reads the profile through
:func:`profile` (or :func:`pick`), never from scattered constants.
"""

from __future__ import annotations

import os
from typing import TypeVar

PROFILES = ("ci", "cpu", "gpu")
ENV_VAR = "MINIVFM_PROFILE"

T = TypeVar("T")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


def profile(name: str | None = None) -> str:
    """Return the active profile name.

    Arguments:
        name: an explicit profile; ``None`` reads ``MINIVFM_PROFILE`` and falls
            back to ``"gpu"`` when CUDA is available, else ``"cpu"``.

    Raises:
        ValueError: the name (or the environment variable) is not one of
            ``ci``, ``cpu``, ``gpu``.
    """
    source = "profile"
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip()
        source = ENV_VAR
        if not name:
            return "gpu" if _cuda_available() else "cpu"
    key = str(name).strip().lower()
    if key not in PROFILES:
        raise ValueError(f"{source}={name!r} is not a profile; expected one of {', '.join(PROFILES)}")
    return key


def pick(ci: T, cpu: T, gpu: T | None = None, *, name: str | None = None) -> T:
    """Pick the value for the active profile: ``pick(ci=2, cpu=20, gpu=100)``.

    ``gpu`` defaults to the ``cpu`` value.
    """
    key = profile(name)
    if key == "ci":
        return ci
    if key == "gpu" and gpu is not None:
        return gpu
    return cpu
