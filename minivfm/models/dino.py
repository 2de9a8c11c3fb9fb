"""Self-distillation with no labels (DINO).

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294. Reference code: https://github.com/facebookresearch/dino
(``main_dino.py``: the augmentations, ``DINOLoss``, the training loop; ``vision_transformer.py``:
``DINOHead``; ``utils.py``: ``MultiCropWrapper``, ``cosine_scheduler``). The method (section 3.1,
Algorithm 1):

    - multi-crop: each image gives two global views and several smaller local views;
    - a student g_s and a teacher g_t, the same ViT and projection head; the teacher sees the
      global views only, the student every view;
    - P_s(x) = softmax(g_s(x) / tau_s), P_t(x) = softmax((g_t(x) - c) / tau_t)   (eq. 1, centring c
      and sharpening tau_t < tau_s);
    - loss: sum over global x and every other view x' of H(P_t(x), P_s(x')), H(a, b) = -a log b  (eq. 3);
    - the teacher is no trained network: theta_t <- lambda theta_t + (1 - lambda) theta_s after each
      student step, lambda following a cosine from 0.996 to 1;
    - the centre: c <- m c + (1 - m) mean of g_t over the batch of every process  (eq. 4), m = 0.9.

Shapes' label is the colour and the kind of its largest shape, so DINO's colour jitter (hue,
saturation, grayscale), blur and solarisation are left out. What remains is photometric noise too
small to change a colour's name: brightness and contrast, and a gain per channel. It is needed:
every Shapes image has its own dim background tint, which every crop of it shares, and with crops
and flips alone DINO clusters the images by that tint (the cpu preset's model, 1,200 steps on 8,000
images, one run each: k-NN 0.13 against 0.27 for a random ViT, the k-NN on the colour of the
largest shape 0.36 against 0.76, attention mIoU 0.085 as the random ViT's). With the jitter: k-NN
0.32, colour 0.97, mIoU 0.34.

Shape glossary: B batch, C channels, H x W image, S local crop side, V = 2 + L views (2 global,
L local), D backbone width, K prototypes (``out_dim``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from minivfm.models.vit import ViT, adamw_warmup_cosine, headless_kwargs, map_batches, results_trainer
from minivfm.profiles import fill_from_preset, preset_arguments
from minivfm.profiles import profile as _profile

__all__ = [
    "DINOConfig",
    "random_resized_crop",
    "photometric_jitter",
    "multi_crop",
    "dino_loss",
    "update_center",
    "cosine_schedule",
    "teacher_temperature",
    "ema_update",
    "DINOHead",
    "MultiCropWrapper",
    "DINO",
    "LitDINO",
    "results",
]


# -- config -----------------------------------------------------------------------------------------


@dataclass
class DINOConfig:
    """Sizes of DINO and how to pretrain it; :meth:`preset` picks them for a profile."""

    image_size: int = 32
    in_channels: int = 3
    # the backbone: a ViT with no head
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    stem: str = "conv"
    # the projection head
    out_dim: int = 1024
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    # multi-crop: global views at the image size, local views at local_size
    num_local_crops: int = 4
    local_size: int = 16
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    # photometric jitter of each view (colour names survive it; see the module's docstring)
    brightness: float = 0.4
    contrast: float = 0.4
    channel_gain: float = 0.2
    # the loss and the teacher
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    # pretraining
    batch_size: int = 64
    max_epochs: int = 10
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup_epochs: float = 1.0
    gradient_clip_val: float = 3.0
    # data for results(): pretraining images, the k-NN probe's splits, the attention masks' images
    num_train: int = 20_000
    num_knn_train: int = 4000
    num_knn_test: int = 2000
    num_attn: int = 1000

    @classmethod
    def preset(cls, profile: str | None = None) -> DINOConfig:
        """The config for a profile (``ci``, ``cpu``, ``gpu``; ``None`` reads ``MINIVFM_PROFILE``)."""
        name = _profile(profile)
        if name == "ci":  # ViTConfig.preset("ci")'s backbone
            return cls(
                patch_size=8, embed_dim=32, depth=2, num_heads=2, stem="conv", out_dim=256, hidden_dim=64,
                bottleneck_dim=32, num_local_crops=2, batch_size=64, max_epochs=2, lr=1e-3, warmup_epochs=0.5,
                momentum_teacher=0.99, num_train=512, num_knn_train=600, num_knn_test=300, num_attn=128,
            )  # fmt: skip
        if name == "cpu":
            # ViTConfig.preset("cpu")'s backbone (conv stem, patch 8: a 4x4 grid, 2x2 for a 16x16 local
            # view), so that lesson 04's supervised ViT compares directly. results("cpu"): knn_acc 0.346
            # (random ViT 0.264), attn_miou 0.341 (random 0.090); the colour of the largest shape is
            # learnt, its kind is not (chance) at this budget, nor with stronger jitter (0.5, 0.5, 0.4)
            # or 24x24 local views (one 1,200-step run each)
            return cls(
                patch_size=8, embed_dim=64, depth=4, num_heads=4, stem="conv", out_dim=1024, hidden_dim=256,
                bottleneck_dim=64, num_local_crops=4, batch_size=64, max_epochs=4, lr=1e-3, warmup_epochs=1.0,
                momentum_teacher=0.99, num_train=20_000, num_knn_train=4000, num_knn_test=2000, num_attn=1000,
            )  # fmt: skip
        # DINO's ViT-S recipe scaled down: ViTConfig.preset("gpu")'s backbone, teacher temperature
        # 0.04 -> 0.07 over 30 epochs, lr 5e-4 x batch / 256
        return cls(
            patch_size=4, embed_dim=192, depth=6, num_heads=3, stem="conv", out_dim=4096, hidden_dim=1024,
            bottleneck_dim=256, num_local_crops=6, batch_size=256, max_epochs=100, lr=5e-4, warmup_epochs=10.0,
            teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30.0, momentum_teacher=0.996,
            num_train=100_000, num_knn_train=10_000, num_knn_test=5000, num_attn=2000,
        )  # fmt: skip

    def backbone_kwargs(self) -> dict:
        """The arguments of the backbone :class:`ViT` (no head; any input size for the local views)."""
        return headless_kwargs(self, stem=self.stem, dynamic_img_size=True)


# -- the functions a lesson rebuilds ----------------------------------------------------------------


def _check_scale(name: str, scale) -> tuple[float, float]:
    ok = isinstance(scale, (tuple, list)) and len(scale) == 2 and all(isinstance(s, (int, float)) for s in scale)
    if not ok or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(
            f"{name}: expected (min, max) fractions of the image area with 0 < min <= max <= 1, got {scale!r}"
        )
    return float(scale[0]), float(scale[1])


def _check_images(images) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (B, C, H, W) tensor, got {got}")
    return images


def random_resized_crop(
    images: Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """One random crop of each image, resized to ``size``, flipped left-right half the time.

    As torchvision's ``RandomResizedCrop`` and ``RandomHorizontalFlip``, on the whole batch at once:
    each crop covers a uniform fraction in ``scale`` of the image area with a log-uniform aspect
    ratio in ``ratio`` (clipped to the image), at a uniform position inside the image; an affine
    sampling grid (``F.affine_grid``) maps the output onto it, read bilinearly (``F.grid_sample``).

    Arguments:
        images: ``(B, C, H, W)``.
        size: the side of the output crops.
        scale: ``(min, max)`` fraction of the image area that a crop covers.
        ratio: ``(min, max)`` width / height of a crop.
        generator: draws the crops (on ``images``' device); ``None`` uses the global RNG.

    Returns:
        ``(B, C, size, size)``.
    """
    images = _check_images(images)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    lo, hi = _check_scale("scale", scale)
    B, C, H, W = images.shape
    u = torch.rand(B, 5, generator=generator, device=images.device)  # (B, 5)
    area = lo + (hi - lo) * u[:, 0]  # (B,), fraction of H * W
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])  # (B,), crop width / height in pixels
    w = (area * aspect * H / W).sqrt().clamp(max=1.0)  # (B,), crop width as a fraction of W
    h = (area / aspect * W / H).sqrt().clamp(max=1.0)  # (B,), crop height as a fraction of H
    cx = (2 * u[:, 2] - 1) * (1 - w)  # (B,), crop centre in [-1, 1] coordinates, inside the image
    cy = (2 * u[:, 3] - 1) * (1 - h)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)  # (B,)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, cx], -1), torch.stack([zero, h, cy], -1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), [B, C, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def photometric_jitter(
    images: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    channel_gain: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random brightness, contrast and per-channel gain of each image, pixels in [-1, 1].

    In [0, 1] pixels: multiply by ``1 + U(-brightness, brightness)`` and each channel by
    ``1 + U(-channel_gain, channel_gain)``, scale the distance to the image's mean grey by
    ``1 + U(-contrast, contrast)``, clip. Unlike DINO's hue, saturation and grayscale jitter, it
    keeps a red shape red: the Shapes palette's colours differ by far more than a 20% gain.

    Arguments:
        images: ``(B, C, H, W)`` in [-1, 1].
        brightness, contrast, channel_gain: strengths in ``[0, 1)``; 0 leaves that part out.
        generator: draws the factors (on ``images``' device); ``None`` uses the global RNG.

    Returns:
        ``(B, C, H, W)`` in [-1, 1].
    """
    images = _check_images(images)
    for name, v in (("brightness", brightness), ("contrast", contrast), ("channel_gain", channel_gain)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a strength in [0, 1), got {v!r}")
    B, C = images.shape[:2]
    u = 2 * torch.rand(B, C + 2, generator=generator, device=images.device, dtype=images.dtype) - 1  # (B, C+2)
    gain = (1 + brightness * u[:, :1]) * (1 + channel_gain * u[:, 2:])  # (B, C)
    x = (images + 1) / 2 * gain[:, :, None, None]  # (B, C, H, W) in [0, 1] pixels
    grey = x.mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x - grey) * (1 + contrast * u[:, 1:2, None, None]) + grey
    return x.clamp(0.0, 1.0) * 2 - 1


def multi_crop(
    images: Tensor,
    num_local_crops: int,
    local_size: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.1, 0.4),
    jitter: tuple[float, float, float] = (0.0, 0.0, 0.0),
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """DINO's views of a batch: two global crops at the image size, then ``num_local_crops`` local
    ones (:func:`random_resized_crop`), each view then jittered on its own
    (:func:`photometric_jitter` with ``jitter = (brightness, contrast, channel_gain)``).

    Returns:
        A list of ``2 + num_local_crops`` tensors: two ``(B, C, H, W)`` global views, then
        ``(B, C, local_size, local_size)`` local views. View ``v`` of image ``i`` is ``views[v][i]``.
    """
    images = _check_images(images)
    if isinstance(num_local_crops, bool) or not isinstance(num_local_crops, int) or num_local_crops < 0:
        raise ValueError(f"num_local_crops: expected an int >= 0, got {num_local_crops!r}")
    _check_scale("global_scale", global_scale)
    _check_scale("local_scale", local_scale)
    H = images.shape[-2]
    views = [random_resized_crop(images, H, global_scale, generator=generator) for _ in range(2)]
    views += [random_resized_crop(images, local_size, local_scale, generator=generator) for _ in range(num_local_crops)]
    if any(jitter):
        views = [photometric_jitter(v, *jitter, generator=generator) for v in views]
    return views


def dino_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
    n_global: int = 2,
) -> Tensor:
    """Cross-entropy between the teacher's centred, sharpened outputs and the student's (eqs 1 and 3).

    Every pair of a teacher view (a global one) and a student view of the same image counts, except
    a view with itself: ``mean over pairs (g, v), g != v, of mean_i H(P_t(x_g^i), P_s(x_v^i))``.

    Arguments:
        student_out: ``(V * B, K)``, the student's outputs on every view, view by view, the
            ``n_global`` global views first (the same views as the teacher's, in the same order).
        teacher_out: ``(n_global * B, K)``, the teacher's outputs on the global views.
        center: ``(K,)`` or ``(1, K)``, subtracted from the teacher's outputs.
        student_temp: tau_s.
        teacher_temp: tau_t; smaller than tau_s sharpens the teacher's targets.
        n_global: the number of global views.

    Returns:
        A scalar; no gradient reaches ``teacher_out`` or ``center``.
    """
    if not isinstance(student_out, Tensor) or not isinstance(teacher_out, Tensor):
        raise ValueError("student_out and teacher_out: expected tensors")
    if student_out.ndim != 2 or teacher_out.ndim != 2 or student_out.shape[1] != teacher_out.shape[1]:
        raise ValueError(
            f"student_out and teacher_out: expected (V * B, K) and (n_global * B, K) with the same K, got "
            f"{tuple(student_out.shape)} and {tuple(teacher_out.shape)}"
        )
    K = student_out.shape[1]
    if not isinstance(center, Tensor) or center.numel() != K or center.ndim > 2:
        got = tuple(center.shape) if isinstance(center, Tensor) else type(center).__name__
        raise ValueError(f"center: expected shape ({K},) or (1, {K}), got {got}")
    if isinstance(n_global, bool) or not isinstance(n_global, int) or n_global < 1:
        raise ValueError(f"n_global: expected an int >= 1, got {n_global!r}")
    if len(teacher_out) % n_global:
        raise ValueError(f"teacher_out: {len(teacher_out)} rows are not n_global={n_global} views of one batch")
    B = len(teacher_out) // n_global
    if B == 0 or len(student_out) % B or len(student_out) // B < max(n_global, 2):
        raise ValueError(
            f"student_out: expected V * B rows with B = {B} (teacher_out's views) and V >= max(n_global, 2) "
            f"views, got {len(student_out)} rows"
        )
    for name, t in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"{name}: expected a positive temperature, got {t!r}")
    V = len(student_out) // B
    log_p = F.log_softmax(student_out.float() / student_temp, dim=-1).reshape(V, B * K)  # (V, B*K)
    q = F.softmax((teacher_out.float() - center.reshape(1, K)) / teacher_temp, dim=-1).detach()  # (G*B, K)
    cross = -(q.reshape(n_global, B * K) @ log_p.T) / B  # (G, V): batch mean of H(P_t(x_g), P_s(x_v))
    same_view = torch.eye(n_global, V, dtype=torch.bool, device=cross.device)  # (G, V)
    return cross[~same_view].mean()


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> Tensor:
    """The new centre, ``momentum * center + (1 - momentum) * mean(teacher_out)`` (eq. 4).

    Under ``torch.distributed`` the mean is over every process's rows (one ``all_reduce`` of the
    sums and the counts, so batches of unequal size weigh by their size); in a single process it is
    the local batch mean.

    Arguments:
        center: ``(1, K)``.
        teacher_out: ``(N, K)``, the teacher's outputs on this process's global views.
        momentum: m in ``[0, 1]``.

    Returns:
        ``(1, K)``.
    """
    if not isinstance(teacher_out, Tensor) or teacher_out.ndim != 2 or center.shape != (1, teacher_out.shape[1]):
        got = tuple(teacher_out.shape) if isinstance(teacher_out, Tensor) else type(teacher_out).__name__
        raise ValueError(f"center and teacher_out: expected (1, K) and (N, K), got {tuple(center.shape)} and {got}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum!r}")
    stats = torch.cat([teacher_out.detach().float().sum(0), teacher_out.new_tensor([len(teacher_out)]).float()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)  # (K + 1,): the sums and the count over every process
    batch_center = (stats[:-1] / stats[-1].clamp_min(1))[None]  # (1, K)
    return center * momentum + batch_center.to(center.dtype) * (1 - momentum)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """From ``start`` at step 0 to ``end`` at ``total_steps`` along half a cosine (DINO's
    ``cosine_scheduler``: the teacher momentum 0.996 -> 1)."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def teacher_temperature(epoch: float, warmup_temp: float, temp: float, warmup_epochs: float) -> float:
    """tau_t at a (fractional) ``epoch``: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs``,
    then ``temp`` (DINO's ``teacher_temp_schedule``, per step here rather than per epoch)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * max(0.0, epoch) / warmup_epochs


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- momentum * theta_t + (1 - momentum) * theta_s`` for every parameter, in place.
    Buffers (BatchNorm statistics) are not averaged: the teacher keeps its own."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params) or any(a.shape != b.shape for a, b in zip(t_params, s_params)):
        raise ValueError("teacher and student: expected the same architecture (parameters of the same shapes)")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum!r}")
    for pt, ps in zip(t_params, s_params):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


# -- the model --------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """The projection head (DINO's ``DINOHead``): a 3-layer MLP with GELU down to a bottleneck,
    L2 normalisation, then a weight-normalised linear layer to the K prototypes whose norm is fixed
    to 1 (``norm_last_layer=True``: each prototype's weight vector is a unit vector).

    The weight norm is ``torch.nn.utils.parametrizations.weight_norm``: ``last_layer.weight`` is
    computed from ``last_layer.parametrizations.weight.original0`` (g, ``(K, 1)``, ones, frozen) and
    ``original1`` (v, ``(K, bottleneck_dim)``), the keys of the state dict.

    Arguments:
        in_dim: the backbone's width D.
        out_dim: K.
        hidden_dim: the MLP's hidden width.
        bottleneck_dim: the width before the last layer.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )  # fmt: skip
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (K, 1)
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D) -> (B, K)``."""
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck_dim), unit vectors
        return self.last_layer(x)  # (B, K), cosines with the prototypes


class MultiCropWrapper(nn.Module):
    """A backbone and a head run on a list of views (DINO's ``MultiCropWrapper``): the backbone
    once per run of views of the same size, the head once on all their class tokens.

    Arguments:
        backbone: a :class:`ViT` without a head (``forward`` gives the class token, ``(B, D)``).
        head: a :class:`DINOHead`.
    """

    def __init__(self, backbone: ViT, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[Tensor]) -> Tensor:
        """Views ``[(B, C, H_v, W_v), ...]`` -> ``(V * B, K)``, view by view."""
        if isinstance(views, Tensor):
            views = [views]
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(views[start:end])))  # (n * B, D)
            start = end
        return self.head(torch.cat(feats))  # (V * B, K)


class DINO(nn.Module):
    """A student and its EMA teacher, the same backbone and head, and the centre.

    Arguments:
        backbone: a :class:`ViT` without a head (``num_classes=0``); with local views of another
            size it must take them (``dynamic_img_size=True``). The teacher is a copy of it.
        out_dim: K, the head's prototypes.
        hidden_dim: the head's hidden width.
        bottleneck_dim: the head's bottleneck width.
        num_local_crops: local views per image.
        local_size: their side in pixels.
        global_scale: the fraction of the image area a global view covers, ``(min, max)``.
        local_scale: the same for a local view.
        jitter: ``(brightness, contrast, channel_gain)`` of :func:`photometric_jitter`.
        student_temp: tau_s.
        teacher_temp: tau_t when ``forward`` is not given one.
        center_momentum: m of the centre's update.
    """

    def __init__(
        self,
        backbone: ViT,
        out_dim: int = 1024,
        hidden_dim: int = 256,
        bottleneck_dim: int = 64,
        num_local_crops: int = 4,
        local_size: int = 16,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.1, 0.4),
        jitter: tuple[float, float, float] = (0.4, 0.4, 0.2),
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, ViT):
            raise ValueError(f"backbone: expected a minivfm ViT, got {type(backbone).__name__}")
        if backbone.num_classes != 0:
            raise ValueError(f"backbone: expected a ViT without a head (num_classes=0), got {backbone.num_classes}")
        pe = backbone.patch_embed
        if num_local_crops and (local_size, local_size) != pe.image_size:
            if not pe.dynamic_img_size:
                raise ValueError(
                    f"backbone: local views of {local_size}x{local_size} need a ViT that takes other sizes than "
                    f"{pe.image_size[0]}x{pe.image_size[1]} (dynamic_img_size=True)"
                )
            if local_size % pe.patch_size:
                raise ValueError(f"local_size: expected a multiple of the patch size {pe.patch_size}, got {local_size}")
        _check_scale("global_scale", global_scale)
        _check_scale("local_scale", local_scale)
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum: expected a value in [0, 1], got {center_momentum!r}")
        self.num_local_crops, self.local_size = num_local_crops, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        photometric_jitter(torch.zeros(1, 1, 1, 1), *jitter)  # checks the strengths
        self.jitter = tuple(jitter)
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.student = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim))
        self.teacher = copy.deepcopy(self.student)  # the same weights to start (DINO loads the student's)
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, images: Tensor, teacher_temp: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Images ``(B, C, H, W)`` -> ``(loss, student_out (V*B, K), teacher_out (2*B, K))``.

        In training mode the centre moves towards the teacher's batch mean (after the loss used it).
        """
        views = multi_crop(
            images, self.num_local_crops, self.local_size, self.global_scale, self.local_scale, self.jitter, generator
        )  # fmt: skip
        with torch.no_grad():
            teacher_out = self.teacher(views[:2])  # (2*B, K)
        student_out = self.student(views)  # (V*B, K)
        temp = self.teacher_temp if teacher_temp is None else teacher_temp
        loss = dino_loss(student_out, teacher_out, self.center, self.student_temp, temp, n_global=2)
        if self.training:
            self.center.copy_(update_center(self.center, teacher_out, self.center_momentum))
        return loss, student_out, teacher_out

    def update_teacher(self, momentum: float) -> None:
        """The EMA step, after each optimiser step of the student."""
        ema_update(self.teacher, self.student, momentum)

    @property
    def backbone(self) -> ViT:
        """The teacher's backbone: DINO evaluates (k-NN, attention maps) with the teacher."""
        return self.teacher.backbone


# -- Lightning --------------------------------------------------------------------------------------


class LitDINO(L.LightningModule):
    """Pretrains :class:`DINO` on unlabelled images; logs ``train/val/test`` ``loss`` (the DINO loss),
    and in training ``teacher_temp`` and ``momentum``.

    Arguments left ``None`` come from ``DINOConfig.preset()`` for the active profile. AdamW (weight
    decay on weight matrices only), linear warmup then cosine decay per step; the teacher follows
    the student by EMA after every optimiser step (``on_train_batch_end``) with a momentum that
    rises from ``momentum_teacher`` to 1 along a cosine. ``max_epochs`` trains nothing here:
    ``minivfm fit`` reads it from ``hparams``.
    """

    def __init__(
        self,
        in_channels: int | None = None,
        image_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        stem: str | None = None,
        out_dim: int | None = None,
        hidden_dim: int | None = None,
        bottleneck_dim: int | None = None,
        num_local_crops: int | None = None,
        local_size: int | None = None,
        global_scale: tuple[float, float] | None = None,
        local_scale: tuple[float, float] | None = None,
        brightness: float | None = None,
        contrast: float | None = None,
        channel_gain: float | None = None,
        student_temp: float | None = None,
        teacher_temp: float | None = None,
        warmup_teacher_temp: float | None = None,
        warmup_teacher_temp_epochs: float | None = None,
        center_momentum: float | None = None,
        momentum_teacher: float | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        warmup_epochs: float | None = None,
        max_epochs: int | None = None,
        profile: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        fill_from_preset(self, DINOConfig.preset(profile))
        hp = self.hparams
        backbone = ViT(**headless_kwargs(hp, stem=hp.stem, dynamic_img_size=True))
        self.model = DINO(
            backbone, hp.out_dim, hp.hidden_dim, hp.bottleneck_dim, hp.num_local_crops, hp.local_size,
            tuple(hp.global_scale), tuple(hp.local_scale), (hp.brightness, hp.contrast, hp.channel_gain),
            hp.student_temp, hp.teacher_temp, hp.center_momentum,
        )  # fmt: skip

    @classmethod
    def from_config(cls, cfg: DINOConfig, **overrides) -> LitDINO:
        """Build from a :class:`DINOConfig` (the fields that are constructor arguments)."""
        return cls(**{**preset_arguments(cfg, LitDINO), **overrides})

    def forward(self, images: Tensor) -> Tensor:
        """The teacher backbone's class token, ``(B, D)``: the features DINO evaluates."""
        return self.model.backbone(images)

    def _epoch(self, batch_idx: int) -> float:
        batches = self.trainer.num_training_batches
        return self.current_epoch + (batch_idx / batches if math.isfinite(batches) and batches > 0 else 0.0)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        temp = teacher_temperature(self._epoch(batch_idx), hp.warmup_teacher_temp, hp.teacher_temp,
                                   hp.warmup_teacher_temp_epochs)  # fmt: skip
        images = batch["image"]
        loss, _, _ = self.model(images, teacher_temp=temp)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        self.log("train/teacher_temp", temp, on_step=True, on_epoch=False, batch_size=len(images))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # after the optimiser step (automatic optimisation): global_step counts the steps taken
        total = max(1, int(self.trainer.estimated_stepping_batches))
        momentum = cosine_schedule(self.trainer.global_step - 1, total, self.hparams.momentum_teacher, 1.0)
        self.model.update_teacher(momentum)
        self.log("train/momentum", momentum, on_step=True, on_epoch=False, batch_size=len(batch["image"]))

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> Tensor:
        images = batch["image"]
        generator = torch.Generator(images.device).manual_seed(batch_idx)  # the same views every epoch
        loss, _, _ = self.model(images, generator=generator)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "test")

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_epochs, (0.9, 0.999))


# -- results ----------------------------------------------------------------------------------------


def _class_tokens(vit: ViT, images: Tensor) -> Tensor:
    """Frozen features: the class token after the final norm, ``(N, D)`` on the CPU."""
    return map_batches(vit, lambda x: vit.forward_features(x)[:, 0].float(), images)


def _cls_attention(vit: ViT, images: Tensor) -> Tensor:
    """The last block's class-token attention to the patches, ``(N, heads, num_patches)`` on the CPU."""
    return map_batches(vit, lambda x: vit.attention_maps(x)[:, :, 0, 1:].float(), images)


def results(profile: str) -> dict:
    """Pretrain DINO under ``profile`` on Shapes scenes (seed 0, labels unused), then measure with
    the teacher's backbone, against a randomly initialised ViT of the same sizes and lesson 04's
    supervised ViT (``vit.train(ViTConfig.preset(profile))``, the same backbone sizes):

    - ``knn_acc``: :func:`minivfm.metrics.knn_accuracy` (k = 20, DINO's weighted vote) on the class
      token after the final norm, Shapes labels (train seed 3, test seed 4); ``knn_acc_random``,
      ``knn_acc_supervised``; baseline: the random ViT;
    - ``attn_miou``: :func:`minivfm.metrics.attn_miou`, the last block's class-token attention (heads
      averaged) thresholded to 60% of its mass against the foreground of ``num_attn`` Shapes images
      (seed 5); ``attn_miou_random``, ``attn_miou_supervised``; baseline: the random ViT;
    - ``seconds``: everything above (``pretrain_seconds``: DINO's pretraining alone).
    """
    threads = torch.get_num_threads()
    if _profile(profile) == "ci":
        torch.set_num_threads(1)  # tiny models: one thread beats two threads fighting over small ops
    try:
        return _results(profile)
    finally:
        torch.set_num_threads(threads)


def _results(profile: str) -> dict:
    from minivfm import metrics
    from minivfm.data import Shapes, shapes_in_memory
    from minivfm.models.vit import ViTConfig
    from minivfm.models.vit import train as train_vit

    cfg = DINOConfig.preset(profile)
    start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    train = shapes_in_memory(cfg.num_train, cfg.image_size, seed=0)
    data = torch.utils.data.StackDataset(image=train.images * 2 - 1, label=train.labels)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    lit = LitDINO.from_config(cfg)
    results_trainer(cfg.max_epochs, profile, gradient_clip_val=cfg.gradient_clip_val).fit(lit, loader)
    pretrain_seconds = time.perf_counter() - start
    dino = lit.model.backbone.eval()
    device = next(dino.parameters()).device

    torch.manual_seed(1)
    random_vit = ViT(**cfg.backbone_kwargs()).to(device)
    supervised, _ = train_vit(ViTConfig.preset(profile))
    vits = {"": dino, "_random": random_vit, "_supervised": supervised.model.to(device)}

    knn_train = shapes_in_memory(cfg.num_knn_train, cfg.image_size, seed=3)
    knn_test = shapes_in_memory(cfg.num_knn_test, cfg.image_size, seed=4)
    attn_set = Shapes(cfg.num_attn, image_size=cfg.image_size, seed=5).get_batch(range(cfg.num_attn))
    out = {}
    for suffix, vit in vits.items():
        train_feats = _class_tokens(vit, knn_train.images * 2 - 1)
        test_feats = _class_tokens(vit, knn_test.images * 2 - 1)
        out[f"knn_acc{suffix}"] = metrics.knn_accuracy(train_feats, knn_train.labels, test_feats, knn_test.labels)
        out[f"attn_miou{suffix}"] = metrics.attn_miou(_cls_attention(vit, attn_set["image"]), attn_set["mask"])
    return {
        **out, "pretrain_seconds": pretrain_seconds, "seconds": time.perf_counter() - start,
        "baselines": {"knn_acc": out["knn_acc_random"], "attn_miou": out["attn_miou_random"]},
    }  # fmt: skip
