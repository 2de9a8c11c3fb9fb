"""``minivfm results``: train and evaluate models, print the README results rows.

Each model module has a ``results(profile: str) -> dict`` that trains the model on
its default data under the profile and returns its metrics, ``seconds`` and
``baselines`` (for each metric what it means to beat: chance, the real-data floor
of a Frechet distance, a trivial reconstruction). This module runs them one after
another, prints the README results table and writes JSON::

    minivfm results vit --profile cpu --json results.json
    {"vit": {"shapes_acc": 0.96, "digits_acc": 0.99, "seconds": 315.0,
             "baselines": {"shapes_acc": 0.083, "digits_acc": 0.1}}}
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from collections.abc import Callable, Sequence

from minivfm.profiles import PROFILES, profile

# model name -> "module" with a ``results(profile)`` function (or "module:function"), in course order.
MODELS: dict[str, str] = {
    "vae": "minivfm.models.vae",
    "vqvae": "minivfm.models.vae:results_vqvae",
    "gan": "minivfm.models.gan",
    "ddpm": "minivfm.models.ddpm",
    "vit": "minivfm.models.vit",
    "mae": "minivfm.models.mae",
    "dino": "minivfm.models.dino",
    "clip": "minivfm.models.clip",
    "sam": "minivfm.models.sam",
}


def _function(name: str):
    module, _, function = MODELS[name].partition(":")
    return getattr(importlib.import_module(module), function or "results", None)


def available() -> list[str]:
    """Models whose module is importable and has a ``results`` function."""
    names = []
    for name in MODELS:
        try:
            fn = _function(name)
        except ImportError:
            continue
        if callable(fn):
            names.append(name)
    return names


def runner(name: str) -> Callable[[str], dict]:
    if name not in MODELS:
        raise ValueError(f"model: {name!r} is not one of {', '.join(MODELS)}")
    fn = _function(name)
    if not callable(fn):
        raise ValueError(f"model: {name!r} has no results() yet")
    return fn


def run(names: Sequence[str], profile_name: str | None = None) -> dict[str, dict]:
    """Run ``results(profile)`` for each model, one after another; returns
    ``{model: {metric: value, ..., "seconds": s, "baselines": {metric: value}}}``."""
    prof = profile(profile_name)
    out: dict[str, dict] = {}
    for name in names:
        fn = runner(name)
        start = time.perf_counter()
        metrics = dict(fn(prof))
        metrics.setdefault("seconds", time.perf_counter() - start)
        baselines = {k: float(v) for k, v in metrics.pop("baselines", {}).items()}
        out[name] = {**{k: float(v) for k, v in metrics.items()}, "baselines": baselines}
        print(f"minivfm results: {name} done in {out[name]['seconds']:.0f} s", flush=True)
    return out


def table(results: dict[str, dict], profile_name: str) -> str:
    """The README results table: the command, then one row per metric with its baseline and the
    model's seconds (training and evaluation)."""
    command = f"minivfm results {' '.join(results)} --profile {profile_name}"
    lines = [f"`{command}`", "", "| model | metric | value | baseline | seconds |", "|---|---|---|---|---|"]
    for name, metrics in results.items():
        secs = metrics.get("seconds", float("nan"))
        baselines = metrics.get("baselines", {})
        for key, value in metrics.items():
            if key.endswith("seconds") or key in ("baselines", "num_samples"):
                continue  # timings and sizes stay in the JSON
            base = f"{baselines[key]:.4g}" if key in baselines else ""
            lines.append(f"| {name} | {key} | {value:.4g} | {base} | {secs:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minivfm results",
        description="Train and evaluate models under a profile; print the README results rows.",
    )
    parser.add_argument("models", nargs="*", help=f"models to run (default: all available; known: {', '.join(MODELS)})")
    parser.add_argument("--profile", choices=PROFILES, default=None, help="sizes to use (default: MINIVFM_PROFILE)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    args = parser.parse_args(list(argv) if argv is not None else None)
    names = args.models or available()
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    prof = profile(args.profile)
    if args.profile:
        os.environ["MINIVFM_PROFILE"] = prof
    results = run(names, prof)
    print(table(results, prof))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0
