"""Shapes test accuracy of the ViT against samples seen and wall time, for one set of knobs.

A plain training loop (no Lightning) on pre-rendered Shapes images (train seed 0, test seed 2,
as ShapesDataModule's splits), so that many settings can be compared quickly on one CPU thread.
Prints the test accuracy every ``--every`` training images. Label = colour + shape of the largest
shape: 0.33 is "colour right, shape at chance" and the cross-entropy then sits near ln 3 = 1.10::

    OMP_NUM_THREADS=1 python benchmarks/vit_shapes_sweep.py                      # the old cpu preset, 6k x 12
    OMP_NUM_THREADS=1 python benchmarks/vit_shapes_sweep.py --patch 4 --bs 32 --lr 1e-3 --ntrain 48000 --epochs 1
    OMP_NUM_THREADS=1 python benchmarks/vit_shapes_sweep.py --init xavier --pool avg --sincos 1 --shift 2

``--init xavier`` (MAE's init of the linear layers), ``--pool avg`` (mean of the patch tokens) and
``--sincos 1`` (2D sin-cos position init) are set on the model from outside; they are experiments,
not options of :class:`~minivfm.models.vit.ViT`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from minivfm.data import shapes_in_memory
from minivfm.models.vit import ViT, random_shift, warmup_cosine


def render(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = shapes_in_memory(num, 32, seed)
    return data.images * 2 - 1, data.labels  # (N, 3, 32, 32) in [-1, 1], (N,)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], 1)  # (grid*grid, dim)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = dict(
        patch=8, dim=64, depth=4, heads=4, mlp=4.0, bs=64, lr=2e-3, wd=0.05, warm=1.0, ntrain=6000, epochs=12,
        shift=0, ls=0.1, pool="token", sincos=0, init="timm", every=6400, ntest=2000, threads=1, seed=0,
    )  # fmt: skip
    for k, v in defaults.items():
        p.add_argument("--" + k, type=type(v), default=v)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    xtr, ytr = render(a.ntrain, seed=0)
    xte, yte = render(a.ntest, seed=2)
    print(f"rendered {a.ntrain + a.ntest} images in {time.perf_counter() - t0:.1f}s; {vars(a)}", flush=True)

    torch.manual_seed(a.seed)
    m = ViT(32, a.patch, 3, 12, a.dim, a.depth, a.heads, a.mlp)
    if a.init == "xavier":
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(mod.weight)
        w = m.patch_embed.proj.weight
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if a.pool == "avg":
        m.forward_head = lambda x, pre_logits=False: x[:, 1:].mean(1) if pre_logits else m.head(x[:, 1:].mean(1))
    if a.sincos:
        with torch.no_grad():
            m.pos_embed[0, 1:] = sincos_2d(32 // a.patch, a.dim)
            m.pos_embed[0, 0] = 0
    decay = [q for n, q in m.named_parameters() if q.ndim >= 2 and not n.endswith(("cls_token", "pos_embed"))]
    rest = [q for n, q in m.named_parameters() if not (q.ndim >= 2 and not n.endswith(("cls_token", "pos_embed")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": rest, "weight_decay": 0.0}], lr=a.lr)
    steps_per_epoch = a.ntrain // a.bs
    total, warmup = steps_per_epoch * a.epochs, int(a.warm * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))

    def test_acc() -> float:
        m.eval()
        with torch.no_grad():
            pred = torch.cat([m(xte[i : i + 500]).argmax(-1) for i in range(0, len(xte), 500)])
        m.train()
        return (pred == yte).float().mean().item()

    start = time.perf_counter()
    for epoch in range(a.epochs):
        perm = torch.randperm(a.ntrain)
        for i in range(steps_per_epoch):
            idx = perm[i * a.bs : (i + 1) * a.bs]
            loss = F.cross_entropy(m(random_shift(xtr[idx], a.shift)), ytr[idx], label_smoothing=a.ls)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen = (epoch * steps_per_epoch + i + 1) * a.bs
            if seen % a.every < a.bs:
                t = time.perf_counter() - start
                print(f"seen {seen} t {t:.0f}s loss {loss.item():.3f} test_acc {test_acc():.3f}", flush=True)
    print(f"final test_acc {test_acc():.3f} after {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
