"""Checks for lesson 04 (ViT): patchify, attention, the transformer block, the ViT forward.

Each check runs the student's code on fixed, seeded inputs, compares it with
:mod:`minivfm.models.vit` / :mod:`minivfm.nn`, prints one deterministic line when
it matches, and raises ``AssertionError`` with a hint when it does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivfm.course.checks import assert_close, assert_tensor, call, check_close, fmt_shape, passed
from minivfm.models.vit import ViT
from minivfm.models.vit import patchify as ref_patchify
from minivfm.nn import Block

__all__ = ["check_patchify", "check_attention", "check_block", "check_vit_forward"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _differs(a: Tensor, b: Tensor, atol: float = 1e-5) -> bool:
    return a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=1e-4)


def check_patchify(patchify: Callable[[Tensor, int], Tensor]) -> None:
    """``patchify(images (B, C, H, W), patch_size) -> (B, N, P*P*C)``, MAE's layout."""
    images = torch.randn(8, 3, 32, 32, generator=_generator(0))
    expected = ref_patchify(images, 4)  # (8, 64, 48)
    actual = assert_tensor("patchify", call("patchify", patchify, images.clone(), 4), expected.shape)
    if _differs(actual, expected):
        hint = "each patch must be flattened as (row, column, channel): reshape to (B, C, H/P, P, W/P, P), "
        hint += "permute to (B, H/P, W/P, P, P, C), then reshape to (B, N, P*P*C)"
        if torch.allclose(actual.sort(-1).values, expected.sort(-1).values, atol=1e-6):
            hint = "each patch has the right pixels in the wrong order; " + hint
        elif torch.allclose(actual.sort(1).values.sum(-1), expected.sort(1).values.sum(-1), atol=1e-4):
            hint = "the patches are in the wrong order (row-major: top-left, then along the top row); " + hint
        assert_close("patchify", actual, expected, hint=hint)
    # a second, non-square case so that H and W cannot be swapped by accident
    images = torch.randn(2, 1, 8, 12, generator=_generator(1))
    actual = assert_tensor("patchify", call("patchify", patchify, images.clone(), 2), (2, 24, 4))
    assert_close("patchify (8x12 image, 1 channel)", actual, ref_patchify(images, 2), hint="H and W swapped?")
    passed("patchify", f"shape {fmt_shape(expected.shape)}, values match")


def _ref_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, N, N)
    return weights @ v, weights


def check_attention(attention: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
    """``attention(q, k, v) -> (out (B, H, N, Dh), weights (B, H, N, N))``."""
    g = _generator(2)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g) for _ in range(3))
    result = call("attention", attention, q.clone(), k.clone(), v.clone())
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError("attention: return a tuple (out, weights)")
    out, weights = result
    exp_out, exp_w = _ref_attention(q, k, v)
    assert_tensor("attention weights", weights, exp_w.shape)
    if not torch.allclose(weights.detach().sum(-1), torch.ones(2, 3, 17), atol=1e-4):
        raise AssertionError("attention weights: each row must sum to 1; take the softmax over the last dim (keys)")
    hint = "scale the scores q @ k^T by 1 / sqrt(head_dim) before the softmax"
    if _differs(weights.detach(), exp_w) and not _differs(weights.detach(), torch.softmax(q @ k.transpose(-2, -1), -1)):
        hint = "you forgot the scale: " + hint
    assert_close("attention weights", weights, exp_w, hint=hint)
    assert_close("attention output", out, exp_out, hint="the output is weights @ v")
    # and it agrees with PyTorch's fused kernel
    torch.testing.assert_close(exp_out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-4)
    passed("attention", f"output {fmt_shape(exp_out.shape)}, weights {fmt_shape(exp_w.shape)}, values match")


def check_block(block_cls: Callable[..., nn.Module]) -> None:
    """``block_cls(dim, num_heads)`` with timm's names, forward = pre-norm residual attention then MLP."""
    dim, heads = 32, 4
    torch.manual_seed(3)
    reference = Block(dim, heads).eval()
    with torch.no_grad():  # non-trivial norms so that a missing norm shows
        for name, p in reference.named_parameters():
            if name.startswith("norm"):
                p.add_(0.3 * torch.randn(p.shape, generator=_generator(4)))
    block = call("block", block_cls, dim, heads)
    if not isinstance(block, nn.Module):
        raise AssertionError(f"block: expected an nn.Module, got {type(block).__name__}")
    try:
        block.load_state_dict(reference.state_dict(), strict=True)
    except RuntimeError as err:
        raise AssertionError(
            "block: keep the submodules given in __init__ (norm1, attn, norm2, mlp); " + str(err).splitlines()[0]
        ) from err
    block.eval()
    x = torch.randn(4, 17, dim, generator=_generator(5))
    with torch.no_grad():
        expected = reference(x)
        actual = call("block", block, x.clone())
        r = reference
        post = r.norm2((h := r.norm1(x + r.attn(x))) + r.mlp(h))
    hint = "pre-norm: x = x + attn(norm1(x)), then x = x + mlp(norm2(x))"
    if isinstance(actual, Tensor) and actual.shape == expected.shape and not _differs(actual, post):
        hint = "that is the post-norm block of the original Transformer; ViT normalises before each branch: " + hint
    check_close("block", actual, expected, hint=hint)


def check_vit_forward(vit_forward: Callable[[ViT, Tensor], Tensor]) -> None:
    """``vit_forward(model, images) -> logits (B, K)`` equals ``model(images)``."""
    torch.manual_seed(6)
    model = ViT(image_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    with torch.no_grad():  # a non-trivial final norm, so that skipping it shows
        model.norm.weight.add_(0.3 * torch.randn(32, generator=_generator(7)))
    images = torch.randn(4, 3, 16, 16, generator=_generator(8))
    with torch.no_grad():
        expected = model(images)
        actual = call("vit_forward", vit_forward, model, images.clone())
    hint = (
        "patch_embed -> prepend cls_token (expanded to the batch) -> add pos_embed -> blocks -> norm "
        "-> head on the class token x[:, 0]"
    )
    if isinstance(actual, Tensor) and actual.shape == (4, 17, 10):
        hint = "apply the head to the class token only (x[:, 0]); " + hint
    check_close("vit_forward", actual, expected, hint=hint)
