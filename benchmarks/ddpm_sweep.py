"""Guided ``sample_acc`` and ``sample_fd`` of the cpu DDPM, for training knobs and guidance variants.

Two commands, both on one CPU thread so that two runs can share a 2-core machine:

``train``: the ``cpu`` preset (``DDPMConfig.preset("cpu")``) with overrides, trained exactly as
``minivfm results ddpm`` trains it (``DDPM.from_config``, ``fit``; seed 0 unless ``--seed``); saves the EMA weights
to ``OUT/NAME.pt`` and scores 50-step guided DDIM samples (the preset's scale and guidance interval;
labels cycling through the classes, generator seed 1) with :mod:`minivfm.metrics`. About 18 minutes
(50 on the 2.8x slower AVX2-only machine)::

    python benchmarks/ddpm_sweep.py train base
    python benchmarks/ddpm_sweep.py train lf25 t_low_fraction=0.25
    python benchmarks/ddpm_sweep.py train g20 min_snr_gamma=20.0
    python benchmarks/ddpm_sweep.py train seed1 --seed 1      # the run-to-run spread

``guide``: loads a checkpoint from ``train`` and scores guidance variants with the library's own
``sample_ddim`` (so thresholding and the eps re-derivation are unchanged). About 80 s a variant::

    python benchmarks/ddpm_sweep.py guide base --variant mode=cfg,scale=12,hi=850 --variant mode=apg,scale=8,eta=0

Variants (``lo <= t < hi``: where guidance applies; elsewhere the conditional eps, scale 1, as in
Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval"):

- ``cfg``: Ho & Salimans eq. 6, ``u + s (c - u)``;
- ``apg``: Sadat et al. 2025, "Eliminating Oversaturation and Artifacts of High Guidance Scales":
  the x0-space update ``c - u`` split into the part parallel to the conditional x0 (weight ``eta``)
  and the orthogonal part, its norm clipped at ``r``, with momentum ``beta``;
- ``rescale``: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed",
  sec. 3.4: the guided x0 rescaled to the conditional x0's standard deviation, mixed with weight ``phi``.

Each line of output is also appended to ``OUT/results.jsonl``.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from minivfm import metrics
from minivfm.models import ddpm as D


def parse_pairs(pairs: list[str]) -> dict:
    """``["lr=1e-3", "channels=(48, 64)"]`` -> ``{"lr": 0.001, "channels": (48, 64)}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a plain string, e.g. t_sampling=uniform
    return out


class Guided(nn.Module):
    """Wraps an eps-model so that the library's ``_guided_eps`` (one batched forward of the
    conditional and null halves, then ``cfg_mix(c, u, s)``) returns this variant's guided eps ``g``:
    the unconditional half is replaced by ``u' = (g - s c) / (1 - s)``, so ``u' + s (c - u') = g``."""

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, scale: float, mode: str = "cfg", lo: int = 0,
                 hi: int = 10**9, eta: float = 1.0, r: float | None = None, beta: float = 0.0,
                 phi: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        if scale == 1.0 or mode not in ("cfg", "apg", "rescale"):
            raise SystemExit(f"need scale != 1 and mode in cfg/apg/rescale, got scale {scale}, mode {mode!r}")
        self.net, self.abar, self.scale, self.mode = net, alphas_cumprod, scale, mode
        self.lo, self.hi, self.eta, self.r, self.beta, self.phi = lo, hi, eta, r, beta, phi
        self.num_classes, self.self_condition, self.momentum = net.num_classes, False, None

    def guide_x0(self, x0c: Tensor, x0u: Tensor) -> Tensor:
        s = self.scale
        if self.mode == "rescale":
            x0g = x0u + s * (x0c - x0u)
            ratio = x0c.flatten(1).std(1) / x0g.flatten(1).std(1)
            return self.phi * x0g * ratio.view(-1, 1, 1, 1) + (1 - self.phi) * x0g
        diff = x0c - x0u  # apg
        if self.beta:
            self.momentum = diff if self.momentum is None else diff + self.beta * self.momentum
            diff = self.momentum
        if self.r is not None:
            diff = diff * (self.r / diff.flatten(1).norm(dim=1)).clamp(max=1.0).view(-1, 1, 1, 1)
        unit = x0c.flatten(1) / x0c.flatten(1).norm(dim=1, keepdim=True)
        par = ((diff.flatten(1) * unit).sum(1, keepdim=True) * unit).view_as(diff)
        return x0c + (s - 1) * (diff - par + self.eta * par)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c, u = self.net(x, t, y).chunk(2)
        x, t0 = x.chunk(2)[0], int(t[0])
        if D.guidance_at(t0, self.scale, (self.lo, self.hi)) == 1.0:  # the library's interval rule (scale != 1)
            g = c
        elif self.mode == "cfg":
            g = D.cfg_mix(c, u, self.scale)
        else:
            abar = self.abar[t0]
            x0g = self.guide_x0(D.predict_x0(c, x, abar), D.predict_x0(u, x, abar))
            g = (x - abar.sqrt() * x0g) / (1 - abar).sqrt()  # eps from x0, as ddim_update re-derives it
        return torch.cat([c, (g - self.scale * c) / (1 - self.scale)])


def score(name: str, x: Tensor, y: Tensor, out: Path, **info) -> None:
    row = dict(name=name, **info, n=len(y), acc=round(metrics.sample_acc(x, y), 4), fd=round(metrics.sample_fd(x), 2))
    print(json.dumps(row), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def draw(net: nn.Module, model: D.DDPM, cfg: D.DDPMConfig, n: int, scale: float,
         interval: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, float]:  # fmt: skip
    y = torch.arange(n) % cfg.num_classes
    t = time.perf_counter()
    x = D.sample_ddim(net.eval(), model.schedule, (n, cfg.in_channels, cfg.image_size, cfg.image_size), y, scale,
                      cfg.ddim_steps, generator=torch.Generator().manual_seed(1), clip_sample=cfg.clip_sample,
                      threshold=cfg.threshold, guidance_interval=interval)  # fmt: skip
    return x, y, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("train", "guide"))
    p.add_argument("name", help="train: the run's name; guide: the name of a trained run")
    p.add_argument("overrides", nargs="*", help="DDPMConfig fields, key=value")
    p.add_argument("--variant", action="append", default=[],
                   help="guide: mode=...,scale=...[,lo=,hi=,eta=,r=,beta=,phi=]")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="train: the training seed (init, batches, noise)")
    p.add_argument("--n", type=int, default=480, help="samples per score (std of acc ~0.016 at 480)")
    p.add_argument("--out", type=Path, default=Path("outputs/ddpm_sweep"))
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    over = parse_pairs(args.overrides)
    ckpt = args.out / f"{args.name}.pt"
    saved = torch.load(ckpt) if args.command == "guide" else {"overrides": {}}
    cfg = replace(D.DDPMConfig.preset("cpu"), **{**saved["overrides"], **over})
    if args.command == "train":
        L.seed_everything(args.seed, workers=True)
        images, labels = D.shapes_tensors(cfg.num_train, cfg.image_size, seed=0)
        model = D.DDPM.from_config(cfg)
        t = time.perf_counter()
        D.fit(model, images, labels, cfg.batch_size, cfg.max_steps, "cpu")
        train_s = round(time.perf_counter() - t)
        torch.save({"overrides": over, "ema": model.ema.state_dict()}, ckpt)
        x, y, secs = draw(model.ema, model, cfg, args.n, cfg.guidance_scale, cfg.guidance_interval)
        score(args.name, x, y, args.out, overrides=str(over), seed=args.seed, scale=cfg.guidance_scale, train_s=train_s,
              sample_s=round(secs))  # fmt: skip
        return
    model = D.DDPM.from_config(cfg)
    model.ema.load_state_dict(saved["ema"])
    preset = f"mode=cfg,scale={cfg.guidance_scale}"  # the preset's guidance, as the train score draws it
    if cfg.guidance_interval is not None:
        preset += ",lo={},hi={}".format(*cfg.guidance_interval)
    for spec in args.variant or [preset]:
        kw = parse_pairs(spec.split(","))
        net = Guided(model.ema.eval(), model.schedule.alphas_cumprod, **kw)
        x, y, secs = draw(net, model, cfg, args.n, kw["scale"])
        score(args.name, x, y, args.out, variant=spec, sample_s=round(secs))


if __name__ == "__main__":
    main()
