"""Guided ``sample_acc`` and ``sample_fd`` of the cpu DDPM, for training knobs and guidance variants.

Five commands, all on one CPU thread so that two runs can share a 2-core machine:

``train``: the ``cpu`` preset (``DDPMConfig.preset("cpu")``) with overrides, trained exactly as
``minivfm results ddpm`` trains it (``DDPM.from_config``, ``fit``; seed 0 unless ``--seed``); saves the EMA weights
to ``OUT/NAME.pt`` and scores 50-step guided DDIM samples (the preset's scale and guidance interval;
labels cycling through the classes, generator seed 1) with :mod:`minivfm.metrics`. About 11-13 minutes
of training on an idle core of the faster 2-core machine (base 658-741 s), 36-50 on the 2.8x slower AVX2-only one::

    python benchmarks/ddpm_sweep.py train base
    python benchmarks/ddpm_sweep.py train lf25 t_low_fraction=0.25
    python benchmarks/ddpm_sweep.py train g20 min_snr_gamma=20.0
    python benchmarks/ddpm_sweep.py train seed1 --seed 1      # the run-to-run spread
    python benchmarks/ddpm_sweep.py train refine --arch refine  # U-Net variants: see build_arch
    python benchmarks/ddpm_sweep.py train base-e --ema 0.99 0.998  # more EMA decays, scored on the same run
    python benchmarks/ddpm_sweep.py train ag0 --snapshot 1000 2000  # also keeps ag0@1000.pt, ag0@2000.pt
    python benchmarks/ddpm_sweep.py train w64-lr1 "channels=(64, 128)" lr=1e-3 --clip 1.0  # clip: grad norm
    python benchmarks/ddpm_sweep.py train factor --arch factor  # shape + colour class embedding
    python benchmarks/ddpm_sweep.py train d4 --d4  # every training image in its 8 flips and quarter turns
    python benchmarks/ddpm_sweep.py train edge4 --edge 4  # loss on shape-outline pixels weighted 1 + 4
    python benchmarks/ddpm_sweep.py train angle --angle  # told the largest shape's rotation (a diagnostic)

Every score also splits ``sample_acc`` by the shape asked for (``by_shape``), and training prints its
mean loss every 500 steps.

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
- ``auto``, ``auto-u``: Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself":
  ``b + s (c - b)`` with ``b`` the conditional (``auto``) or null-class (``auto-u``) eps of a weaker
  model, ``bad=NAME`` (a trained run, or an early snapshot of one, ``train NAME --snapshot K`` saves
  ``NAME@K``), which must have the same architecture. ``cfg+auto``: ``u + s (c - u) + (w - 1) (c - b)``,
  both at once;
- ``cfg+cls``: Dhariwal & Nichol 2021 (classifier guidance, Algorithm 2 in eps form) on top of ``cfg``:
  ``u + s (c - u) - w sqrt(1 - a_t) grad log p(y | x_t)`` at ``t < chi``, with ``p`` the noise-aware
  classifier ``cls=NAME`` that the ``classifier`` command trains.
- ``neg``, ``cfg+neg``, ``cfg+negall``: steering away from the classes most often confused with y
  (negative prompting). ``n`` is the mean eps of the other shapes of y's colour (``neg``, ``cfg+neg``)
  or of every other class (``cfg+negall``); ``neg`` is ``n + s (c - n)``, the others
  ``u + s (c - u) + (w - 1) (c - n)``.

``classifier``: trains that classifier (``NoisyClassifier``) on the DDPM's training images noised to
``t < --t-max`` and prints its accuracy on noised real test images at each ``--t``. About 6 minutes::

    python benchmarks/ddpm_sweep.py classifier cls500 --steps 4000 --t-max 500 --t 0 100 200 300 500
    python benchmarks/ddpm_sweep.py guide base --variant mode=cfg+cls,scale=8,lo=0,hi=850,cls=cls500,w=10,chi=500

``diagnose``: where a trained run loses the class. Real test images (``metrics.real_images``, labels
known) are noised to ``t`` and then (a) denoised in one step, the conditional model's x_0 estimate,
clamped to [-1, 1] (``x0_acc``, ``x0_mse``), and (b) carried back to t = 0 by the preset's guided
50-step DDIM from ``t`` down (SDEdit, Meng et al. 2022; ``sdedit_acc``). A perfect denoiser keeps
``sdedit_acc`` near the real images' 0.996 at every ``t``; the drop from one ``t`` to a lower one is what
the model loses on that stretch of the chain. About 2 minutes for the default list::

    python benchmarks/ddpm_sweep.py diagnose base --t 100 200 300 500

``implicit``: whether the model itself tells the shapes apart (see ``implicit``): the share of real test
images whose true shape gives the smallest eps error among the three shape labels of their colour,
at each ``--t``, with ``--draws`` noises per image (16 and 64 give the same 0.825 for the preset at
t = 300; 4 are too few). About 30 s a ``t`` for the preset::

    python benchmarks/ddpm_sweep.py implicit base --t 100 300 500

Each line of output is also appended to ``OUT/results.jsonl``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from minivfm import metrics
from minivfm.data.shapes import DEFAULT_COLORS, SHAPES
from minivfm.models import ddpm as D
from minivfm.nn import timestep_embedding


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
                 phi: float = 0.0, bad: nn.Module | None = None, w: float = 1.0, cls: nn.Module | None = None,
                 chi: int = 10**9) -> None:  # fmt: skip
        super().__init__()
        modes = ("cfg", "apg", "rescale", "auto", "auto-u", "cfg+auto", "cfg+cls", "neg", "cfg+neg", "cfg+negall")
        if scale == 1.0 or mode not in modes:
            raise SystemExit(f"need scale != 1, a mode in {'/'.join(modes)}, got {mode!r}")
        if (cls is None) != (mode != "cfg+cls"):
            raise SystemExit("mode cfg+cls needs cls=NAME (a classifier from the classifier command), and only it")
        if (bad is None) != (mode not in ("auto", "auto-u", "cfg+auto")):
            raise SystemExit("modes auto, auto-u and cfg+auto need bad=NAME (and only they take it)")
        self.net, self.abar, self.scale, self.mode, self.bad, self.w = net, alphas_cumprod, scale, mode, bad, w
        self.cls, self.chi = cls, chi
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

    def negative(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The mean eps of the classes to steer away from: the other shapes of y's colour (``neg``,
        ``cfg+neg``), or every other class (``cfg+negall``)."""
        per, k = len(DEFAULT_COLORS), self.num_classes
        if self.mode == "cfg+negall":
            others = [(y + j) % k for j in range(1, k)]
        else:
            others = [((y // per + j) % len(SHAPES)) * per + y % per for j in range(1, len(SHAPES))]
        eps = self.net(x.repeat(len(others), 1, 1, 1), t.repeat(len(others)), torch.cat(others))
        return eps.view(len(others), *x.shape).mean(0)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c, u = self.net(x, t, y).chunk(2)
        x, t0 = x.chunk(2)[0], int(t[0])
        if D.guidance_at(t0, self.scale, (self.lo, self.hi)) == 1.0:  # the library's interval rule (scale != 1)
            g = c
        elif self.mode == "cfg":
            g = D.cfg_mix(c, u, self.scale)
        elif self.mode in ("auto", "auto-u"):  # autoguidance: the bad model, conditional or null, as u
            yb = y.chunk(2)[0] if self.mode == "auto" else y.chunk(2)[1]
            g = D.cfg_mix(c, self.bad(x, t.chunk(2)[0], yb), self.scale)
        elif self.mode == "cfg+cls":  # ADM's eps - w sqrt(1 - a) grad log p(y | x_t) (at t < chi), on top of cfg
            g = D.cfg_mix(c, u, self.scale)
            if t0 < self.chi:
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    logp = self.cls(xg, t.chunk(2)[0]).log_softmax(1).gather(1, y.chunk(2)[0][:, None]).sum()
                    grad = torch.autograd.grad(logp, xg)[0]
                g = g - self.w * (1 - self.abar[t0]).sqrt() * grad
        elif self.mode in ("neg", "cfg+neg", "cfg+negall"):  # contrast with the other classes
            n = self.negative(x, t.chunk(2)[0], y.chunk(2)[0])
            if self.mode == "neg":
                g = D.cfg_mix(c, n, self.scale)
            else:
                g = D.cfg_mix(c, u, self.scale) + (self.w - 1) * (c - n)
        elif self.mode == "cfg+auto":  # both: cfg on the good model, plus (w - 1) (c - b), b conditional
            g = D.cfg_mix(c, u, self.scale) + (self.w - 1) * (c - self.bad(x, t.chunk(2)[0], y.chunk(2)[0]))
        else:
            abar = self.abar[t0]
            x0g = self.guide_x0(D.predict_x0(c, x, abar), D.predict_x0(u, x, abar))
            g = (x - abar.sqrt() * x0g) / (1 - abar).sqrt()  # eps from x0, as ddim_update re-derives it
        return torch.cat([c, (g - self.scale * c) / (1 - self.scale)])


class TwoBlocks(nn.Module):
    """Two residual blocks where the U-Net has one, down and up (``--arch deep0``: the first level;
    ``deep1``: the second, 8x8 in the preset, where the attention is)."""

    def __init__(self, first: nn.Module, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.first, self.second = first, D.ResBlock(cout, cout, emb_dim)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.second(self.first(x, emb), emb)


class Refine(nn.Module):
    """``--arch refine``: a full-resolution head after the U-Net. It sees x_t and the U-Net's eps at
    H x W (the U-Net itself never works above H/patch) and adds a correction to eps:
    conv(2C -> w), FiLM by the U-Net's embedding, conv(w -> w), conv(w -> C), the last one zero-initialized."""

    def __init__(self, net: D.UNet, width: int = 32) -> None:
        super().__init__()
        C, E = net.in_channels, net.time_embed[-1].out_features
        self.net, self.num_classes, self.self_condition = net, net.num_classes, False
        self.conv1, self.emb = nn.Conv2d(2 * C, width, 3, padding=1), nn.Linear(E, 2 * width)
        self.norm = nn.GroupNorm(8, width)
        self.conv2, self.conv3 = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, C, 3, padding=1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, x_self_cond: Tensor | None = None) -> Tensor:
        eps = self.net(x, t, y)
        scale, shift = self.emb(torch.nn.functional.silu(self.net.embed(t, y)))[:, :, None, None].chunk(2, dim=1)
        h = self.norm(self.conv1(torch.cat([x, eps], dim=1))) * (1 + scale) + shift
        h = self.conv2(torch.nn.functional.silu(h))
        return eps + self.conv3(torch.nn.functional.silu(h))


class FactorEmbed(nn.Module):
    """``--arch factor``: the class embedding as a shape embedding plus a colour embedding
    (label = shape * colours + colour), so every colour's images train the same "square";
    the null class keeps an embedding of its own."""

    def __init__(self, num_classes: int, dim: int, per: int = len(DEFAULT_COLORS)) -> None:
        super().__init__()
        self.k, self.per = num_classes, per
        self.shape, self.colour = nn.Embedding(num_classes // per, dim), nn.Embedding(per, dim)
        self.null = nn.Parameter(torch.randn(dim))

    def forward(self, y: Tensor) -> Tensor:
        real = y.clamp(max=self.k - 1)
        e = (self.shape(real // self.per) + self.colour(real % self.per)) / 2**0.5
        return torch.where((y == self.k)[:, None], self.null, e)


class NoisyClassifier(nn.Module):
    """p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", sec. 4):
    the U-Net's down path (FiLM residual blocks conditioned on the timestep only), mean- and max-pooled,
    a linear head. Trained by ``classifier`` on the DDPM's own training images, never on the reference
    classifier's."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), num_classes: int = 12, emb_dim: int = 128,
                 patch: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.patch, self.c0 = patch, channels[0]
        self.time_embed = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(3 * patch * patch, channels[0], 3, padding=1)
        self.blocks, self.downs, prev = nn.ModuleList(), nn.ModuleList(), channels[0]
        for i, ch in enumerate(channels):
            self.blocks.append(D.ResBlock(prev, ch, emb_dim))
            last = i == len(channels) - 1
            self.downs.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            prev = ch
        self.norm, self.head = nn.GroupNorm(8, prev), nn.Linear(2 * prev, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_embed(timestep_embedding(t, self.c0))  # (B, E)
        h = self.stem(torch.nn.functional.pixel_unshuffle(x, self.patch))  # (B, c0, H/p, W/p)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))
        h = torch.nn.functional.silu(self.norm(h))
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))  # (B, K) logits


def train_classifier(cfg: D.DDPMConfig, steps: int, t_max: int, seed: int, batch_size: int = 128,
                     lr: float = 2e-3) -> NoisyClassifier:  # fmt: skip
    """Cross-entropy on the DDPM's training images noised to t ~ U[0, t_max), flips, one-cycle lr."""
    if steps < 40 or not 0 < t_max <= cfg.num_steps:
        raise SystemExit(f"classifier needs --steps >= 40 and 0 < --t-max <= {cfg.num_steps}, got {steps}, {t_max}")
    torch.manual_seed(seed)
    images, labels = D.shapes_tensors(cfg.num_train, cfg.image_size, seed=0)
    sched, net = D.NoiseSchedule(cfg.num_steps, cfg.schedule), NoisyClassifier(num_classes=cfg.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    lrs = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x, y = images[idx], labels[idx]
        x = torch.where((torch.rand(batch_size, generator=g) < 0.5)[:, None, None, None], x.flip(-1), x)
        t = torch.randint(0, t_max, (batch_size,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(sched.add_noise(x, torch.randn(x.shape, generator=g), t), t), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lrs.step()
        if (step + 1) % 500 == 0:
            print(json.dumps(dict(step=step + 1, loss=round(loss.item(), 4))), flush=True)
    return net.eval().requires_grad_(False)


def build_arch(model: D.DDPM, arch: str) -> None:
    """Swaps ``model.model`` and ``model.ema`` for the ``--arch`` variant (same weights in both)."""
    if arch == "base":
        return
    for name in ("model", "ema"):
        torch.manual_seed(1234)  # the added layers start equal in both copies
        net = getattr(model, name)
        if arch in ("deep0", "deep1"):  # level 0 (H/patch) or level 1 (H/2patch, with its attention)
            level = int(arch[-1])
            E, c = net.time_embed[-1].out_features, net.down[level].conv2.out_channels
            net.down[level] = TwoBlocks(net.down[level], c, E)
            net.up[-1 - level] = TwoBlocks(net.up[-1 - level], c, E)
            net.to(memory_format=torch.channels_last)
        elif arch == "refine":
            net = Refine(net)
        elif arch == "factor":
            net.class_embed = FactorEmbed(net.num_classes, net.class_embed.embedding_dim)
        else:
            raise SystemExit(f"unknown --arch {arch!r}")
        setattr(model, name, net)
    model.ema.load_state_dict(model.model.state_dict())
    model.ema.requires_grad_(False)


def edge_maps(num: int, image_size: int) -> Tensor:
    """``(N, 1, H, W)``: 1 on the pixels next to a boundary between two of the training images' instance
    masks (shape and background, or two shapes), 0 elsewhere: where a corner or an edge is drawn."""
    from minivfm.data import Shapes

    m = Shapes(num, image_size=image_size, seed=0).get_batch(range(num))["mask"][:, None].float()
    hi = nn.functional.max_pool2d(m, 3, 1, 1)
    return (hi != -nn.functional.max_pool2d(-m, 3, 1, 1)).float()


def angle_features(angle: Tensor) -> Tensor:
    """Rotation-table indices ``(N,)`` (``Shapes``: 1536 steps a turn) -> ``(N, 4)``: cos and sin of 4 and 3
    times the angle, the rotation of a square (a quarter turn) and of a triangle (a third)."""
    th = angle.float() * (2 * torch.pi / 1536)
    return torch.stack([torch.cos(4 * th), torch.sin(4 * th), torch.cos(3 * th), torch.sin(3 * th)], 1)


class AngleEmbed(nn.Module):
    """``--angle``: the class embedding plus a linear map of ``angle_features`` of the largest shape, which
    the caller sets in ``feats`` before each forward. Sampling draws the angle uniformly, as the data do,
    so p(x | y) is unchanged: a diagnostic of whether being told the pose lets the U-Net draw squares."""

    def __init__(self, base: nn.Module, dim: int) -> None:
        super().__init__()
        self.base, self.lin, self.feats = base, nn.Linear(4, dim), None

    def forward(self, y: Tensor) -> Tensor:
        return self.base(y) + self.lin(self.feats)


class WithAngles(nn.Module):
    """An ``--angle`` model for ``sample_ddim``: each of the ``n`` samples keeps one uniformly drawn angle
    (seeded) through every step, for its conditional and null halves alike."""

    def __init__(self, net: nn.Module, n: int, seed: int = 5) -> None:
        super().__init__()
        self.net, self.num_classes, self.self_condition = net, net.num_classes, False
        self.feats = angle_features(torch.randint(0, 1536, (n,), generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, x_self_cond: Tensor | None = None) -> Tensor:
        self.net.class_embed.feats = self.feats.repeat(len(x) // len(self.feats), 1)
        return self.net(x, t, y)


def packed_step(model: D.DDPM, edge_weight: float | None, angle: bool) -> None:
    """The library's training step for images that carry extra channels: ``edge_maps`` (``--edge W``: the
    loss on those pixels weighted by ``1 + W``; outline pixels are a few percent of an image, so the plain
    loss spends almost nothing on whether a corner is square or round), then ``angle_features`` (``--angle``,
    constant over the image). Same timesteps, noise, label dropout and Min-SNR weight as ``DDPM._step``."""
    hp, sched = model.hparams, model.schedule

    def step(batch: dict, stage: str) -> Tensor:
        x0, extra, y = batch["image"][:, :3], batch["image"][:, 3:], batch["label"].long()
        t = D.sample_timesteps(len(y), hp.num_steps, hp.t_sampling, split_t=hp.t_split, low_fraction=hp.t_low_fraction)
        eps = torch.randn_like(x0)
        y = D.drop_labels(y, hp.p_uncond, hp.num_classes)
        if angle:
            model.model.class_embed.feats = extra[:, -4:, 0, 0]
        err = (model.model(sched.add_noise(x0, eps, t), t, y) - eps).pow(2)
        if edge_weight is not None:
            err = err * (1 + edge_weight * extra[:, :1])
        w = 1.0 if hp.min_snr_gamma is None else D.min_snr_weight(sched.alphas_cumprod, t, hp.min_snr_gamma)
        loss = (w * err.flatten(1).mean(1)).mean()
        model.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=len(y))
        return loss

    model._step = step


def after_each_step(model: D.DDPM, fn) -> None:
    """Calls ``fn(outputs)`` after every optimizer step, once the module's own ``on_train_batch_end`` (its EMA
    update) has run. ``D.fit`` builds its own Trainer, so the sweep chains onto the module's hook instead of
    passing Lightning callbacks."""
    hook = model.on_train_batch_end

    def on_train_batch_end(outputs, batch, batch_idx: int) -> None:
        hook(outputs, batch, batch_idx)
        fn(outputs)

    model.on_train_batch_end = on_train_batch_end


def track_emas(model: D.DDPM, decays: list[float]) -> dict[float, nn.Module]:
    """Extra EMA copies of ``model.model`` with other decays (``--ema``), updated after every optimizer step
    by the library's ``update_ema``, as ``DDPM.on_train_batch_end`` updates ``model.ema``: one training run
    scores several EMA lengths.
    The warm-up caps the decay at ``(1 + step) / (10 + step)`` (0.99776 at the last of 4000 steps), so every
    decay above the cap gives the same weights: step k weighted about as k**8, centred at 90% of training."""
    if any(not 0 < d < 1 for d in decays):
        raise SystemExit(f"--ema decays must be in (0, 1), got {decays}")
    extra = {d: copy.deepcopy(model.ema) for d in decays}

    def update(outputs) -> None:
        for d, ema in extra.items():
            D.update_ema(ema, model.model, d, model.global_step)

    after_each_step(model, update)
    return extra


def keep_snapshots(model: D.DDPM, steps: list[int], save) -> None:
    """``--snapshot K ...``: after optimizer step K, ``save(K, ema)`` with the EMA weights as they are then
    (an early, weaker model of the same run: the "bad version" that autoguidance needs)."""
    if any(k < 1 for k in steps):
        raise SystemExit(f"--snapshot steps must be positive, got {steps}")
    wanted = set(steps)

    def snapshot(outputs) -> None:
        if model.global_step in wanted:
            save(model.global_step, model.ema)

    after_each_step(model, snapshot)


def print_losses(model: D.DDPM, every: int = 500) -> None:
    """Prints the mean training loss of every ``every`` optimizer steps (a loss spike shows up here)."""
    losses = []

    def log(outputs) -> None:
        losses.append(float(outputs["loss"]))
        if model.global_step % every == 0:
            print(json.dumps(dict(step=model.global_step, loss=round(sum(losses) / len(losses), 5))), flush=True)
            losses.clear()

    after_each_step(model, log)


def shape_acc(x: Tensor, y: Tensor) -> dict[str, float]:
    """``sample_acc`` split by the shape asked for (label = shape * colours + colour): which shape is lost."""
    pred, per = metrics.reference_predict(x), len(DEFAULT_COLORS)
    return {s: round((pred[y // per == i] == y[y // per == i]).float().mean().item(), 3) for i, s in enumerate(SHAPES)}


def report(row: dict, out: Path) -> None:
    """Prints ``row`` as one JSON line and appends it to ``OUT/results.jsonl``."""
    print(json.dumps(row), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def score(name: str, x: Tensor, y: Tensor, out: Path, **info) -> None:
    row = dict(name=name, **info, n=len(y), acc=round(metrics.sample_acc(x, y), 4), fd=round(metrics.sample_fd(x), 2),
               by_shape=shape_acc(x, y))  # fmt: skip
    report(row, out)


def draw(net: nn.Module, model: D.DDPM, cfg: D.DDPMConfig, n: int, scale: float,
         interval: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, float]:  # fmt: skip
    y = torch.arange(n) % cfg.num_classes
    t = time.perf_counter()
    x = D.sample_ddim(net.eval(), model.schedule, (n, cfg.in_channels, cfg.image_size, cfg.image_size), y, scale,
                      cfg.ddim_steps, generator=torch.Generator().manual_seed(1), clip_sample=cfg.clip_sample,
                      threshold=cfg.threshold, guidance_interval=interval)  # fmt: skip
    return x, y, time.perf_counter() - t


@torch.no_grad()
def diagnose(net: nn.Module, model: D.DDPM, cfg: D.DDPMConfig, n: int, ts: list[int], out: Path, name: str) -> None:
    sched, net = model.schedule, net.eval()
    x0, y = metrics.real_images(n, "test")
    g = torch.Generator().manual_seed(2)
    for t0 in ts:
        if not 0 < t0 < cfg.num_steps:
            raise SystemExit(f"--t must be in (0, {cfg.num_steps}), got {t0}")
        tt = torch.full((n,), t0, dtype=torch.long)
        x = sched.add_noise(x0, torch.randn(x0.shape, generator=g), tt)
        abar = sched.alphas_cumprod[t0]
        x0_hat = D.predict_x0(net(x, tt, y), x, abar).clamp(-1, 1)
        steps = [t for t in sched.ddim_timesteps(cfg.ddim_steps) if t <= t0]
        if steps[0] != t0:
            steps = [t0, *steps]
        for i, t in enumerate(steps):  # sample_ddim's loop, entered at t0
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            tb = torch.full((n,), t, dtype=torch.long)
            eps = D._guided_eps(net, x, tb, y, D.guidance_at(t, cfg.guidance_scale, cfg.guidance_interval))
            x = sched.ddim_step(eps, t, t_prev, x, clip_sample=cfg.clip_sample, threshold=cfg.threshold,
                                use_clipped_model_output=True)  # fmt: skip
        mse = float((x0_hat - x0).pow(2).mean())
        row = dict(name=name, diagnose_t=t0, n=n, x0_acc=round(metrics.sample_acc(x0_hat, y), 4), x0_mse=round(mse, 5),
                   sdedit_acc=round(metrics.sample_acc(x, y), 4), sdedit_by_shape=shape_acc(x, y))  # fmt: skip
        report(row, out)


@torch.no_grad()
def implicit(net: nn.Module, model: D.DDPM, n: int, ts: list[int], draws: int, out: Path, name: str) -> None:
    """Does the model itself tell the shapes apart? Its implicit classifier (Li et al. 2023, "Your Diffusion
    Model is Secretly a Zero-Shot Classifier"): real test images noised to ``t`` (``draws`` noises each), the
    conditional eps error under each of the three shape labels of the true colour, and the label with the
    smallest mean error taken as the model's answer. Chance is 1/3; a model that ignores the shape
    label for squares and circles has no preference between them."""
    sched, net = model.schedule, net.eval()
    x0, y = metrics.real_images(n, "test")
    per, g = len(DEFAULT_COLORS), torch.Generator().manual_seed(3)
    cands = torch.stack([s * per + y % per for s in range(len(SHAPES))], 1)  # (N, 3)
    for t0 in ts:
        if not 0 <= t0 < model.hparams.num_steps:
            raise SystemExit(f"--t must be in [0, {model.hparams.num_steps}), got {t0}")
        tt, err = torch.full((n,), t0, dtype=torch.long), torch.zeros(n, len(SHAPES))
        for _ in range(draws):
            eps = torch.randn(x0.shape, generator=g)
            x = sched.add_noise(x0, eps, tt)
            for j in range(len(SHAPES)):
                err[:, j] += (net(x, tt, cands[:, j]) - eps).pow(2).flatten(1).mean(1)
        right = err.argmin(1) == y // per
        gap = (err.gather(1, (y // per)[:, None])[:, 0] - err.min(1).values) / draws
        row = dict(name=name, implicit_t=t0, n=n, draws=draws, acc=round(right.float().mean().item(), 4),
                   by_shape={s: round(right[y // per == i].float().mean().item(), 3) for i, s in enumerate(SHAPES)},
                   mean_gap=float(f"{gap.mean().item():.3g}"))  # fmt: skip
        report(row, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("train", "guide", "diagnose", "classifier", "implicit"))
    p.add_argument("name", help="train: the run's name; guide: the name of a trained run")
    p.add_argument("overrides", nargs="*", help="DDPMConfig fields, key=value")
    p.add_argument("--variant", action="append", default=[],
                   help="guide: mode=...,scale=...[,lo=,hi=,eta=,r=,beta=,phi=]")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="train: the training seed (init, batches, noise)")
    p.add_argument("--arch", default="base", help="train: base, deep0, deep1, refine or factor (see build_arch)")
    p.add_argument("--ema", type=float, nargs="+", default=[],
                   help="train: extra EMA decays kept alongside the preset's, each saved and scored as NAME-emaD")
    p.add_argument("--d4", action="store_true",
                   help="train: the 8 flips and quarter turns of every training image (the data are symmetric)")
    p.add_argument("--edge", type=float, default=None,
                   help="train: weight the loss on the pixels along shape outlines by 1 + EDGE (see packed_step)")
    p.add_argument("--angle", action="store_true",
                   help="train: also condition on the largest shape's rotation (AngleEmbed)")
    p.add_argument("--clip", type=float, default=None, help="train: clip the gradient norm at this value")
    p.add_argument("--snapshot", type=int, nargs="+", default=[],
                   help="train: also save the EMA weights after these optimizer steps, as NAME@K")
    p.add_argument("--steps", type=int, default=4000, help="classifier: optimizer steps")
    p.add_argument("--t-max", type=int, default=500, help="classifier: trained on t < t_max")
    p.add_argument("--t", type=int, nargs="+", default=[100, 200, 300, 500], help="diagnose: noise levels")
    p.add_argument("--draws", type=int, default=16, help="implicit: noise draws per image and t")
    p.add_argument("--n", type=int, default=480, help="samples per score (std of acc ~0.016 at 480)")
    p.add_argument("--out", type=Path, default=Path("outputs/ddpm_sweep"))
    args = p.parse_intermixed_args()  # options may come after the key=value overrides, or before them
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    over = parse_pairs(args.overrides)
    ckpt = args.out / f"{args.name}.pt"
    if args.command == "classifier":  # NAME: the classifier's name; guide cls=NAME uses it
        cfg = replace(D.DDPMConfig.preset("cpu"), **over)
        net = train_classifier(cfg, args.steps, args.t_max, args.seed)
        torch.save({"state": net.state_dict(), "t_max": args.t_max}, ckpt)
        x0, y = metrics.real_images(args.n, "test")
        sched, g = D.NoiseSchedule(cfg.num_steps, cfg.schedule), torch.Generator().manual_seed(2)
        for t0 in args.t:
            t = torch.full((args.n,), t0)
            with torch.no_grad():
                pred = net(sched.add_noise(x0, torch.randn(x0.shape, generator=g), t), t).argmax(1)
            row = dict(name=args.name, classifier_t=t0, acc=round((pred == y).float().mean().item(), 4))
            report(row, args.out)
        return
    saved = torch.load(ckpt) if args.command != "train" else {"overrides": {}}
    cfg = replace(D.DDPMConfig.preset("cpu"), **{**saved["overrides"], **over})
    if args.command == "train":
        if args.angle and (args.d4 or args.arch != "base"):
            raise SystemExit("--angle goes with --arch base and without --d4 (which turns images, not angles)")
        L.seed_everything(args.seed, workers=True)
        images, labels = D.shapes_tensors(cfg.num_train, cfg.image_size, seed=0)
        if args.edge is not None:
            images = torch.cat([images, edge_maps(cfg.num_train, cfg.image_size)], dim=1)
        if args.angle:
            from minivfm.data import Shapes

            scene = Shapes(cfg.num_train, image_size=cfg.image_size, seed=0)._scene(torch.arange(cfg.num_train).numpy())
            feats = angle_features(torch.as_tensor(scene["angle"][:, 0]))
            images = torch.cat([images, feats[:, :, None, None].expand(-1, -1, *images.shape[2:])], dim=1)
        if args.d4:
            turns = [images.rot90(k, (2, 3)) for k in range(4)]
            images = torch.cat(turns + [x.flip(-1) for x in turns]).contiguous()
            labels = labels.repeat(8)
        model = D.DDPM.from_config(cfg)
        build_arch(model, args.arch)
        if args.angle:
            for net in (model.model, model.ema):
                torch.manual_seed(1234)  # the same added layer in both copies
                net.class_embed = AngleEmbed(net.class_embed, net.class_embed.embedding_dim)
            model.ema.load_state_dict(model.model.state_dict())
            model.ema.requires_grad_(False)
        if args.edge is not None or args.angle:
            packed_step(model, args.edge, args.angle)
        extra = track_emas(model, args.ema)

        def save_snapshot(k: int, net: nn.Module) -> None:
            ckpt = {"overrides": over, "arch": args.arch, "angle": args.angle, "ema": net.state_dict()}
            torch.save(ckpt, args.out / f"{args.name}@{k}.pt")

        keep_snapshots(model, args.snapshot, save_snapshot)
        print_losses(model)
        if args.clip is not None:  # the preset trains unclipped
            model.on_before_optimizer_step = lambda opt: nn.utils.clip_grad_norm_(model.model.parameters(), args.clip)
        t = time.perf_counter()
        D.fit(model, images, labels, cfg.batch_size, cfg.max_steps, "cpu")
        train_s = round(time.perf_counter() - t)
        for name, net in [(args.name, model.ema)] + [(f"{args.name}-ema{d}", e) for d, e in extra.items()]:
            torch.save({"overrides": over, "arch": args.arch, "angle": args.angle, "ema": net.state_dict()},
                       args.out / f"{name}.pt")  # fmt: skip
            x, y, secs = draw(WithAngles(net, args.n) if args.angle else net, model, cfg, args.n, cfg.guidance_scale,
                              cfg.guidance_interval)  # fmt: skip
            score(name, x, y, args.out, overrides=str(over), seed=args.seed, scale=cfg.guidance_scale, train_s=train_s,
                  sample_s=round(secs))  # fmt: skip
        return
    if saved.get("angle"):
        raise SystemExit(f"{args.name} was trained with --angle: only train scores it")
    model = D.DDPM.from_config(cfg)
    build_arch(model, saved.get("arch", "base"))
    model.ema.load_state_dict(saved["ema"])
    if args.command == "diagnose":
        diagnose(model.ema, model, cfg, args.n, args.t, args.out, args.name)
        return
    if args.command == "implicit":
        implicit(model.ema, model, args.n, args.t, args.draws, args.out, args.name)
        return
    preset = f"mode=cfg,scale={cfg.guidance_scale}"  # the preset's guidance, as the train score draws it
    if cfg.guidance_interval is not None:
        preset += ",lo={},hi={}".format(*cfg.guidance_interval)
    for spec in args.variant or [preset]:
        kw = parse_pairs(spec.split(","))
        if "bad" in kw:  # a snapshot (train --snapshot) or any trained run, same architecture
            bad = D.DDPM.from_config(cfg)
            build_arch(bad, saved.get("arch", "base"))
            bad.ema.load_state_dict(torch.load(args.out / f"{kw['bad']}.pt")["ema"])
            kw["bad"] = bad.ema.eval()
        if "cls" in kw:  # a noise-aware classifier from the classifier command
            state = torch.load(args.out / f"{kw['cls']}.pt")["state"]
            kw["cls"] = NoisyClassifier(num_classes=cfg.num_classes)
            kw["cls"].load_state_dict(state)
            kw["cls"].eval().requires_grad_(False)
        net = Guided(model.ema.eval(), model.schedule.alphas_cumprod, **kw)
        x, y, secs = draw(net, model, cfg, args.n, kw["scale"])
        score(args.name, x, y, args.out, variant=spec, sample_s=round(secs))


if __name__ == "__main__":
    main()
