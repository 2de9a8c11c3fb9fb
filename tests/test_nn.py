"""Tests for the shared blocks in minivfm.nn."""

from __future__ import annotations

import math

import pytest
import torch

from minivfm.nn import (
    Attention,
    Block,
    ConvStem,
    CrossAttention,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    sincos_embed_1d,
    sincos_pos_embed_2d,
    timestep_embedding,
)


def _grads_everywhere(module: torch.nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_attention_shapes_and_sdpa_equals_manual(num_heads: int) -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=num_heads).eval()
    x = torch.randn(3, 7, 32)
    fast = attn(x)
    slow, weights = attn(x, return_attention=True)
    assert fast.shape == (3, 7, 32)
    assert weights.shape == (3, num_heads, 7, 7)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, num_heads, 7), atol=1e-5, rtol=0)
    assert (weights >= 0).all()


def test_attention_matches_formula() -> None:
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2).eval()
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_causal_attention_sees_only_the_past() -> None:
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2).eval()
    x = torch.randn(2, 5, 8)
    fast = attn(x, is_causal=True)
    slow, weights = attn(x, return_attention=True, is_causal=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert (weights.triu(1) == 0).all()
    # token i equals attention over the prefix 0..i alone
    for i in range(5):
        torch.testing.assert_close(fast[:, i], attn(x[:, : i + 1])[:, i], atol=1e-5, rtol=1e-5)
    # changing a later token leaves earlier outputs unchanged
    y = x.clone()
    y[:, 3:] = torch.randn(2, 2, 8)
    torch.testing.assert_close(attn(y, is_causal=True)[:, :3], fast[:, :3])
    block = Block(8, num_heads=2).eval()
    torch.testing.assert_close(block(y, is_causal=True)[:, :3], block(x, is_causal=True)[:, :3])


def test_attention_bad_heads() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(30, num_heads=4)


def test_attention_no_qkv_bias() -> None:
    attn = Attention(16, num_heads=2, qkv_bias=False)
    assert attn.qkv.bias is None


def test_mlp_shapes_and_names() -> None:
    mlp = Mlp(16, hidden_features=64, out_features=8)
    assert mlp(torch.randn(2, 5, 16)).shape == (2, 5, 8)
    assert {n.split(".")[0] for n, _ in mlp.named_parameters()} == {"fc1", "fc2"}
    assert isinstance(mlp.act, torch.nn.GELU)


def test_block_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    block = Block(32, num_heads=4)
    x = torch.randn(2, 9, 32, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    _grads_everywhere(block, out.pow(2).mean())
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_block_timm_names() -> None:
    names = {n for n, _ in Block(16, 2).named_parameters()}
    expected = {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias",
    }  # fmt: skip
    assert names == expected
    assert Block(16, 2).norm1.eps == 1e-6


def test_block_return_attention() -> None:
    torch.manual_seed(0)
    block = Block(16, num_heads=2).eval()
    x = torch.randn(2, 5, 16)
    out, attn = block(x, return_attention=True)
    torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)
    assert attn.shape == (2, 2, 5, 5)


def test_adaln_zero_block_is_identity_at_init() -> None:
    torch.manual_seed(0)
    block = Block(16, num_heads=2, cond_dim=8)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 8)
    torch.testing.assert_close(block(x, c), x, atol=0, rtol=0)
    # ...and not the identity once the modulation has learned something, with gradients everywhere
    torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    out = block(x, c)
    assert not torch.allclose(out, x)
    _grads_everywhere(block, out.pow(2).mean())


def test_adaln_block_cond_errors() -> None:
    block = Block(16, num_heads=2, cond_dim=8)
    with pytest.raises(ValueError, match="cond must have shape"):
        block(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="cond must have shape"):
        block(torch.randn(2, 5, 16), torch.randn(2, 7))
    with pytest.raises(ValueError, match="without cond_dim"):
        Block(16, 2)(torch.randn(2, 5, 16), torch.randn(2, 8))


def test_patch_embed_shapes_and_order() -> None:
    pe = PatchEmbed(image_size=32, patch_size=4, in_chans=3, embed_dim=24)
    assert pe.grid_size == (8, 8) and pe.num_patches == 64
    x = torch.randn(2, 3, 32, 32)
    out = pe(x)
    assert out.shape == (2, 64, 24)
    # token 9 is the patch at row 1, column 1
    patch = x[:, :, 4:8, 4:8]
    ref = (patch.flatten(1) @ pe.proj.weight.flatten(1).T) + pe.proj.bias
    torch.testing.assert_close(out[:, 9], ref, atol=1e-5, rtol=1e-5)


def test_patch_embed_errors() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        PatchEmbed(image_size=30, patch_size=4)
    pe = PatchEmbed(image_size=32, patch_size=4, in_chans=3, embed_dim=8)
    with pytest.raises(ValueError, match="in_chans=3"):
        pe(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="image_size=32x32"):
        pe(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pe(torch.randn(3, 32, 32))


def test_conv_stem_shapes_widths_and_errors() -> None:
    stem = ConvStem(image_size=32, patch_size=8, in_chans=3, embed_dim=64)
    assert stem.grid_size == (4, 4) and stem.num_patches == 16
    convs = [m for m in stem.proj if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64]  # three 3x3 stride-2 convs, then 1x1
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)]
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ConvStem(image_size=24, patch_size=6)
    with pytest.raises(ValueError, match="in_chans=3"):
        stem(torch.randn(2, 1, 32, 32))  # the same input checks as PatchEmbed


def test_conv_stem_sees_across_patches_and_patch_embed_does_not() -> None:
    """The conv stem's token for a patch changes when a neighbouring patch changes; the patch
    projection's does not (why MAE needs the patch stem: the conv stem would leak masked pixels)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[:, :, 8:16, 8:16] += 1.0  # patch (1, 1) of a 4x4 grid, token 5
    stems = (ConvStem(32, 8, 3, 16).eval(), PatchEmbed(32, 8, 3, 16))
    for stem in stems:
        with torch.no_grad():
            changed = (stem(x) - stem(y)).abs().amax(-1)[0] > 1e-6  # (N,)
        assert changed[5]
        assert bool(changed[[4, 6, 1, 9]].any()) == (not stem.patch_local), type(stem).__name__
        assert changed.sum() == 1 or not stem.patch_local


def test_sincos_pos_embed_2d_matches_mae() -> None:
    np = pytest.importorskip("numpy")

    # MAE's util/pos_embed.py, with np.float64 instead of the removed np.float
    def mae_1d(embed_dim, pos):
        omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    def mae_2d(embed_dim, grid_size, cls_token):
        grid_h = np.arange(grid_size, dtype=np.float32)
        grid_w = np.arange(grid_size, dtype=np.float32)
        grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
        emb = np.concatenate([mae_1d(embed_dim // 2, grid[0]), mae_1d(embed_dim // 2, grid[1])], axis=1)
        if cls_token:
            emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
        return emb

    for cls in (False, True):
        ours = sincos_pos_embed_2d(16, 5, cls_token=cls)
        ref = torch.from_numpy(mae_2d(16, 5, cls)).float()
        assert ours.shape == ((26 if cls else 25), 16)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, 4)


def test_sincos_embed_1d() -> None:
    emb = sincos_embed_1d(torch.arange(6), 8)
    assert emb.shape == (6, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    with pytest.raises(ValueError, match="even"):
        sincos_embed_1d(torch.arange(3), 7)


def test_timestep_embedding() -> None:
    t = torch.tensor([0, 10, 999])
    emb = timestep_embedding(t, 64)
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(32), torch.zeros(32)]))
    # the first frequency is 1: cos(t), sin(t)
    torch.testing.assert_close(emb[:, 0], torch.cos(t.float()))
    torch.testing.assert_close(emb[:, 32], torch.sin(t.float()))
    assert timestep_embedding(t, 7).shape == (3, 7)
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 2), 8)


def test_timestep_embedder_gradients() -> None:
    torch.manual_seed(0)
    emb = TimestepEmbedder(32, freq_dim=16)
    out = emb(torch.tensor([1.0, 50.0, 500.0]))
    assert out.shape == (3, 32)
    _grads_everywhere(emb, out.pow(2).mean())


def test_determinism() -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        block = Block(16, 2)
        x = torch.randn(2, 5, 16)
        outs.append(block(x))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


# -- CrossAttention (SAM's Attention) ----------------------------------------------------------------


@pytest.mark.parametrize("downsample_rate", [1, 2])
def test_cross_attention_matches_the_formula(downsample_rate: int) -> None:
    torch.manual_seed(0)
    D, H, kv = 16, 2, 12
    attn = CrossAttention(D, H, downsample_rate=downsample_rate, kv_dim=kv)
    Di = D // downsample_rate
    assert attn.q_proj.out_features == Di and attn.out_proj.in_features == Di
    q, k, v = torch.randn(3, 5, D), torch.randn(3, 7, kv), torch.randn(3, 7, kv)
    out, weights = attn(q, k, v, return_attention=True)
    assert out.shape == (3, 5, D) and weights.shape == (3, H, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, H, 5))
    # by hand: per head h, softmax(q_h k_h^T / sqrt(Dh)) v_h, heads concatenated, then out_proj
    Q, K, V = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    Dh = Di // H
    heads = []
    for h in range(H):
        sl = slice(h * Dh, (h + 1) * Dh)
        w = torch.softmax(Q[..., sl] @ K[..., sl].transpose(1, 2) / math.sqrt(Dh), dim=-1)
        heads.append(w @ V[..., sl])
    expected = attn.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(q, k, v), expected, atol=1e-5, rtol=1e-5)  # the fused kernel agrees
    _grads_everywhere(attn, out.pow(2).mean())


def test_cross_attention_values_are_not_keys() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(8, 2)
    q, k, v = torch.randn(1, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    # the same keys with different values: the weights are the same, the outputs differ
    _, w1 = attn(q, k, v, return_attention=True)
    _, w2 = attn(q, k, v + 1, return_attention=True)
    torch.testing.assert_close(w1, w2)
    assert not torch.allclose(attn(q, k, v), attn(q, k, v + 1))


def test_cross_attention_errors() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        CrossAttention(16, 3)
    with pytest.raises(ValueError, match="downsample_rate"):
        CrossAttention(16, 2, downsample_rate=3)
    attn = CrossAttention(8, 2)
    with pytest.raises(ValueError, match="q: expected"):
        attn(torch.randn(1, 3, 4), torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="k and v"):
        attn(torch.randn(1, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="v: expected"):
        attn(torch.randn(1, 3, 8), torch.randn(1, 4, 8), torch.randn(2, 4, 8))
