"""Metrics shared by every lesson: Frechet distance, a Shapes reference classifier, probes.

Sample quality for all generators (VAE, GAN, DDPM) is measured the same way:

- :func:`frechet_distance` between Gaussians fitted to two feature sets (Heusel et al. 2017,
  "GANs Trained by a Two Time-Scale Update Rule...", eq. 6, the FID formula), in any feature space;
- the feature space is a small **reference classifier** trained on Shapes (Inception features mean
  nothing on 32x32 procedural shapes and cannot be downloaded). Its weights ship in
  ``minivfm/assets/shapes_classifier.safetensors``; ``python -m minivfm.metrics train-reference``
  rebuilds them deterministically (same machine, same numbers);
- :func:`sample_fd` compares generated images with real Shapes test images, :func:`real_fd` gives
  the floor (a second real split of the same size), :func:`sample_acc` is the fraction of
  class-conditional samples that the reference classifier labels as asked.

Representation metrics: :func:`knn_accuracy` (the weighted k-NN probe of DINO, Caron et al. 2021)
and :func:`linear_probe` (logistic regression on frozen features).

Attention as segmentation (DINO, "Probing the self-attention map"): :func:`attention_mask` keeps the patches
that hold 60% of the class token's attention mass, :func:`mask_iou` scores binary masks, and
:func:`attn_miou` scores attention masks against foreground masks.

Shape glossary: N images or feature vectors, D feature width, K classes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "frechet_distance",
    "ReferenceClassifier",
    "REFERENCE_PATH",
    "load_reference",
    "train_reference",
    "reference_features",
    "reference_predict",
    "real_images",
    "sample_fd",
    "real_fd",
    "sample_acc",
    "knn_accuracy",
    "linear_probe",
    "attention_mask",
    "mask_iou",
    "attn_miou",
]

REFERENCE_PATH = Path(__file__).parent / "assets" / "shapes_classifier.safetensors"
REFERENCE_COMMAND = "python -m minivfm.metrics train-reference"
IMAGE_SIZE = 32
# Shapes seeds reserved for the metrics; models train on other seeds (the data modules use small ones).
TRAIN_SEED = 1000  # the reference classifier's training images
TEST_SEED = 1001  # the real test images every sample is compared with
REAL2_SEED = 1002  # a second real split, for the floor (real_fd)
NUM_REAL = 2000  # real test images used by sample_fd / real_fd by default


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------


def _as_features(name: str, feats) -> np.ndarray:
    if isinstance(feats, Tensor):
        feats = feats.detach().cpu().double().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array of features with N >= 2, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or inf")
    return feats


def _sqrtm_psd(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_gaussian(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2)::

        |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))

    The trace of the matrix square root is computed stably as the sum of the square roots of
    the eigenvalues of the symmetric PSD matrix ``cov1^(1/2) cov2 cov1^(1/2)`` (same spectrum as
    ``cov1 cov2``), instead of ``scipy.linalg.sqrtm`` of a non-symmetric product.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not agree: mu1 {mu1.shape}, mu2 {mu2.shape}, cov1 {cov1.shape}, cov2 {cov2.shape}")
    root1 = _sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean
    return float(max(fd, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    Arguments:
        feats_a: ``(N_a, D)`` features (tensor or array).
        feats_b: ``(N_b, D)`` features, same ``D``.

    Returns:
        a float >= 0; 0 for identical sets, symmetric in its arguments.
    """
    a, b = _as_features("feats_a", feats_a), _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same width D, got {a.shape[1]} and {b.shape[1]}")
    return frechet_gaussian(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------------------------------
# The reference classifier
# --------------------------------------------------------------------------------------------------


class ReferenceClassifier(nn.Module):
    """A small CNN that classifies 32x32 Shapes images (shape and colour of the largest shape).

    ``features(x)`` is the penultimate layer, ``(N, feat_dim)``: the feature space of
    :func:`sample_fd`. ``forward(x)`` gives ``(N, num_classes)`` logits.
    """

    def __init__(self, num_classes: int = 12, width: int = 32, feat_dim: int = 64) -> None:
        super().__init__()
        w = width

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU())

        self.body = nn.Sequential(
            conv(3, w), nn.MaxPool2d(2),  # 16x16
            conv(w, 2 * w), conv(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            conv(2 * w, 4 * w), nn.MaxPool2d(2),  # 4x4
        )  # fmt: skip
        self.fc = nn.Linear(4 * w * 2, feat_dim)
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        h = self.body(x)  # (N, 4w, 4, 4)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # (N, 8w)
        return self.fc(h)  # (N, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))  # (N, K)


def _check_images(images) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, 3, H, W) tensor in [-1, 1], got {got}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return images


@lru_cache(maxsize=8)
def _real_batch(num: int, seed: int) -> tuple[Tensor, Tensor]:
    from minivfm.data import shapes_in_memory

    data = shapes_in_memory(num, IMAGE_SIZE, seed)
    return data.images * 2 - 1, data.labels


def real_images(num: int, split: str = "test") -> tuple[Tensor, Tensor]:
    """Real Shapes images and labels reserved for the metrics: ``split`` is ``"test"``, ``"real2"``
    (the second real split of :func:`real_fd`) or ``"train"`` (the reference classifier's)."""
    seeds = {"train": TRAIN_SEED, "test": TEST_SEED, "real2": REAL2_SEED}
    if split not in seeds:
        raise ValueError(f"split must be one of {', '.join(seeds)}, got {split!r}")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    return _real_batch(num, seeds[split])


def train_reference(
    num_train: int = 16000,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    path: str | Path | None = REFERENCE_PATH,
    num_test: int = 2000,
    verbose: bool = True,
) -> tuple[ReferenceClassifier, dict]:
    """Train the reference classifier on Shapes (seed ``TRAIN_SEED``) and save it as safetensors.

    Deterministic for a seed on a given machine. Light augmentation (horizontal flips) only.
    Returns the model and a dict of metadata (test accuracy, sizes, time), also stored in the file.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    images, labels = _real_batch(num_train, TRAIN_SEED)
    model = ReferenceClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (num_train // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    start, step = time.time(), 0
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(num_train, generator=gen)
        for i in range(num_train // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x, y = images[idx], labels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    test_x, test_y = real_images(num_test, "test")
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    meta = {
        "command": REFERENCE_COMMAND,
        "num_train": num_train,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seed": TRAIN_SEED,
        "test_seed": TEST_SEED,
        "test_accuracy": round(acc, 4),
        "seconds": round(time.time() - start, 1),
    }
    if verbose:
        print(json.dumps(meta))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={k: str(v) for k, v in meta.items()})
    return model, meta


@lru_cache(maxsize=2)
def _load(path: str) -> ReferenceClassifier:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"no reference classifier at {path}; build it with `{REFERENCE_COMMAND}`")
    model = ReferenceClassifier()
    model.load_state_dict(load_file(path), strict=True)
    model.eval().requires_grad_(False)
    return model


def load_reference(path: str | Path | None = None) -> ReferenceClassifier:
    """The shipped reference classifier (safetensors, no pickle), in eval mode, cached."""
    return _load(str(path or REFERENCE_PATH))


@torch.no_grad()
def _run(images: Tensor, fn: str, batch_size: int = 500) -> Tensor:
    model = load_reference()
    images = _check_images(images)
    outs = [getattr(model, fn)(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def reference_features(images: Tensor) -> Tensor:
    """Reference-classifier features ``(N, 64)`` of images ``(N, 3, 32, 32)`` in ``[-1, 1]``
    (clamped to the range; other sizes are resized to 32x32)."""
    return _run(images, "features")


def reference_predict(images: Tensor) -> Tensor:
    """The reference classifier's labels ``(N,)`` for images ``(N, 3, 32, 32)`` in ``[-1, 1]``."""
    return _run(images, "forward").argmax(1)


@lru_cache(maxsize=8)
def _real_features(num: int, split: str) -> Tensor:
    return reference_features(real_images(num, split)[0])


def sample_fd(images: Tensor, num_real: int = NUM_REAL) -> float:
    """Frechet distance in reference-classifier features between ``images`` and ``num_real``
    real Shapes test images. Lower is better; compare with :func:`real_fd` at the same N."""
    return frechet_distance(reference_features(images), _real_features(num_real, "test"))


def real_fd(num: int, num_real: int = NUM_REAL) -> float:
    """The floor of :func:`sample_fd` for ``num`` images: the same distance for ``num`` real
    images of a second split (``REAL2_SEED``). FD is biased upwards for small N, so compare
    a model's ``sample_fd`` with the ``real_fd`` of the same N."""
    return frechet_distance(_real_features(num, "real2"), _real_features(num_real, "test"))


def sample_acc(images: Tensor, labels: Tensor) -> float:
    """Fraction of class-conditional samples that the reference classifier labels as asked."""
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if isinstance(images, Tensor) and images.shape[0] != labels.shape[0]:
        raise ValueError(f"labels must have one entry per image ({images.shape[0]}), got {labels.shape[0]}")
    return (reference_predict(images) == labels).float().mean().item()


# --------------------------------------------------------------------------------------------------
# Representation probes
# --------------------------------------------------------------------------------------------------


def _probe_inputs(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Features as float (N, D) and labels as long (N,), checked to agree; shared by the probes."""
    train_feats, test_feats = torch.as_tensor(train_feats).float(), torch.as_tensor(test_feats).float()
    train_labels, test_labels = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"train_feats and test_feats must be (N, D) with the same D, got {tuple(train_feats.shape)} "
            f"and {tuple(test_feats.shape)}"
        )
    if len(train_labels) != len(train_feats) or len(test_labels) != len(test_feats):
        raise ValueError("train_labels / test_labels must have one label per feature row")
    return train_feats, train_labels, test_feats, test_labels


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Weighted k-NN classification accuracy on L2-normalised features (DINO's k-NN probe):
    the k nearest training features by cosine similarity vote with weight exp(sim / temperature)."""
    train_feats, train_labels, test_feats, test_labels = _probe_inputs(
        train_feats, train_labels, test_feats, test_labels
    )
    if not isinstance(k, int) or not 1 <= k <= len(train_feats):
        raise ValueError(f"k must be an int in [1, {len(train_feats)}], got {k!r}")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train_n, test_n = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    correct = 0
    for i in range(0, len(test_n), 1024):
        sim = test_n[i : i + 1024] @ train_n.T  # (n, N_train)
        top, idx = sim.topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == test_labels[i : i + 1024]).sum().item()
    return correct / len(test_n)


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    max_iter: int = 200,
    weight_decay: float = 1e-4,
) -> float:
    """Accuracy of a linear classifier (multinomial logistic regression, full-batch L-BFGS on
    standardised features) trained on frozen ``train_feats`` and evaluated on ``test_feats``."""
    train_feats, train_labels, test_feats, test_labels = _probe_inputs(
        train_feats, train_labels, test_feats, test_labels
    )
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = nn.Linear(xtr.shape[1], num_classes)
    nn.init.zeros_(head.weight)  # a convex problem: start from zero, no randomness
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(xtr), train_labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (head(xte).argmax(1) == test_labels).float().mean().item()


# --------------------------------------------------------------------------------------------------
# Attention maps as masks (DINO)
# --------------------------------------------------------------------------------------------------


def attention_mask(attn_cls: Tensor, mass: float = 0.6) -> Tensor:
    """Keep the patches holding ``mass`` of the attention (DINO's thresholded attention maps).

    Along the last dimension: the fewest largest entries whose share of the total reaches ``mass``
    (as DINO's ``visualize_attention.py``), and every entry tied with the smallest one kept, so
    that the mask does not depend on the order of ties (uniform attention keeps every patch).

    Arguments:
        attn_cls: the class token's attention to the N patch tokens, ``(..., N)``, non-negative
            (e.g. ``attn[:, :, 0, 1:]`` of one block, ``(B, heads, N)``, or its mean over heads).
        mass: the share of the attention to keep, in ``(0, 1]``.

    Returns:
        A bool tensor of ``attn_cls``'s shape, True for a kept patch.
    """
    if not isinstance(attn_cls, Tensor) or attn_cls.ndim < 1 or attn_cls.shape[-1] < 1:
        got = tuple(attn_cls.shape) if isinstance(attn_cls, Tensor) else type(attn_cls).__name__
        raise ValueError(f"attn_cls: expected a tensor (..., N) of attention over N >= 1 patches, got {got}")
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0.0 < mass <= 1.0:
        raise ValueError(f"mass: expected a fraction in (0, 1], got {mass!r}")
    a = attn_cls.detach().double()
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("attn_cls: expected finite, non-negative attention weights")
    total = a.sum(-1, keepdim=True)  # (..., 1)
    if (total <= 0).any():
        raise ValueError("attn_cls: every attention map must have a positive sum")
    ranked = a.sort(dim=-1, descending=True).values  # (..., N)
    share = (ranked / total).cumsum(-1)  # (..., N), the share of the top 1, 2, ... patches
    # the rank of the last patch kept (a share within rounding of ``mass`` counts as reaching it)
    last = (share < mass - 1e-6).sum(-1, keepdim=True).clamp(max=a.shape[-1] - 1)  # (..., 1)
    return a >= ranked.gather(-1, last)  # (..., N)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """Intersection over union of binary masks, one value per mask.

    Arguments:
        pred: ``(B, H, W)`` bool (or 0/1) masks.
        target: ``(B, H, W)``, the same shape.

    Returns:
        ``(B,)`` float IoUs; 1 where both masks are empty.
    """
    for name, m in (("pred", pred), ("target", target)):
        if not isinstance(m, Tensor) or m.ndim != 3:
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"{name}: expected masks of shape (B, H, W), got {got}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target: expected the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).flatten(1).sum(1).float()  # (B,)
    union = (pred | target).flatten(1).sum(1).float()  # (B,)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def attn_miou(attn_cls: Tensor, masks: Tensor, mass: float = 0.6) -> float:
    """Mean IoU between thresholded class-token attention and the foreground (the Jaccard
    similarity of DINO's "Probing the self-attention map", here against Shapes' foreground).

    The heads are averaged first (one map per image, no choice of the best head). The map is
    thresholded on the token grid (:func:`attention_mask`), each kept token is spread over its P x P
    patch (nearest upsampling), and that mask is compared with the pixel-exact foreground. The
    patch grid limits the best score: a 4 x 4 grid cannot trace a circle's edge.

    Arguments:
        attn_cls: the class token's attention to the patch tokens, ``(B, N)`` or ``(B, heads, N)``,
            N = h * w on a square grid (``h = w``).
        masks: foreground ``(B, H, W)``: bool, or instance ids with 0 for the background (Shapes'
            ``mask``); h must divide H and w divide W.
        mass: the share of the attention kept (DINO: 0.6).

    Returns:
        The mean IoU over the B images.
    """
    if not isinstance(attn_cls, Tensor) or attn_cls.ndim not in (2, 3):
        got = tuple(attn_cls.shape) if isinstance(attn_cls, Tensor) else type(attn_cls).__name__
        raise ValueError(f"attn_cls: expected (B, N) or (B, heads, N) attention, got {got}")
    if not isinstance(masks, Tensor) or masks.ndim != 3:
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"masks: expected foreground masks of shape (B, H, W), got {got}")
    if len(attn_cls) != len(masks):
        raise ValueError(f"attn_cls and masks: expected the same batch size, got {len(attn_cls)} and {len(masks)}")
    if attn_cls.ndim == 3:
        attn_cls = attn_cls.float().mean(1)  # (B, N), heads averaged
    B, N = attn_cls.shape
    _, H, W = masks.shape
    h = w = math.isqrt(N)
    if h * w != N or H % h or W % w:
        raise ValueError(
            f"attn_cls: {N} tokens do not form a square grid that divides the {H}x{W} masks "
            "(expected N = h * h with h dividing H and W)"
        )
    keep = attention_mask(attn_cls, mass).reshape(B, h, w)  # (B, h, w)
    keep = keep.repeat_interleave(H // h, dim=1).repeat_interleave(W // w, dim=2)  # (B, H, W)
    return mask_iou(keep, masks.to(keep.device) > 0).mean().item()


# --------------------------------------------------------------------------------------------------
# Command line: python -m minivfm.metrics train-reference
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minivfm.metrics", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train-reference", help="train the Shapes reference classifier and save it")
    tr.add_argument("--num-train", type=int, default=16000)
    tr.add_argument("--epochs", type=int, default=5)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", default=str(REFERENCE_PATH))
    fl = sub.add_parser("floor", help="print real_fd (the floor of sample_fd) for some sample sizes")
    fl.add_argument("sizes", type=int, nargs="*", default=[250, 500, 1000, 2000])
    args = parser.parse_args(argv)
    if args.command == "train-reference":
        train_reference(num_train=args.num_train, epochs=args.epochs, seed=args.seed, path=args.out)
    else:
        for n in args.sizes:
            print(f"real_fd({n}) = {real_fd(n):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
