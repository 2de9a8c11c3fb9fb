"""Tests for minivfm.models.mae: masking, the masked loss, no leakage, composition with the ViT."""

from __future__ import annotations

import pytest
import torch

from minivfm.models.mae import MAE, LitMAE, MAEConfig, mae_loss, random_masking
from minivfm.models.vit import ViT, patchify

B, C, S, P = 2, 3, 16, 4  # batch, channels, image size, patch size: N = 16 patches
N = (S // P) ** 2


def tiny_encoder(**kw) -> ViT:
    args = dict(image_size=S, patch_size=P, in_chans=C, num_classes=0, embed_dim=16, depth=2, num_heads=2)
    return ViT(**{**args, **kw})


def tiny_mae(**kw) -> MAE:
    torch.manual_seed(0)
    return MAE(tiny_encoder(), decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, **kw)


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, S, S, generator=torch.Generator().manual_seed(seed))


# -- random_masking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_masking_keeps_the_right_tokens(ratio: float) -> None:
    x = torch.randn(3, 20, 5)
    visible, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(0))
    keep = int(20 * (1 - ratio))
    assert visible.shape == (3, keep, 5) and mask.shape == (3, 20) and ids_restore.shape == (3, 20)
    assert (mask.sum(1) == 20 - keep).all() and set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(3):
        kept = (mask[b] == 0).nonzero().flatten()
        # the visible tokens are exactly the unmasked ones, in shuffled order
        assert sorted(visible[b, :, 0].tolist()) == sorted(x[b, kept, 0].tolist())
        # ids_restore undoes the shuffle: the kept tokens sit at the first positions of the shuffle
        assert (ids_restore[b, kept] < keep).all() and (ids_restore[b, mask[b] == 1] >= keep).all()
        assert sorted(ids_restore[b].tolist()) == list(range(20))


def test_random_masking_ids_restore_inverts_the_shuffle() -> None:
    x = torch.arange(10.0).reshape(1, 10, 1).expand(4, 10, 1)
    visible, mask, ids_restore = random_masking(x, 0.0, torch.Generator().manual_seed(1))
    unshuffled = torch.gather(visible, 1, ids_restore[..., None])
    assert torch.equal(unshuffled, x) and not torch.equal(visible, x)


def test_random_masking_is_deterministic_with_a_generator() -> None:
    x = torch.randn(4, 16, 8)
    a = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    b = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    c = random_masking(x, 0.75, torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5"])
def test_random_masking_refuses_bad_ratios(ratio) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.randn(1, 4, 2), ratio)


def test_random_masking_refuses_a_ratio_that_keeps_nothing_and_wrong_ndim() -> None:
    with pytest.raises(ValueError, match="keeps none"):
        random_masking(torch.randn(1, 4, 2), 0.9)
    with pytest.raises(ValueError, match=r"x: expected tokens of shape \(B, N, D\)"):
        random_masking(torch.randn(4, 2), 0.5)


# -- mae_loss -----------------------------------------------------------------------------------------


def test_mae_loss_counts_masked_patches_only() -> None:
    target = torch.randn(B, N, P * P * C)
    pred = torch.randn(B, N, P * P * C)
    mask = torch.zeros(B, N)
    mask[:, ::2] = 1
    for norm_pix in (False, True):
        loss = mae_loss(pred, target, mask, norm_pix)
        changed = pred.clone()
        changed[:, 1::2] += 10.0  # the visible patches
        assert torch.equal(mae_loss(changed, target, mask, norm_pix), loss)
        changed[:, 0] += 10.0  # a masked patch
        assert mae_loss(changed, target, mask, norm_pix) > loss
    expected = (pred - target).pow(2).mean(-1)[:, ::2].mean()
    torch.testing.assert_close(mae_loss(pred, target, mask), expected)
    assert mae_loss(target, target, mask) == 0


def test_mae_loss_norm_pix_targets_are_normalised_per_patch() -> None:
    target = torch.randn(B, N, 12) * 5 + 3
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert mae_loss(normed, target, torch.ones(B, N), norm_pix=True) < 1e-10


def test_mae_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="pred and target_patches"):
        mae_loss(torch.randn(B, N, 4), torch.randn(B, N, 5), torch.ones(B, N))
    with pytest.raises(ValueError, match="mask"):
        mae_loss(torch.randn(B, N, 4), torch.randn(B, N, 4), torch.ones(B, N + 1))


# -- the model ----------------------------------------------------------------------------------------


def test_shapes() -> None:
    mae = tiny_mae()
    x = images()
    latent, mask, ids_restore = mae.forward_encoder(x, 0.75)
    keep = int(N * 0.25)
    assert latent.shape == (B, 1 + keep, 16) and mask.shape == (B, N) and ids_restore.shape == (B, N)
    pred = mae.forward_decoder(latent, ids_restore)
    assert pred.shape == (B, N, P * P * C)
    loss, pred, mask = mae(x)
    assert loss.ndim == 0 and pred.shape == (B, N, P * P * C) and (mask.sum(1) == N - keep).all()
    assert mae.reconstruct(x).shape == x.shape


def test_no_leakage_masked_pixels_do_not_reach_the_encoder() -> None:
    mae = tiny_mae().eval()
    x = images()
    latent, mask, _ = mae.forward_encoder(x, 0.75, torch.Generator().manual_seed(0))
    patches = patchify(x, P)
    changed = patches.clone()
    changed[mask.bool()] = torch.randn_like(changed[mask.bool()]) * 10  # every masked patch
    from minivfm.models.vit import unpatchify

    x2 = unpatchify(changed, P)
    latent2, mask2, _ = mae.forward_encoder(x2, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent2, latent)
    # and a visible patch does reach it
    changed[~mask.bool()] += 1.0
    latent3, _, _ = mae.forward_encoder(unpatchify(changed, P), 0.75, torch.Generator().manual_seed(0))
    assert not torch.allclose(latent3, latent)


def test_reconstruct_keeps_the_visible_patches() -> None:
    mae = tiny_mae().eval()
    x = images()
    rec = mae.reconstruct(x, generator=torch.Generator().manual_seed(0))
    _, pred, mask = mae(x, generator=torch.Generator().manual_seed(0))
    rec_p, x_p = patchify(rec, P), patchify(x, P)
    visible = ~mask.bool()
    torch.testing.assert_close(rec_p[visible], x_p[visible])
    torch.testing.assert_close(rec_p[mask.bool()], pred[mask.bool()])


def test_conv_stem_is_refused() -> None:
    with pytest.raises(ValueError, match="leaks the pixels of masked patches"):
        MAE(tiny_encoder(stem="conv"))


def test_bad_encoders_are_refused() -> None:
    with pytest.raises(ValueError, match="num_classes=0"):
        MAE(tiny_encoder(num_classes=10))
    with pytest.raises(ValueError, match="encoder: expected a minivfm ViT"):
        MAE(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(tiny_encoder(), mask_ratio=1.0)
    with pytest.raises(ValueError, match="images are"):
        tiny_mae()(torch.randn(B, C, S + 4, S + 4))


def test_gradients_reach_every_trainable_parameter() -> None:
    mae = tiny_mae(norm_pix_loss=True)
    loss, _, _ = mae(images())
    loss.backward()
    trainable = {n: p for n, p in mae.named_parameters() if p.requires_grad}
    assert "mask_token" in trainable and "encoder.cls_token" in trainable
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not mae.encoder.pos_embed.requires_grad  # MAE's fixed sin-cos positions


def test_encoder_loads_into_a_plain_vit_and_matches_on_all_tokens() -> None:
    mae = tiny_mae().eval()
    vit = tiny_encoder()
    vit.load_state_dict(mae.encoder_state_dict(), strict=True)
    vit.eval()
    x = images()
    # with nothing masked, forward_encoder is forward_features on shuffled tokens
    latent, mask, ids_restore = mae.forward_encoder(x, 0.0, torch.Generator().manual_seed(0))
    assert mask.sum() == 0
    unshuffled = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, latent.shape[-1]))
    full = vit.forward_features(x)
    torch.testing.assert_close(full[:, 1:], unshuffled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[:, 0], latent[:, 0], rtol=1e-5, atol=1e-5)


# -- Lightning ----------------------------------------------------------------------------------------


def test_lit_mae_fills_from_the_preset(monkeypatch) -> None:
    monkeypatch.setenv("MINIVFM_PROFILE", "ci")
    lit = LitMAE()
    cfg = MAEConfig.preset("ci")
    assert all(v is not None for v in lit.hparams.values()), dict(lit.hparams)
    assert "profile" not in lit.hparams and lit.hparams.max_epochs == cfg.max_epochs
    assert lit.hparams.patch_size == cfg.patch_size and lit.model.mask_ratio == cfg.mask_ratio
    lit2 = LitMAE.from_config(cfg, embed_dim=24)
    assert lit2.model.encoder.embed_dim == 24


def test_lit_mae_steps_and_configures_optimizers(tmp_path) -> None:
    import lightning as L

    cfg = MAEConfig.preset("ci")
    lit = LitMAE(profile="ci")
    x = torch.rand(16, 3, cfg.image_size, cfg.image_size) * 2 - 1
    data = torch.utils.data.StackDataset(image=x, label=torch.zeros(16, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    before = lit.model.mask_token.detach().clone()
    trainer.fit(lit, loader, loader)
    assert not torch.equal(before, lit.model.mask_token)
    assert {"train/loss_epoch", "val/loss"} <= set(trainer.logged_metrics)


def test_presets() -> None:
    for name in ("ci", "cpu", "gpu"):
        cfg = MAEConfig.preset(name)
        assert cfg.image_size % cfg.patch_size == 0 and 0 < cfg.mask_ratio < 1
    with pytest.raises(ValueError, match="profile"):
        MAEConfig.preset("tpu")


@pytest.mark.slow
def test_results_ci_reports_every_key_with_baselines() -> None:
    from minivfm.results import runner

    out = runner("mae")("ci")
    keys = {"recon_mse", "linear_probe_acc", "linear_probe_acc_random", "finetune_acc_100", "scratch_acc_100",
            "step_ratio", "seconds", "baselines"}  # fmt: skip
    assert keys <= set(out), out
    assert {"recon_mse", "linear_probe_acc", "finetune_acc_100", "step_ratio"} <= set(out["baselines"])
    assert out["baselines"]["linear_probe_acc"] == out["linear_probe_acc_random"]
    assert 0 < out["recon_mse"] and 0 <= out["linear_probe_acc"] <= 1  # ci trains 16 steps: no quality claim
    assert 0 < out["step_ratio"] and out["seconds"] > 0
