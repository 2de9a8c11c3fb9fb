"""``minivfm results``: train and evaluate models, print the README results rows.

Each model module has ``results(profile: str) -> dict[str, float]`` that trains
the model on its default data under the profile and returns its metrics and
``seconds``. This module runs them, prints a Markdown table (the rows of the
README results table) and writes JSON::

    minivfm results vit --profile cpu --json results.json
    {"vit": {"shapes_acc": 0.97, "digits_acc": 0.98, "seconds": 120.0}}
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from collections.abc import Callable, Sequence

from minivfm.profiles import PROFILES, profile

# model name -> module with a ``results(profile)`` function, in course order.
MODELS: dict[str, str] = {
    "vae": "minivfm.models.vae",
    "gan": "minivfm.models.gan",
    "ddpm": "minivfm.models.ddpm",
    "vit": "minivfm.models.vit",
}


def available() -> list[str]:
    """Models whose module is importable and has a ``results`` function."""
    names = []
    for name, module in MODELS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if callable(getattr(mod, "results", None)):
            names.append(name)
    return names


def runner(name: str) -> Callable[[str], dict]:
    if name not in MODELS:
        raise ValueError(f"model: {name!r} is not one of {', '.join(MODELS)}")
    fn = getattr(importlib.import_module(MODELS[name]), "results", None)
    if not callable(fn):
        raise ValueError(f"model: {name!r} has no results() yet")
    return fn


def run(names: Sequence[str], profile_name: str | None = None) -> dict[str, dict[str, float]]:
    """Run ``results(profile)`` for each model; returns ``{model: {metric: value}}``."""
    prof = profile(profile_name)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        fn = runner(name)
        start = time.perf_counter()
        metrics = dict(fn(prof))
        metrics.setdefault("seconds", time.perf_counter() - start)
        out[name] = {k: float(v) for k, v in metrics.items()}
    return out


def table(results: dict[str, dict[str, float]], profile_name: str) -> str:
    """Markdown rows: model, metric, value, seconds, and the command that reproduces them."""
    lines = ["| model | metric | value | seconds | command |", "|---|---|---|---|---|"]
    for name, metrics in results.items():
        cmd = f"`minivfm results {name} --profile {profile_name}`"
        secs = metrics.get("seconds", float("nan"))
        for key, value in metrics.items():
            if key == "seconds":
                continue
            lines.append(f"| {name} | {key} | {value:.4g} | {secs:.0f} | {cmd} |")
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
