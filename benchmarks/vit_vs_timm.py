"""Training throughput of minivfm's ViT against timm's VisionTransformer of the same configuration.

One training step = forward, cross-entropy, backward, AdamW step. Both models are built
with the same sizes, warmed up, then timed over the same batches, alternating rounds so
that a busy machine slows both alike. Prints images/s for each and the ratio (ours / timm)::

    python benchmarks/vit_vs_timm.py                       # the cpu preset's sizes
    python benchmarks/vit_vs_timm.py --profile gpu --device cuda
    python benchmarks/vit_vs_timm.py --embed-dim 192 --depth 6 --num-heads 3 --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minivfm.models.vit import ViT, ViTConfig


def make_models(cfg: ViTConfig, device: str) -> dict[str, torch.nn.Module]:
    from timm.models.vision_transformer import VisionTransformer

    timm_model = VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
    )  # fmt: skip
    ours = ViT.from_timm(timm_model)  # same weights, so both do exactly the same arithmetic
    return {"minivfm": ours.to(device).train(), "timm": timm_model.to(device).train()}


def step_fn(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def benchmark(cfg: ViTConfig, batch_size: int, device: str, warmup: int, steps: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    images = torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), device=device)
    steps_by_name = {name: step_fn(m, images, labels) for name, m in make_models(cfg, device).items()}
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            rates[name].append(steps * batch_size / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="ViTConfig preset for the sizes (default: MINIVFM_PROFILE)")
    parser.add_argument("--embed-dim", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds; the median is reported")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ViTConfig.preset(args.profile)
    for key in ("embed_dim", "depth", "num_heads", "patch_size"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    batch_size = args.batch_size or cfg.batch_size
    print(
        f"ViT image {cfg.image_size} patch {cfg.patch_size} dim {cfg.embed_dim} depth {cfg.depth} "
        f"heads {cfg.num_heads}, batch {batch_size}, device {args.device}, threads {torch.get_num_threads()}"
    )
    rates = benchmark(cfg, batch_size, args.device, args.warmup, args.steps, args.rounds)
    for name, rate in rates.items():
        print(f"{name:>8}: {rate:8.1f} images/s (train step: forward + backward + AdamW)")
    ratio = rates["minivfm"] / rates["timm"]
    print(f"   ratio: {ratio:.3f} (minivfm / timm)")
    return {**rates, "ratio": ratio}


if __name__ == "__main__":
    main()
