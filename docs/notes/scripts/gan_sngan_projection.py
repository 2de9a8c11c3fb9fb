"""Setup check for the cpu GAN: a known-good conditional GAN recipe (SNGAN-projection style:
ResNet G with class-conditional batch norm, spectral-norm ResNet D with a projection head, hinge
loss, Adam (0, 0.9)) on the same Shapes data, scored like results(): 256 samples, sample_acc/FD.
Run from the repository root with the package installed (docs/notes/gan_cpu_sample_acc.md):

    python docs/notes/scripts/gan_sngan_projection.py --steps 1200 --ch 32
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as SN

from minivfm import metrics, viz
from minivfm.data import shapes_in_memory

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=1200)
p.add_argument("--ch", type=int, default=32)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--ntrain", type=int, default=8192)
p.add_argument("--max_shapes", type=int, default=3)
p.add_argument("--ndis", type=int, default=1)
p.add_argument("--out", default="gan_sngan_projection")
a = p.parse_args()
torch.manual_seed(a.seed)
K, Z, B = 12, 128, 64


class CBN(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.bn = nn.BatchNorm2d(c, affine=False)
        s.g = nn.Embedding(K, c)
        s.b = nn.Embedding(K, c)
        nn.init.ones_(s.g.weight)
        nn.init.zeros_(s.b.weight)

    def forward(s, x, y):
        return s.bn(x) * s.g(y)[:, :, None, None] + s.b(y)[:, :, None, None]


class GBlock(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.n1, s.n2 = CBN(c), CBN(c)
        s.c1, s.c2 = nn.Conv2d(c, c, 3, 1, 1), nn.Conv2d(c, c, 3, 1, 1)

    def forward(s, x, y):
        h = F.interpolate(F.relu(s.n1(x, y)), scale_factor=2)
        h = s.c2(F.relu(s.n2(s.c1(h), y)))
        return h + F.interpolate(x, scale_factor=2)


class G(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.fc = nn.Linear(Z, 4 * 4 * c)
        s.c = c
        s.blocks = nn.ModuleList([GBlock(c) for _ in range(3)])
        s.bn = nn.BatchNorm2d(c)
        s.out = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(s, z, y):
        h = s.fc(z).view(-1, s.c, 4, 4)
        for b in s.blocks:
            h = b(h, y)
        return torch.tanh(s.out(F.relu(s.bn(h))))


class DBlock(nn.Module):
    def __init__(s, cin, c, down=True, first=False):
        super().__init__()
        s.c1, s.c2 = SN(nn.Conv2d(cin, c, 3, 1, 1)), SN(nn.Conv2d(c, c, 3, 1, 1))
        s.sc = SN(nn.Conv2d(cin, c, 1))
        s.down, s.first = down, first

    def forward(s, x):
        h = x if s.first else F.relu(x)
        h = s.c2(F.relu(s.c1(h)))
        sc = s.sc(x)
        if s.down:
            h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)
        return h + sc


class D(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.blocks = nn.Sequential(
            DBlock(3, c, first=True), DBlock(c, c), DBlock(c, c, down=False), DBlock(c, c, down=False)
        )
        s.fc = SN(nn.Linear(c, 1))
        s.emb = SN(nn.Embedding(K, c))

    def forward(s, x, y):
        h = F.relu(s.blocks(x)).sum((2, 3))
        return s.fc(h).squeeze(1) + (s.emb(y) * h).sum(1)


data = shapes_in_memory(a.ntrain, 32, seed=0, max_shapes=a.max_shapes)
X, Y = data.images * 2 - 1, data.labels
g, d = G(a.ch), D(a.ch)
og = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.0, 0.9))
od = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.0, 0.9))
t0 = time.time()
for step in range(a.steps):
    for _ in range(a.ndis):
        i = torch.randint(len(X), (B,))
        x, y = X[i], Y[i]
        with torch.no_grad():
            fake = g(torch.randn(B, Z), y)
        ld = F.relu(1 - d(x, y)).mean() + F.relu(1 + d(fake, y)).mean()
        od.zero_grad()
        ld.backward()
        od.step()
    y = torch.randint(K, (B,))
    lg = -d(g(torch.randn(B, Z), y), y).mean()
    og.zero_grad()
    lg.backward()
    og.step()
    if step % 500 == 0 or step == a.steps - 1:
        print(f"step {step} ld {ld.item():.3f} lg {lg.item():.3f} {time.time() - t0:.0f}s", flush=True)
train_s = time.time() - t0
g.eval()
labels = torch.arange(256) % K
with torch.no_grad():
    s = g(torch.randn(256, Z, generator=torch.Generator().manual_seed(0)), labels)
pred = metrics.reference_predict(s)
acc = (pred == labels).float().mean().item()
shape_ok = (pred // 4 == labels // 4).float().mean().item()
col_ok = (pred % 4 == labels % 4).float().mean().item()
res = dict(
    vars(a),
    sample_acc=acc,
    shape_right=shape_ok,
    colour_right=col_ok,
    fd=metrics.sample_fd(s),
    train_s=train_s,
    params_g=sum(p.numel() for p in g.parameters()),
    params_d=sum(p.numel() for p in d.parameters()),
)
print(json.dumps(res))

grid_l = torch.arange(K).repeat_interleave(8)
with torch.no_grad():
    gs = g(torch.randn(len(grid_l), Z, generator=torch.Generator().manual_seed(1)), grid_l)
viz.image_grid(
    gs, nrow=8, title=f"SNGAN-projection recipe, {a.steps} steps: acc {acc:.3f}", path=f"{a.out}_{a.steps}_{a.seed}.png"
)
