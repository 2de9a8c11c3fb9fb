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


# -- threads ------------------------------------------------------------------------------------

THREADS_VAR = "MINIVFM_THREADS"


def _busy_cores(interval: float = 0.25) -> float | None:
    """How many cores other processes kept busy over ``interval`` seconds (Linux ``/proc/stat``)."""
    import time

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / (total1 - total0))


def configure_threads(threads: int | None = None, verbose: bool = False) -> int:
    """Set torch's CPU thread count to the cores that are free now, and return it.

    PyTorch's OpenMP threads spin while they wait for each other; when another process holds one of
    the cores, a thread that has lost its core keeps the others spinning, and a training step gets
    many times slower (measured on 2 cores with one busy: 121 ms a ViT step with two threads, 35 ms
    with one). So the library's entry points (the ``minivfm`` command, the lessons) run with as many
    threads as there are idle cores: all of them on an idle machine, fewer on a busy one.

    Arguments:
        threads: a fixed count; ``None`` reads ``MINIVFM_THREADS``, else measures the idle cores.
            ``OMP_NUM_THREADS`` set by the user is respected and nothing is changed.
        verbose: print the decision; otherwise it is printed only when busy cores lowered the count.
    """
    import torch

    cores = os.cpu_count() or 1
    if threads is None and os.environ.get(THREADS_VAR, "").strip():
        value = os.environ[THREADS_VAR].strip()
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"{THREADS_VAR}={value!r} is not an int") from None
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    measured = threads is None
    if measured:
        busy = _busy_cores()
        threads = cores if busy is None else round(cores - busy)
    threads = max(1, min(int(threads), cores))
    torch.set_num_threads(threads)
    if verbose or (measured and threads < cores):
        why = " (other processes are busy; MINIVFM_THREADS=N overrides)" if measured and threads < cores else ""
        print(f"minivfm: {threads} torch thread(s) of {cores} cores{why}")
    return threads


def fill_from_preset(module, preset) -> None:
    """Replace the ``None`` entries of ``module.hparams`` with ``preset``'s fields of the same name.

    Every ``Lit<Model>`` calls it right after ``self.save_hyperparameters()``: arguments left unset (in
    Python, in a ``configs/<model>.yaml`` or on the ``minivfm`` command line) come from the profile's
    preset, and the filled-in values are what ``hparams.yaml``, a checkpoint and ``--print_config``'s
    run record, so a checkpoint does not depend on the profile it was trained under. ``profile`` itself
    is dropped (it was only needed to pick ``preset``).
    """
    import inspect

    # the named arguments of every __init__ up the class tree (a lesson's subclass may take **kwargs)
    params: dict[str, inspect.Parameter] = {}
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("lightning", "torch")):
            break
        if "__init__" in vars(cls):
            for name, param in inspect.signature(cls.__init__).parameters.items():
                if name not in ("self", "profile") and param.kind is param.POSITIONAL_OR_KEYWORD:
                    params.setdefault(name, param)
    # under LightningCLI, save_hyperparameters() records the config's init_args, linked sizes that
    # this model does not take included, and only those: keep the arguments, fill in the defaults
    hparams = {k: v for k, v in module.hparams.items() if k in params or k.startswith("_")}
    for name, param in params.items():
        hparams.setdefault(name, param.default)
    for key, value in hparams.items():
        if value is None and hasattr(preset, key):
            hparams[key] = getattr(preset, key)
    hparams.pop("profile", None)
    module.hparams.clear()
    module.save_hyperparameters(hparams)


def preset_arguments(cfg, cls) -> dict:
    """The fields of the preset dataclass ``cfg`` that are arguments of ``cls.__init__``, as a dict:
    what a ``Lit<Model>.from_config(cfg)`` passes to its constructor."""
    import inspect
    from dataclasses import asdict, fields

    names = {f.name for f in fields(cfg)} & set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in asdict(cfg).items() if k in names}
