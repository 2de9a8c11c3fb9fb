"""A mini Segment Anything (SAM): promptable masks from points, boxes and coarse masks.

Kirillov et al. 2023, "Segment Anything", https://arxiv.org/abs/2304.02643. Reference code:
https://github.com/facebookresearch/segment-anything (``modeling/prompt_encoder.py``,
``mask_decoder.py``, ``transformer.py``, ``predictor.py``). The model (section 3 and appendix A):

    - image encoder: a ViT (MAE-pretrained in the paper, and here: :class:`minivfm.models.mae.MAE`'s
      encoder) run once per image, then a neck to the decoder width C;
    - prompt encoder: a point is its random Fourier features plus a learned embedding of its label
      (positive, negative); a box is its two corners, each with its own learned embedding; padding is
      a learned "not a point"; a coarse mask is downscaled by convolutions and added to the image
      embedding (a learned "no mask" embedding when none is given):

          gamma(v) = [sin(2 pi G (2v - 1)), cos(2 pi G (2v - 1))],   v in [0, 1]^2,  G ~ N(0, 1)^(2 x C/2)

    - mask decoder: output tokens (an IoU token and 1 + 3 mask tokens) with the prompt tokens go
      through a two-way transformer (token self-attention, token->image cross-attention, MLP,
      image->token cross-attention); the image embedding is upscaled and each mask token becomes,
      through a hypernetwork MLP, the weights of a dot product with every pixel of it:

          mask_t(x) = MLP_t(token_t) . (E_up(x) + F(x))        (one logit per pixel x)

      (F: the full-resolution image features below; SAM has E_up alone).

      An MLP on the IoU token predicts each mask's IoU with the truth. Three masks answer an ambiguous
      prompt (one point: the part, the whole, ...); the first token answers an unambiguous one;
    - loss: 20 focal + 1 dice on the mask logits (the minimum over the three masks for a single
      point) plus the mean squared error of the IoU head against each mask's true IoU.

**Resolution.** SAM decodes at 4x its 64x64 token grid; the Shapes ViT has a 4x4 grid (patch 8 on
32x32 images) and its small shapes are 4.5 to 5.5 pixels across, smaller than one token. Upscaling a
4x4 embedding cannot draw their edges, so the decoder upscales the embedding as SAM does (two transposed
convolutions, 4x), resizes it bilinearly to the image size and adds a small full-resolution
convolutional feature of the image (two 3x3 convolutions on the pixels, computed once per image with the encoder), as
HQ-SAM (Ke et al. 2023) fuses early high-resolution features into SAM's mask features: the
transformer decides *which* shape the prompt means on the coarse grid, the pixel features say where
its edges are. Measured under ``cpu`` (MAE start, 1,500 steps, one run each): with these features a point
gives a mean IoU of 0.907 and a box 0.916; with them set to zero, 0.832 and 0.845. Masks come out at the
image's resolution; ``low_res`` logits (SAM's 4x the token grid)
are their average-pooled copy, the size a coarse ``mask_input`` takes.

Differences from SAM kept small on purpose: the hypernetworks and the IoU head are the two-layer
:class:`minivfm.nn.Mlp` (SAM: three layers); points are pixel indices (x = column, y = row; SAM adds
0.5 for the pixel's centre, and so does this file) but boxes are pixel edges as Shapes gives them
(``x0, y0, x1, y1``, pixel ``j`` spans ``[j, j + 1)``), used as they are; no iterative correction
clicks during training (a coarse mask made from the truth stands in for the previous prediction).

Shape glossary: B images, M prompts (several per image), N prompt points, T mask tokens (4) or
outputs (3 or 1), C decoder width, Cu upscaled width, h x w token grid, H x W image, D encoder width.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivfm.models.mae import MAEConfig
from minivfm.models.vit import ViT, adamw_warmup_cosine, headless_kwargs, results_trainer
from minivfm.nn import CrossAttention, Mlp
from minivfm.profiles import fill_from_preset, preset_arguments
from minivfm.profiles import profile as _profile

__all__ = [
    "SAMConfig", "fourier_features", "embed_points", "embed_boxes", "hypernetwork_masks", "select_masks",
    "best_mask", "mask_iou_targets", "sigmoid_focal_loss", "dice_loss", "sam_loss", "interior_points",
    "sample_prompts", "PositionEmbeddingRandom", "ImageEncoder", "PromptEncoder", "TwoWayTransformer",
    "MaskDecoder", "SAM", "SamPredictor", "LitSAM", "build_sam", "results",
]  # fmt: skip


# -- config -----------------------------------------------------------------------------------------


@dataclass
class SAMConfig:
    """Sizes of the mini SAM and how to train it; :meth:`preset` picks them for a profile. The image
    encoder's sizes are MAE's (:meth:`MAEConfig.encoder_kwargs` of the same profile)."""

    image_size: int = 32
    in_channels: int = 3
    # the image encoder (MAE's ViT) and the decoder
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    decoder_dim: int = 64  # C: the neck, prompt and transformer width
    decoder_depth: int = 2  # two-way blocks
    decoder_heads: int = 4
    decoder_mlp_dim: int = 256
    upscale_dim: int = 16  # Cu: the upscaled embedding and the full-resolution image features
    num_multimask_outputs: int = 3
    # training
    batch_size: int = 64  # images per step; every instance of each is one prompt
    max_steps: int = 1500
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    # data for results()
    num_train: int = 20_000
    num_test: int = 1000

    @classmethod
    def preset(cls, profile: str | None = None) -> SAMConfig:
        """The config for a profile (``ci``, ``cpu``, ``gpu``; ``None`` reads ``MINIVFM_PROFILE``)."""
        name = _profile(profile)
        mae = MAEConfig.preset(name)
        enc = dict(
            image_size=mae.image_size, in_channels=mae.in_channels, patch_size=mae.patch_size,
            embed_dim=mae.embed_dim, depth=mae.depth, num_heads=mae.num_heads, mlp_ratio=mae.mlp_ratio,
        )  # fmt: skip
        if name == "ci":
            return cls(
                **enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, upscale_dim=8,
                batch_size=32, max_steps=150, lr=2e-3, warmup_steps=10, num_train=512, num_test=64,
            )  # fmt: skip
        if name == "cpu":
            return cls(
                **enc, decoder_dim=64, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=256, upscale_dim=16,
                batch_size=64, max_steps=1500, lr=1e-3, warmup_steps=100, num_train=20_000, num_test=1000,
            )  # fmt: skip
        return cls(
            **enc, decoder_dim=128, decoder_depth=2, decoder_heads=8, decoder_mlp_dim=1024, upscale_dim=32,
            batch_size=128, max_steps=20_000, lr=8e-4, warmup_steps=500, num_train=100_000, num_test=5000,
        )  # fmt: skip

    def encoder_kwargs(self) -> dict:
        """The arguments of the image encoder's :class:`ViT` (MAE's: no head, the patch stem)."""
        return headless_kwargs(self, stem="patch")


# -- the functions a lesson rebuilds ----------------------------------------------------------------


def fourier_features(coords: Tensor, gaussian_matrix: Tensor) -> Tensor:
    """Random Fourier features of positions in ``[0, 1]`` (SAM's ``PositionEmbeddingRandom._pe_encoding``;
    Tancik et al. 2020).

    Arguments:
        coords: ``(..., 2)`` positions ``(x, y)`` normalised to ``[0, 1]``.
        gaussian_matrix: ``(2, F)``, entries drawn from N(0, scale^2) once and kept fixed.

    Returns:
        ``(..., 2F)``: ``[sin(2 pi (2 coords - 1) G), cos(2 pi (2 coords - 1) G)]``.
    """
    if coords.shape[-1] != 2:
        raise ValueError(f"coords: expected (..., 2) positions (x, y), got {tuple(coords.shape)}")
    if gaussian_matrix.ndim != 2 or gaussian_matrix.shape[0] != 2:
        raise ValueError(f"gaussian_matrix: expected (2, F), got {tuple(gaussian_matrix.shape)}")
    proj = 2 * math.pi * ((2 * coords - 1) @ gaussian_matrix.to(coords.dtype))  # (..., F)
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)  # (..., 2F)


def embed_points(
    points: Tensor, labels: Tensor, gaussian_matrix: Tensor, point_embeddings: Tensor, not_a_point: Tensor,
    image_size: int,
) -> Tensor:  # fmt: skip
    """Point prompts to tokens (SAM's ``PromptEncoder._embed_points``).

    A point at pixel ``(x, y)`` (column, row) sits at its pixel's centre ``(x + 0.5, y + 0.5)``,
    normalised by the image size; its token is the Fourier features of that position plus the
    embedding of its label. A padding point (label -1) is the "not a point" embedding alone.

    Arguments:
        points: ``(M, N, 2)`` pixel coordinates ``(x, y)``.
        labels: ``(M, N)`` long, 1 positive, 0 negative, -1 padding.
        gaussian_matrix: ``(2, C/2)``.
        point_embeddings: ``(2, C)``, the negative (row 0) and positive (row 1) label embeddings.
        not_a_point: ``(C,)``.
        image_size: H = W in pixels.

    Returns:
        ``(M, N, C)``.
    """
    pe = fourier_features((points + 0.5) / image_size, gaussian_matrix)  # (M, N, C)
    lab = labels[..., None]  # (M, N, 1)
    out = torch.where(lab == -1, not_a_point.to(pe.dtype), pe)  # padding: no position
    out = out + (lab == 0) * point_embeddings[0] + (lab == 1) * point_embeddings[1]
    return out  # (M, N, C)


def embed_boxes(boxes: Tensor, gaussian_matrix: Tensor, corner_embeddings: Tensor, image_size: int) -> Tensor:
    """Box prompts to two tokens each (SAM's ``PromptEncoder._embed_boxes``): the Fourier features of
    the top-left and bottom-right corners, plus one learned embedding per corner.

    Arguments:
        boxes: ``(M, 4)`` ``x0, y0, x1, y1`` pixel edges (Shapes' boxes: pixel ``j`` spans ``[j, j + 1)``).
        gaussian_matrix: ``(2, C/2)``.
        corner_embeddings: ``(2, C)``, top-left (row 0) and bottom-right (row 1).
        image_size: H = W in pixels.

    Returns:
        ``(M, 2, C)``.
    """
    corners = boxes.reshape(-1, 2, 2) / image_size  # (M, 2, 2): (x0, y0), (x1, y1) in [0, 1]
    return fourier_features(corners, gaussian_matrix) + corner_embeddings  # (M, 2, C)


def hypernetwork_masks(hyper_in: Tensor, upscaled: Tensor) -> Tensor:
    """Each mask token's weights dotted with every pixel of the upscaled embedding (SAM's
    ``MaskDecoder.predict_masks``): ``masks[m, t, y, x] = sum_c hyper_in[m, t, c] * upscaled[m, c, y, x]``.

    Arguments:
        hyper_in: ``(M, T, Cu)``, the hypernetwork MLPs' outputs, one row per mask token.
        upscaled: ``(M, Cu, H, W)``.

    Returns:
        mask logits ``(M, T, H, W)``.
    """
    M, Cu, H, W = upscaled.shape
    return (hyper_in @ upscaled.reshape(M, Cu, H * W)).reshape(M, -1, H, W)  # (M, T, H, W)


def select_masks(masks: Tensor, iou_pred: Tensor, multimask_output: bool) -> tuple[Tensor, Tensor]:
    """SAM's choice of outputs: the three ambiguity masks (tokens 1..3) for ``multimask_output``,
    else the single-output mask (token 0).

    Arguments:
        masks: ``(M, 1 + K, H, W)`` logits of every mask token; iou_pred: ``(M, 1 + K)``.

    Returns:
        ``(M, K, H, W)`` and ``(M, K)``, or ``(M, 1, H, W)`` and ``(M, 1)``.
    """
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou_pred[:, sl]


def best_mask(masks: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """For each prompt, the mask with the highest score (predicted IoU at test time).

    Arguments:
        masks: ``(M, T, H, W)``; scores: ``(M, T)``.

    Returns:
        ``(M, H, W)`` masks and ``(M,)`` the index of the chosen one.
    """
    idx = scores.argmax(dim=1)  # (M,)
    return masks[torch.arange(len(masks), device=masks.device), idx], idx


def mask_iou_targets(mask_logits: Tensor, target: Tensor) -> Tensor:
    """What the IoU head learns to predict: the IoU of each predicted mask (logit > 0) with the truth.

    Arguments:
        mask_logits: ``(M, T, H, W)``.
        target: ``(M, H, W)`` bool or 0/1.

    Returns:
        ``(M, T)`` IoUs in [0, 1] (1 where both masks are empty), without gradient.
    """
    pred = mask_logits.detach() > 0  # (M, T, H, W)
    gt = target.bool()[:, None]  # (M, 1, H, W)
    inter = (pred & gt).flatten(2).sum(-1).float()
    union = (pred | gt).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))  # (M, T)


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) per mask, averaged over its pixels: with p = sigmoid(logit) and
    p_t = p where the target is 1, else 1 - p, ``-alpha_t (1 - p_t)^gamma log p_t``
    (alpha_t = alpha for the target's pixels, 1 - alpha for the others).

    Arguments:
        logits: ``(..., H, W)``; target: the same shape, 0/1.

    Returns:
        ``(...)``, one loss per mask.
    """
    target = target.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log p_t
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft dice loss per mask: ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``, p = sigmoid(logit).

    Arguments:
        logits: ``(..., H, W)``; target: the same shape, 0/1.

    Returns:
        ``(...)``, one loss per mask.
    """
    p = torch.sigmoid(logits).flatten(-2)
    t = target.to(logits.dtype).flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def sam_loss(
    mask_logits: Tensor, iou_pred: Tensor, target: Tensor, focal_weight: float = 20.0, dice_weight: float = 1.0,
    iou_weight: float = 1.0, iou_target: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """SAM's loss for the masks of a batch of prompts: ``focal_weight * focal + dice_weight * dice`` of
    each output, the minimum over the outputs (only the best of the three ambiguity masks learns),
    plus ``iou_weight`` times the MSE of the IoU head against every output's true IoU.

    Arguments:
        mask_logits: ``(M, T, H, W)`` (T = 3 for multi-mask output, 1 otherwise).
        iou_pred: ``(M, T)``.
        target: ``(M, H, W)``, 0/1.
        iou_target: ``(M, T)``, what the IoU head should predict; ``None``: :func:`mask_iou_targets`.

    Returns:
        the scalar loss and its parts ``{"focal", "dice", "iou"}`` (of the chosen masks, detached).
    """
    tgt = target[:, None].expand_as(mask_logits)
    focal = sigmoid_focal_loss(mask_logits, tgt)  # (M, T)
    dice = dice_loss(mask_logits, tgt)  # (M, T)
    per_mask = focal_weight * focal + dice_weight * dice  # (M, T)
    best = per_mask.argmin(dim=1)  # (M,)
    rows = torch.arange(len(per_mask), device=per_mask.device)
    iou_target = mask_iou_targets(mask_logits, target) if iou_target is None else iou_target.detach()
    iou_mse = F.mse_loss(iou_pred, iou_target)
    loss = per_mask[rows, best].mean() + iou_weight * iou_mse
    parts = {"focal": focal[rows, best].mean().detach(), "dice": dice[rows, best].mean().detach(),
             "iou": iou_mse.detach()}  # fmt: skip
    return loss, parts


def _erode(masks: Tensor) -> Tensor:
    """One step of erosion with a 3x3 square (pixels outside the image count as background)."""
    return -F.max_pool2d(-masks.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0.5


def interior_points(masks: Tensor) -> Tensor:
    """A fixed point prompt per mask: the pixel farthest from the mask's boundary (the last to go
    under repeated 3x3 erosion); among ties, the one nearest their mean.

    Arguments:
        masks: ``(M, H, W)`` bool, each with at least one pixel.

    Returns:
        ``(M, 2)`` float pixel coordinates ``(x, y)`` (column, row), a pixel inside each mask.
    """
    m = masks.bool()
    if (m.flatten(1).sum(1) == 0).any():
        raise ValueError("masks: every mask needs at least one pixel for an interior point")
    depth = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    cur = m
    while cur.any():
        depth += cur
        cur = _erode(cur)
    top = depth == depth.flatten(1).max(1).values[:, None, None]  # (M, H, W), the deepest pixels
    H, W = m.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(H, device=m.device), torch.arange(W, device=m.device), indexing="ij")
    n = top.flatten(1).sum(1).float()
    cx = (top * xs).flatten(1).sum(1) / n
    cy = (top * ys).flatten(1).sum(1) / n
    dist = (xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2  # (M, H, W)
    dist = torch.where(top, dist, torch.full_like(dist, float("inf")))
    idx = dist.flatten(1).argmin(1)
    return torch.stack([idx % W, idx // W], dim=1).float()  # (M, 2)


def _random_pixels(allowed: Tensor, generator: torch.Generator | None) -> Tensor:
    """One pixel ``(x, y)`` uniformly from each ``(M, H, W)`` mask (rows without one: anywhere)."""
    M, H, W = allowed.shape
    weights = allowed.flatten(1).float()
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    idx = torch.multinomial(weights, 1, generator=generator)[:, 0]
    return torch.stack([idx % W, idx // W], dim=1).float()


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight boxes ``(M, 4)`` ``x0, y0, x1, y1`` (pixel edges, Shapes' convention) of ``(M, H, W)`` masks."""
    m = masks.bool()
    cols, rows = m.any(1), m.any(2)  # (M, W), (M, H)
    W, H = cols.shape[1], rows.shape[1]
    x0 = cols.float().argmax(1)
    x1 = W - cols.flip(1).float().argmax(1)
    y0 = rows.float().argmax(1)
    y1 = H - rows.flip(1).float().argmax(1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def sample_prompts(masks: Tensor, kind: str, generator: torch.Generator | None = None, max_extra: int = 2) -> dict:
    """Training prompts drawn from instance masks (SAM's simulation of a user, without correction clicks).

    Arguments:
        masks: ``(M, H, W)`` bool, one instance each.
        kind: ``"point"``, one positive point uniform over the instance's pixels (an ambiguous prompt:
            trained with three outputs); ``"points"``, that point and 1 to ``max_extra`` more, each
            positive (inside) or negative (outside but within the instance's box grown by 3 pixels)
            with probability 1/2, padded with label -1; ``"box"``, the tight box with each side moved
            by N(0, (0.1 side)^2), clipped to 2 pixels.
        generator: the random numbers (CPU).

    Returns:
        ``{"points": (M, N, 2), "labels": (M, N)}`` or ``{"boxes": (M, 4)}``.
    """
    M, H, W = masks.shape
    m = masks.bool().cpu()
    if kind == "box":
        boxes = mask_boxes(m)  # (M, 4)
        side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1).repeat(1, 2)  # (M, 4)
        noise = (torch.randn(M, 4, generator=generator) * 0.1 * side).clamp(-2, 2)
        boxes = boxes + noise
        lo = torch.tensor([0.0, 0.0, 1.0, 1.0])
        hi = torch.tensor([W - 1.0, H - 1.0, W, H])
        boxes = torch.maximum(torch.minimum(boxes, hi), lo)  # inside the image
        return {"boxes": boxes.to(masks.device)}
    if kind not in ("point", "points"):
        raise ValueError(f"kind: expected 'point', 'points' or 'box', got {kind!r}")
    points = [_random_pixels(m, generator)]
    labels = [torch.ones(M, dtype=torch.long)]
    if kind == "points":
        boxes = mask_boxes(m)
        ys, xs = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
        near = (xs >= boxes[:, 0, None, None] - 3) & (xs < boxes[:, 2, None, None] + 3)
        near = near & (ys >= boxes[:, 1, None, None] - 3) & (ys < boxes[:, 3, None, None] + 3)
        count = torch.randint(1, max_extra + 1, (M,), generator=generator)  # extra points per prompt
        for j in range(max_extra):
            positive = torch.rand(M, generator=generator) < 0.5
            pos, neg = _random_pixels(m, generator), _random_pixels(near & ~m, generator)
            points.append(torch.where(positive[:, None], pos, neg))
            lab = positive.long()
            labels.append(torch.where(j < count, lab, torch.full_like(lab, -1)))
    return {"points": torch.stack(points, 1).to(masks.device), "labels": torch.stack(labels, 1).to(masks.device)}


def coarse_masks(masks: Tensor, low_res: int, grid: int) -> Tensor:
    """A coarse mask prompt made from the truth: the instance averaged over ``grid x grid`` cells, spread
    back to ``low_res x low_res`` bilinearly, as logits (about +-4). Stands in for a previous prediction."""
    x = F.adaptive_avg_pool2d(masks.float()[:, None], grid)  # (M, 1, grid, grid)
    x = F.interpolate(x, size=(low_res, low_res), mode="bilinear", align_corners=False)
    return 8 * (x - 0.5)  # (M, 1, low_res, low_res)


# -- the model --------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (SAM's ``LayerNorm2d``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of positions (SAM's ``PositionEmbeddingRandom``): a fixed Gaussian
    matrix ``(2, C/2)`` (a buffer: saved, never trained).

    Arguments:
        num_pos_feats: C/2; the features have width C.
        scale: the standard deviation of the Gaussian entries.
    """

    def __init__(self, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def forward(self, size: tuple[int, int]) -> Tensor:
        """The dense encoding of an ``h x w`` grid of cell centres, ``(C, h, w)``."""
        h, w = size
        G = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=G.device, dtype=G.dtype) + 0.5) / h
        x = (torch.arange(w, device=G.device, dtype=G.dtype) + 0.5) / w
        coords = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2): (x, y)
        return fourier_features(coords, G).permute(2, 0, 1)  # (C, h, w)


class ImageEncoder(nn.Module):
    """The image encoder, run once per image: the ViT's patch tokens on their grid, a neck to the
    decoder width (SAM's: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d), and the full-resolution
    convolutional features that let the decoder draw shapes smaller than a token (see the module
    docstring).

    Arguments:
        vit: a :class:`ViT` without a head (``MAEConfig.encoder_kwargs()``); load an MAE into it with
            ``load_state_dict(mae.encoder_state_dict(), strict=True)``.
        out_dim: C, the decoder width.
        fine_dim: Cu, the width of the full-resolution features.
    """

    def __init__(self, vit: ViT, out_dim: int, fine_dim: int) -> None:
        super().__init__()
        if not isinstance(vit, ViT) or vit.num_classes != 0:
            raise ValueError("vit: expected a minivfm ViT without a head (num_classes=0)")
        self.vit = vit
        D = vit.embed_dim
        self.grid_size = vit.patch_embed.grid_size
        self.image_size = vit.patch_embed.image_size
        self.in_chans = vit.patch_embed.in_chans
        self.neck = nn.Sequential(
            nn.Conv2d(D, out_dim, 1, bias=False), LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim),
        )  # fmt: skip
        self.fine = nn.Sequential(
            nn.Conv2d(self.in_chans, fine_dim, 3, padding=1), nn.GELU(), nn.Conv2d(fine_dim, fine_dim, 3, padding=1)
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, C_in, H, W)`` in [-1, 1] -> embedding ``(B, C, h, w)`` and fine features ``(B, Cu, H, W)``."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected (B, {self.in_chans}, H, W), got {got}")
        if tuple(images.shape[1:]) != (self.in_chans, *self.image_size):
            raise ValueError(
                f"images: expected (B, {self.in_chans}, {self.image_size[0]}, {self.image_size[1]}), the size the "
                f"encoder was built for, got {tuple(images.shape)}"
            )
        B = images.shape[0]
        h, w = self.grid_size
        tokens = self.vit.forward_features(images)[:, 1:]  # (B, h*w, D), the class token dropped
        x = tokens.transpose(1, 2).reshape(B, -1, h, w)  # (B, D, h, w)
        return self.neck(x), self.fine(images)  # (B, C, h, w), (B, Cu, H, W)


class PromptEncoder(nn.Module):
    """Points, boxes and coarse masks to sparse tokens and a dense embedding (SAM's ``PromptEncoder``).

    Arguments:
        embed_dim: C.
        grid_size: ``(h, w)``, the image embedding's grid.
        image_size: H = W in pixels.
        mask_in_chans: hidden channels of the mask downscaling.
    """

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], image_size: int, mask_in_chans: int = 16) -> None:
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sin and cos halves), got {embed_dim}")
        self.embed_dim, self.grid_size, self.image_size = embed_dim, tuple(grid_size), image_size
        self.mask_input_size = (4 * grid_size[0], 4 * grid_size[1])  # SAM's low-res masks
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.Parameter(torch.randn(2, embed_dim))  # negative, positive
        self.corner_embeddings = nn.Parameter(torch.randn(2, embed_dim))  # box top-left, bottom-right
        self.not_a_point_embed = nn.Parameter(torch.randn(embed_dim))
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, stride=2), LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, stride=2), LayerNorm2d(mask_in_chans), nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, 1),
        )  # fmt: skip
        self.no_mask_embed = nn.Parameter(torch.randn(embed_dim))

    def get_dense_pe(self) -> Tensor:
        """The positional encoding of the image grid, ``(1, C, h, w)``."""
        return self.pe_layer(self.grid_size)[None]

    def embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """``(M, N, 2)``, ``(M, N)`` -> ``(M, N [+1], C)``; ``pad`` appends a padding point (no box follows)."""
        if pad:
            points = torch.cat([points, points.new_zeros(len(points), 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(len(labels), 1)], dim=1)
        G = self.pe_layer.positional_encoding_gaussian_matrix
        return embed_points(points, labels, G, self.point_embeddings, self.not_a_point_embed, self.image_size)

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """``(M, 4)`` -> ``(M, 2, C)``."""
        G = self.pe_layer.positional_encoding_gaussian_matrix
        return embed_boxes(boxes, G, self.corner_embeddings, self.image_size)

    def forward(
        self, points: Tensor | None, labels: Tensor | None, boxes: Tensor | None, masks: Tensor | None,
        num_prompts: int | None = None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """
        Arguments:
            points, labels: ``(M, N, 2)`` and ``(M, N)``, or both ``None``.
            boxes: ``(M, 4)`` or ``None``.
            masks: ``(M, 1, 4h, 4w)`` coarse mask logits or ``None``.
            num_prompts: M when no prompt says it (no prompt at all).

        Returns:
            sparse tokens ``(M, N', C)`` (N' may be 0) and the dense embedding ``(M, C, h, w)``.
        """
        M = _check_prompts(points, labels, boxes, masks, self.mask_input_size, num_prompts)
        device = self.point_embeddings.device
        sparse = torch.empty(M, 0, self.embed_dim, device=device)
        if points is not None:
            sparse = torch.cat([sparse, self.embed_points(points.float(), labels.long(), pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes.float())], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks.float())  # (M, C, h, w)
        else:
            dense = self.no_mask_embed[None, :, None, None].expand(M, -1, *self.grid_size)
        return sparse, dense


def _check_prompts(points, labels, boxes, masks, mask_size, num_prompts) -> int:
    """Check the prompts' shapes against each other; return the number of prompts M."""
    sizes = []
    if (points is None) != (labels is None):
        raise ValueError("points and point_labels: give both or neither")
    if points is not None:
        if not isinstance(points, Tensor) or points.ndim != 3 or points.shape[-1] != 2:
            raise ValueError(f"points: expected (M, N, 2) pixel coordinates (x, y), got {_shape(points)}")
        if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(points.shape[:2]):
            raise ValueError(
                f"point_labels: expected one label per point, shape {tuple(points.shape[:2])}, got {_shape(labels)}"
            )
        if not ((labels >= -1) & (labels <= 1)).all():
            raise ValueError("point_labels: expected 1 (positive), 0 (negative) or -1 (padding)")
        sizes.append(points.shape[0])
    if boxes is not None:
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes: expected (M, 4) boxes x0, y0, x1, y1, got {_shape(boxes)}")
        sizes.append(boxes.shape[0])
    if masks is not None:
        if not isinstance(masks, Tensor) or masks.ndim != 4 or tuple(masks.shape[1:]) != (1, *mask_size):
            raise ValueError(f"mask_input: expected (M, 1, {mask_size[0]}, {mask_size[1]}) logits, got {_shape(masks)}")
        sizes.append(masks.shape[0])
    if num_prompts is not None:
        sizes.append(num_prompts)
    if not sizes:
        raise ValueError("no prompt: give points, boxes or mask_input (or num_prompts)")
    if len(set(sizes)) != 1:
        raise ValueError(f"the prompts disagree on their number: {sizes} (points, boxes, mask_input)")
    return sizes[0]


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


class TwoWayAttentionBlock(nn.Module):
    """SAM's two-way block (post-norm): token self-attention, token->image cross-attention, an MLP on
    the tokens, image->token cross-attention. Positions are added to queries and keys, not values."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2, skip_first_pe: bool = False):
        super().__init__()
        self.self_attn = CrossAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = CrossAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, act_layer=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = CrossAttention(dim, num_heads, downsample_rate)
        self.norm4 = nn.LayerNorm(dim)
        self.skip_first_pe = skip_first_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_pe:  # the first block: the tokens are their positions already
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)  # (M, T', C)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))  # (M, hw, C)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a final token->image attention (SAM's ``TwoWayTransformer``)."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_pe=i == 0) for i in range(depth)]
        )
        self.final_attn_token_to_image = CrossAttention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(M, C, h, w)``, ``(M, C, h, w)``, ``(M, T', C)`` -> tokens ``(M, T', C)`` and image ``(M, hw, C)``."""
        keys = image_embedding.flatten(2).transpose(1, 2)  # (M, hw, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MaskDecoder(nn.Module):
    """SAM's ``MaskDecoder``: output tokens and prompt tokens through the two-way transformer, the image
    embedding upscaled to full resolution (plus the fine features), one hypernetwork per mask token,
    and the IoU head.

    Arguments:
        dim: C.
        grid_size: ``(h, w)``; the upscaling goes from it to the image size.
        image_size: H = W.
        upscale_dim: Cu.
        depth, num_heads, mlp_dim: the two-way transformer.
        num_multimask_outputs: K, the ambiguity masks (1 + K mask tokens).
    """

    def __init__(
        self, dim: int, grid_size: tuple[int, int], image_size: int, upscale_dim: int, depth: int = 2,
        num_heads: int = 4, mlp_dim: int = 256, num_multimask_outputs: int = 3,
    ) -> None:  # fmt: skip
        super().__init__()
        factor = image_size // grid_size[0]
        steps = factor.bit_length() - 1
        if factor != 2**steps or steps < 1 or grid_size[0] * factor != image_size:
            raise ValueError(f"the patch size (image {image_size} / grid {grid_size[0]}) must be a power of two >= 2")
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.mask_tokens = nn.Parameter(torch.randn(self.num_mask_tokens, dim) * 0.02)
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim)
        # SAM's upscaling: two transposed convolutions (4x), widths halving down to Cu; to full resolution
        # from there by bilinear interpolation (patch 8) before the fine features are added
        steps = min(2, steps)
        self.image_size = image_size
        layers: list[nn.Module] = []
        cin = dim
        for i in range(steps):
            cout = max(upscale_dim, dim // 2 ** (i + 1)) if i < steps - 1 else upscale_dim
            layers.append(nn.ConvTranspose2d(cin, cout, 2, stride=2))
            if i < steps - 1:
                layers.append(LayerNorm2d(cout))
            layers.append(nn.GELU())
            cin = cout
        self.output_upscaling = nn.Sequential(*layers)
        self.output_hypernetworks_mlps = nn.ModuleList(
            [Mlp(dim, dim, upscale_dim) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = Mlp(dim, dim, self.num_mask_tokens)

    def forward(
        self, image_embedding: Tensor, fine: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """
        Arguments:
            image_embedding: ``(M, C, h, w)``, one per prompt (repeated for prompts on the same image).
            fine: ``(M, Cu, H, W)``, the full-resolution image features.
            image_pe: ``(1, C, h, w)``.
            sparse: ``(M, N', C)`` prompt tokens; dense: ``(M, C, h, w)``.
            multimask_output: three masks (ambiguity) or one.

        Returns:
            mask logits ``(M, 3 or 1, H, W)`` and predicted IoUs ``(M, 3 or 1)``.
        """
        masks, iou_pred = self.predict_masks(image_embedding, fine, image_pe, sparse, dense)
        return select_masks(masks, iou_pred, multimask_output)

    def predict_masks(
        self, image_embedding: Tensor, fine: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor
    ) -> tuple[Tensor, Tensor]:
        """All ``1 + K`` masks ``(M, 1 + K, H, W)`` and IoUs ``(M, 1 + K)``."""
        M = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token, self.mask_tokens], dim=0)  # (1 + T, C)
        tokens = torch.cat([output_tokens[None].expand(M, -1, -1), sparse], dim=1)  # (M, 1 + T + N', C)
        src = image_embedding + dense  # (M, C, h, w)
        _, C, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(M, -1, -1, -1), tokens)
        iou_token_out = hs[:, 0]  # (M, C)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # (M, T, C)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(M, C, h, w))  # (M, Cu, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (M, T, Cu)
        # MLP_t(token_t) . (up(E_up)(x) + F(x)): the dot product is linear, so the coarse part is taken
        # on the 4h x 4w grid and its T logit maps (not its Cu channels) are resized bilinearly
        masks = self.dot_masks(hyper_in, upscaled)  # (M, T, 4h, 4w)
        if masks.shape[-2:] != fine.shape[-2:]:
            masks = F.interpolate(masks, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        masks = masks + self.dot_masks(hyper_in, fine)  # (M, T, H, W)
        return masks, self.iou_prediction_head(iou_token_out)  # (M, T, H, W), (M, T)

    def dot_masks(self, hyper_in: Tensor, features: Tensor) -> Tensor:
        """:func:`hypernetwork_masks` (a lesson's subclass gives its own)."""
        return hypernetwork_masks(hyper_in, features)


class SAM(nn.Module):
    """The mini SAM: an image encoder, a prompt encoder and a mask decoder, given as modules (as
    segment-anything's ``Sam``); :func:`build_sam` wires them from a :class:`SAMConfig`."""

    def __init__(self, image_encoder: ImageEncoder, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = prompt_encoder.image_size

    def load_mae_encoder(self, state_dict: dict[str, Tensor]) -> None:
        """Start the image encoder from an MAE's (``MAE.encoder_state_dict()``); every key must fit."""
        self.image_encoder.vit.load_state_dict(state_dict, strict=True)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> embedding ``(B, C, h, w)`` and fine features ``(B, Cu, H, W)``."""
        return self.image_encoder(images)

    def decode(
        self, features: tuple[Tensor, Tensor], image_index: Tensor | None = None, points: Tensor | None = None,
        labels: Tensor | None = None, boxes: Tensor | None = None, mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Masks for M prompts on encoded images, without encoding again.

        Arguments:
            features: :meth:`encode`'s output for B images.
            image_index: ``(M,)`` long, the image of each prompt; ``None``: prompt m on image m (M = B).
            points, labels, boxes, mask_input: as :class:`PromptEncoder`.
            multimask_output: three masks per prompt, or one.

        Returns:
            mask logits ``(M, 3 or 1, H, W)`` and predicted IoUs ``(M, 3 or 1)``.
        """
        embedding, fine = features
        if image_index is None:
            image_index = torch.arange(len(embedding), device=embedding.device)
        M = len(image_index)
        sparse, dense = self.prompt_encoder(points, labels, boxes, mask_input, num_prompts=M)
        return self.mask_decoder(
            embedding[image_index], fine[image_index], self.prompt_encoder.get_dense_pe(), sparse, dense,
            multimask_output,
        )  # fmt: skip

    def forward(self, images: Tensor, image_index: Tensor | None = None, **prompts) -> tuple[Tensor, Tensor]:
        """:meth:`encode` then :meth:`decode` (``prompts``: its keyword arguments)."""
        return self.decode(self.encode(images), image_index, **prompts)


def build_sam(
    cfg: SAMConfig, prompt_encoder_class: type[PromptEncoder] | None = None,
    mask_decoder_class: type[MaskDecoder] | None = None,
) -> SAM:  # fmt: skip
    """A :class:`SAM` with the sizes of ``cfg`` (random weights; :meth:`SAM.load_mae_encoder` for MAE's).
    The classes default to :class:`PromptEncoder` and :class:`MaskDecoder` (a lesson passes subclasses)."""
    vit = ViT(**cfg.encoder_kwargs())
    encoder = ImageEncoder(vit, cfg.decoder_dim, cfg.upscale_dim)
    prompt = (prompt_encoder_class or PromptEncoder)(cfg.decoder_dim, encoder.grid_size, cfg.image_size)
    decoder = (mask_decoder_class or MaskDecoder)(
        cfg.decoder_dim, encoder.grid_size, cfg.image_size, cfg.upscale_dim, cfg.decoder_depth, cfg.decoder_heads,
        cfg.decoder_mlp_dim, cfg.num_multimask_outputs,
    )  # fmt: skip
    return SAM(encoder, prompt, decoder)


class SamPredictor:
    """Encode an image once, then answer many prompts (segment-anything's ``SamPredictor``).

    Example::

        predictor = SamPredictor(sam)
        predictor.set_image(image)  # (3, H, W) in [-1, 1]
        masks, scores, low_res = predictor.predict(points=[[12, 9]], point_labels=[1])
    """

    def __init__(self, model: SAM) -> None:
        self.model = model
        self.features: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def set_image(self, image: Tensor) -> None:
        """Encode ``image`` ``(3, H, W)`` (or ``(1, 3, H, W)``) in [-1, 1]; later :meth:`predict` calls reuse it."""
        if not isinstance(image, Tensor) or image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[0] != 1):
            raise ValueError(f"image: expected one image (3, H, W), got {_shape(image)}")
        image = image if image.ndim == 4 else image[None]
        self.model.eval()
        device = next(self.model.parameters()).device
        self.features = self.model.encode(image.float().to(device))

    @torch.no_grad()
    def predict_torch(
        self, points: Tensor | None = None, point_labels: Tensor | None = None, boxes: Tensor | None = None,
        mask_input: Tensor | None = None, multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """M prompts at once on the current image (shapes as :class:`PromptEncoder`).

        Returns:
            masks ``(M, 3 or 1, H, W)`` bool, predicted IoUs ``(M, 3 or 1)``, low-res logits
            ``(M, 3 or 1, 4h, 4w)`` (a ``mask_input`` for a next prediction).
        """
        if self.features is None:
            raise RuntimeError("call set_image(image) before predict")
        device = self.features[0].device
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        M = _check_prompts(points, point_labels, boxes, mask_input, self.model.prompt_encoder.mask_input_size, None)
        logits, iou = self.model.decode(
            self.features, torch.zeros(M, dtype=torch.long, device=device), move(points), move(point_labels),
            move(boxes), move(mask_input), multimask_output,
        )  # fmt: skip
        low = F.adaptive_avg_pool2d(logits, self.model.prompt_encoder.mask_input_size)
        return logits > 0, iou, low

    def predict(
        self, points=None, point_labels=None, box=None, mask_input=None, multimask_output: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One prompt on the current image.

        Arguments:
            points: ``(N, 2)`` pixel coordinates ``(x, y)`` (a tensor or nested lists), or ``None``.
            point_labels: ``(N,)``: 1 positive, 0 negative.
            box: ``(4,)`` ``x0, y0, x1, y1`` pixel edges, or ``None``.
            mask_input: ``(1, 4h, 4w)`` logits, e.g. a previous ``low_res`` output, or ``None``.
            multimask_output: three masks (for an ambiguous prompt such as one point) or one.

        Returns:
            masks ``(3 or 1, H, W)`` bool, predicted IoUs ``(3 or 1,)``, low-res logits ``(3 or 1, 4h, 4w)``.
        """
        pts = lab = bx = mk = None
        if points is not None or point_labels is not None:
            if points is None or point_labels is None:
                raise ValueError("points and point_labels: give both or neither")
            pts, lab = torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(point_labels)
            if pts.ndim != 2 or pts.shape[-1] != 2:
                raise ValueError(f"points: expected (N, 2) pixel coordinates (x, y), got {tuple(pts.shape)}")
            if lab.shape != pts.shape[:1]:
                raise ValueError(f"point_labels: expected ({pts.shape[0]},), one per point, got {tuple(lab.shape)}")
            pts, lab = pts[None], lab[None].long()
        if box is not None:
            bx = torch.as_tensor(box, dtype=torch.float32)
            if bx.shape != (4,):
                raise ValueError(f"box: expected (4,) x0, y0, x1, y1, got {tuple(bx.shape)}")
            bx = bx[None]
        if mask_input is not None:
            mk = torch.as_tensor(mask_input, dtype=torch.float32)
            mk = mk[None] if mk.ndim == 3 else mk
        masks, iou, low = self.predict_torch(pts, lab, bx, mk, multimask_output)
        return masks[0], iou[0], low[0]


# -- Lightning --------------------------------------------------------------------------------------


def instance_masks(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Shapes' id maps ``(B, H, W)`` -> one binary mask per visible instance ``(M, H, W)`` and the
    image of each ``(M,)``."""
    ids = torch.arange(1, int(mask.max()) + 1, device=mask.device) if mask.numel() else mask.new_zeros(0)
    masks = mask[:, None] == ids[None, :, None, None]  # (B, K, H, W)
    present = masks.flatten(2).any(-1)  # (B, K)
    image_index, k = present.nonzero(as_tuple=True)
    return masks[image_index, k], image_index


class LitSAM(L.LightningModule):
    """Trains a :class:`SAM` on Shapes instance masks with prompts sampled from them (:func:`sample_prompts`).

    Each step encodes the images once and decodes one prompt per instance. The kind of prompt is drawn per
    step: one point (three outputs, the loss of the best one) with probability 0.4, several points (one
    output) 0.2, a jittered box (one output) 0.4; a quarter of the prompts also get a coarse mask. Validation
    and test score fixed prompts: :func:`interior_points` (the mask chosen by predicted IoU) and tight boxes,
    and log ``miou_point`` and ``miou_box``. AdamW, warmup then cosine decay per step. Arguments left ``None``
    come from ``SAMConfig.preset()``; ``max_steps`` trains nothing here (``minivfm fit`` reads it).

    Arguments:
        mae_checkpoint: a path to a ``LitMAE`` checkpoint (``minivfm fit --config configs/mae.yaml`` writes
            one) whose encoder starts the image encoder; ``""``: start from scratch (or call
            ``lit.model.load_mae_encoder(mae.encoder_state_dict())`` in Python).
    """

    def __init__(
        self,
        image_size: int | None = None,
        in_channels: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        decoder_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        decoder_mlp_dim: int | None = None,
        upscale_dim: int | None = None,
        num_multimask_outputs: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        warmup_steps: int | None = None,
        focal_weight: float | None = None,
        dice_weight: float | None = None,
        iou_weight: float | None = None,
        max_steps: int | None = None,
        mae_checkpoint: str = "",
        profile: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        fill_from_preset(self, SAMConfig.preset(profile))
        hp = self.hparams
        cfg = SAMConfig(**{f.name: hp[f.name] for f in fields(SAMConfig) if f.name in hp})
        self.model = self.build_model(cfg)
        if hp.mae_checkpoint:
            self.model.load_mae_encoder(_mae_encoder_state(hp.mae_checkpoint))
        self.generator = torch.Generator().manual_seed(0)

    def build_model(self, cfg: SAMConfig) -> SAM:
        """The model; a lesson's subclass may return its own."""
        return build_sam(cfg)

    @classmethod
    def from_config(cls, cfg: SAMConfig, **overrides) -> LitSAM:
        """Build from a :class:`SAMConfig` (the fields that are constructor arguments)."""
        return cls(**{**preset_arguments(cfg, LitSAM), **overrides})

    def forward(self, images: Tensor, image_index: Tensor | None = None, **prompts) -> tuple[Tensor, Tensor]:
        return self.model(images, image_index, **prompts)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        masks, image_index = instance_masks(batch["mask"])
        g = self.generator
        u = torch.rand(2, generator=g).tolist()
        kind = "point" if u[0] < 0.4 else "points" if u[0] < 0.6 else "box"
        prompts = sample_prompts(masks, kind, g)
        if u[1] < 0.25:
            mask_size = self.model.prompt_encoder.mask_input_size[0]
            prompts["mask_input"] = coarse_masks(masks, mask_size, max(2, mask_size // 2))
        logits, iou = self.model(images, image_index, multimask_output=kind == "point", **prompts)
        loss, parts = self.loss(logits, iou, masks)
        M = len(masks)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=M)
        for name, value in parts.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=M)
        return loss

    def loss(self, logits: Tensor, iou_pred: Tensor, masks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`sam_loss` with the configured weights (a lesson's subclass gives its own IoU targets)."""
        hp = self.hparams
        return sam_loss(logits, iou_pred, masks, hp.focal_weight, hp.dice_weight, hp.iou_weight)

    def _eval_step(self, batch: dict, stage: str) -> None:
        masks, image_index = instance_masks(batch["mask"])
        features = self.model.encode(batch["image"])
        m_point, m_box = evaluate_prompts(self.model, features, masks, image_index)
        self.log(f"{stage}/miou_point", m_point["pred"].mean(), on_epoch=True, prog_bar=True, batch_size=len(masks))
        self.log(f"{stage}/miou_box", m_box.mean(), on_epoch=True, batch_size=len(masks))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup_epochs = min(hp.warmup_steps, total - 1) * epochs / total  # adamw_warmup_cosine counts epochs
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, warmup_epochs, (0.9, 0.999))


def _mae_encoder_state(path: str) -> dict[str, Tensor]:
    """The encoder weights in a ``LitMAE`` checkpoint (``model.encoder.*``) or a saved encoder state dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    prefix = "model.encoder."
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


# -- evaluation and results -------------------------------------------------------------------------


@torch.no_grad()
def evaluate_prompts(
    model: SAM, features: tuple[Tensor, Tensor], masks: Tensor, image_index: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """IoUs of every instance from fixed prompts: one positive point at :func:`interior_points` (three
    masks; ``"pred"``: the one with the highest predicted IoU, ``"oracle"``: the best by true IoU) and
    the tight box (one mask).

    Returns:
        ``({"pred": (M,), "oracle": (M,)}, box (M,))``.
    """
    pts = interior_points(masks)[:, None]  # (M, 1, 2)
    labels = torch.ones(len(masks), 1, dtype=torch.long, device=masks.device)
    logits, iou_pred = model.decode(features, image_index, points=pts, labels=labels, multimask_output=True)
    true_iou = mask_iou_targets(logits, masks)  # (M, 3)
    chosen = true_iou.gather(1, iou_pred.argmax(1, keepdim=True))[:, 0]
    box_logits, _ = model.decode(features, image_index, boxes=mask_boxes(masks), multimask_output=False)
    return {"pred": chosen, "oracle": true_iou.max(1).values}, mask_iou_targets(box_logits, masks)[:, 0]


def box_baseline(masks: Tensor) -> Tensor:
    """The trivial answer to a box prompt: the box itself as the mask; ``(M,)`` IoUs."""
    boxes = mask_boxes(masks)
    M, H, W = masks.shape
    ys, xs = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    pred = (xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None])
    pred = pred & (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None])
    return mask_iou_targets(pred.float()[:, None] * 2 - 1, masks)[:, 0]


def point_baseline(masks: Tensor, side: int) -> Tensor:
    """The trivial answer to a point prompt: a ``side x side`` square centred on the point (clipped to the
    image); ``(M,)`` IoUs."""
    pts = interior_points(masks)
    M, H, W = masks.shape
    ys, xs = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    x0 = pts[:, 0, None, None] - (side - 1) // 2
    y0 = pts[:, 1, None, None] - (side - 1) // 2
    pred = (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
    return mask_iou_targets(pred.float()[:, None] * 2 - 1, masks)[:, 0]


def _shapes_arrays(num: int, image_size: int, seed: int) -> tuple[Tensor, Tensor]:
    from minivfm.data import Shapes

    batch = Shapes(num, image_size=image_size, seed=seed).get_batch(range(num))
    return batch["image"], batch["mask"].to(torch.uint8)


def _loader(images: Tensor, masks: Tensor, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
    data = torch.utils.data.StackDataset(image=images, mask=masks)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle)


def pretrain_mae(profile: str, images: Tensor | None = None, seed: int = 0):
    """An MAE pretrained with ``MAEConfig.preset(profile)`` on Shapes scenes (seed ``seed``); returns the ``MAE``."""
    from minivfm.models.mae import LitMAE

    cfg = MAEConfig.preset(profile)
    L.seed_everything(seed, verbose=False)
    if images is None:
        images, _ = _shapes_arrays(cfg.num_train, cfg.image_size, seed)
    data = torch.utils.data.StackDataset(image=images)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    lit = LitMAE.from_config(cfg)
    results_trainer(cfg.max_epochs, profile).fit(lit, loader)
    return lit.model.eval()


def train_sam(
    cfg: SAMConfig, profile: str, images: Tensor, masks: Tensor, encoder_state: dict | None = None, seed: int = 0,
    lit_class: type[LitSAM] = None, **trainer_kwargs,
) -> LitSAM:  # fmt: skip
    """Train a SAM with ``lightning.Trainer`` for ``cfg.max_steps``, from ``encoder_state`` (an MAE's) or scratch."""
    lit_class = lit_class or LitSAM
    L.seed_everything(seed, verbose=False)
    lit = lit_class.from_config(cfg)
    if encoder_state is not None:
        lit.model.load_mae_encoder(encoder_state)
    loader = _loader(images, masks, cfg.batch_size, shuffle=True)
    trainer = results_trainer(-1, profile, max_steps=cfg.max_steps, **trainer_kwargs)
    trainer.fit(lit, loader)
    return lit.eval()


@torch.no_grad()
def evaluate(model: SAM, images: Tensor, masks: Tensor, batch_size: int = 250) -> dict[str, float]:
    """``miou_point``, ``miou_point_oracle`` and ``miou_box`` over every instance of ``images`` (Shapes' id maps)."""
    model.eval()
    device = next(model.parameters()).device
    point, oracle, box = [], [], []
    for x, m in zip(images.split(batch_size), masks.split(batch_size)):
        inst, idx = instance_masks(m.long().to(device))
        p, b = evaluate_prompts(model, model.encode(x.to(device)), inst, idx)
        point.append(p["pred"].cpu())
        oracle.append(p["oracle"].cpu())
        box.append(b.cpu())
    return {
        "miou_point": torch.cat(point).mean().item(), "miou_point_oracle": torch.cat(oracle).mean().item(),
        "miou_box": torch.cat(box).mean().item(),
    }  # fmt: skip


def baselines(train_masks: Tensor, test_masks: Tensor) -> dict[str, float]:
    """The trivial baselines on the test instances: the box as the mask (``miou_box``) and a square of
    the median training instance's side (sqrt of its area), centred on the point (``miou_point``)."""
    train_inst, _ = instance_masks(train_masks[:2000].long())
    side = max(1, round(train_inst.flatten(1).sum(1).float().median().sqrt().item()))
    inst, _ = instance_masks(test_masks.long())
    point = point_baseline(inst, side).mean().item()
    return {"miou_point": point, "miou_point_oracle": point, "miou_box": box_baseline(inst).mean().item(),
            "square_side": side}  # fmt: skip


def results(profile: str) -> dict:
    """Pretrain an MAE with ``MAEConfig.preset(profile)`` on Shapes scenes (seed 0), train SAM from its
    encoder and, at the same steps, from scratch (the same scenes with their instance masks), then score
    every instance of ``num_test`` held-out scenes (seed 2):

    - ``miou_point``: one positive point at :func:`interior_points`, the mask of the three with the
      highest predicted IoU; ``miou_point_oracle``: the best of the three by true IoU;
    - ``miou_box``: the tight box, one output;
    - ``miou_point_scratch`` (and ``miou_box_scratch``): SAM trained from a random encoder;
    - ``baselines``: the box as the mask (``miou_box``); a square of the median instance's side centred on
      the point (``miou_point``, ``miou_point_oracle``); scratch for ``miou_point_scratch``'s row;
    - ``seconds``: all of it (``seconds_mae``: the MAE's pretraining).
    """
    cfg = SAMConfig.preset(profile)
    start = time.perf_counter()
    images, masks = _shapes_arrays(cfg.num_train, cfg.image_size, seed=0)
    mae = pretrain_mae(profile, images)
    seconds_mae = time.perf_counter() - start
    test_images, test_masks = _shapes_arrays(cfg.num_test, cfg.image_size, seed=2)
    lit = train_sam(cfg, profile, images, masks, mae.encoder_state_dict())
    ours = evaluate(lit.model, test_images, test_masks)
    scratch = evaluate(train_sam(cfg, profile, images, masks, None).model, test_images, test_masks)
    base = baselines(masks, test_masks)
    return {
        **ours, "miou_point_scratch": scratch["miou_point"], "miou_box_scratch": scratch["miou_box"],
        "seconds_mae": seconds_mae, "seconds": time.perf_counter() - start,
        "baselines": {
            "miou_point": base["miou_point"], "miou_point_oracle": base["miou_point_oracle"],
            "miou_box": base["miou_box"],
        },
    }  # fmt: skip
