"""Tests for minivfm.models.vit: functions, the model, timm parity, the LightningModule."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from minivfm.models.vit import (
    ViT,
    ViTClassifier,
    ViTConfig,
    patchify,
    random_shift,
    unpatchify,
    warmup_cosine,
)
from minivfm.nn import ConvStem


def tiny_vit(**kw) -> ViT:
    args = dict(image_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    return ViT(**{**args, **kw})


# -- patchify ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 4), ((1, 1, 8, 8), 2), ((3, 2, 12, 20), 4)])
def test_patchify_round_trip(shape, p) -> None:
    x = torch.randn(*shape)
    B, C, H, W = shape
    patches = patchify(x, p)
    assert patches.shape == (B, (H // p) * (W // p), p * p * C)
    torch.testing.assert_close(unpatchify(patches, p, (H, W)), x, atol=0, rtol=0)


def test_patchify_layout() -> None:
    x = torch.randn(2, 3, 16, 16)
    patches = patchify(x, 4)  # (2, 16, 48)
    # patch 5 = row 1, column 1, flattened as (row, column, channel)
    torch.testing.assert_close(patches[:, 5], x[:, :, 4:8, 4:8].permute(0, 2, 3, 1).reshape(2, -1))


def test_patchify_is_what_patch_embed_projects() -> None:
    torch.manual_seed(0)
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    w = vit.patch_embed.proj.weight  # (D, C, P, P)
    ref = patchify(x, 4) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + vit.patch_embed.proj.bias
    torch.testing.assert_close(vit.patch_embed(x), ref, atol=1e-5, rtol=1e-5)


def test_patchify_errors() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        patchify(torch.randn(1, 3, 10, 10), 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patchify(torch.randn(3, 8, 8), 4)
    with pytest.raises(ValueError, match="square"):
        unpatchify(torch.randn(1, 6, 48), 4)


def test_random_shift() -> None:
    x = torch.randn(4, 3, 8, 8)
    assert random_shift(x, 0) is x
    g = torch.Generator().manual_seed(0)
    y = random_shift(x, 2, generator=g)
    assert y.shape == x.shape
    # each output image is a translated copy: its centre 4x4 block appears in the padded input
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="replicate")
    for i in range(4):
        found = any(torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], y[i]) for dy in range(5) for dx in range(5))
        assert found


# -- the model --------------------------------------------------------------------------------------


def test_vit_shapes_and_names() -> None:
    vit = tiny_vit()
    x = torch.randn(3, 3, 16, 16)
    assert vit(x).shape == (3, 5)
    tokens = vit.forward_features(x)
    assert tokens.shape == (3, 17, 32)
    assert vit.forward_head(tokens, pre_logits=True).shape == (3, 32)
    assert vit.pos_embed.shape == (1, 17, 32) and vit.cls_token.shape == (1, 1, 32)
    names = set(vit.state_dict())
    for key in [
        "patch_embed.proj.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.0.mlp.fc2.bias",
        "norm.weight",
        "head.bias",
    ]:
        assert key in names
    assert tiny_vit(num_classes=0)(x).shape == (3, 32)


def test_vit_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    vit = tiny_vit()
    vit(torch.randn(2, 3, 16, 16)).logsumexp(-1).sum().backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_conv_stem_vit_learns_and_gets_gradients() -> None:
    torch.manual_seed(0)
    vit = ViT(image_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2, stem="conv")
    assert isinstance(vit.patch_embed, ConvStem) and vit.pos_embed.shape == (1, 17, 32)
    vit(torch.randn(2, 3, 16, 16)).logsumexp(-1).sum().backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="stem must be one of"):
        ViT(image_size=16, patch_size=4, stem="hmlp")


def test_vit_determinism() -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        vit = tiny_vit()
        outs.append(vit(torch.randn(2, 3, 16, 16)))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_attention_maps() -> None:
    torch.manual_seed(0)
    vit = tiny_vit(depth=3).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens, attns = vit.forward_features(x, return_attention=True)
    assert len(attns) == 3
    torch.testing.assert_close(tokens, vit.forward_features(x), atol=1e-5, rtol=1e-5)
    maps = vit.attention_maps(x)
    assert maps.shape == (2, 2, 17, 17)
    torch.testing.assert_close(maps, attns[-1])
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 17), atol=1e-5, rtol=0)
    assert len(vit.attention_maps(x, layer=None)) == 3


def test_bad_input_errors() -> None:
    vit = tiny_vit()
    with pytest.raises(ValueError, match="in_chans=3"):
        vit(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="image_size=16x16"):
        vit(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"images must be a \(B, C, H, W\)"):
        vit(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tiny_vit(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_vit(patch_size=5)


def test_dynamic_img_size_resamples_positions_as_timm_does() -> None:
    """DINO's local crops: a ViT built for 16x16 takes 8x8 and 24x24 inputs with its positions
    resampled bicubically (timm's resample_abs_pos_embed, antialias off, as DINO's code)."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    vit = tiny_vit(dynamic_img_size=True).eval()  # a 4x4 grid
    assert vit.interpolate_pos_encoding(16, 16) is vit.pos_embed
    for size, grid in ((8, 2), (24, 6), (12, 3)):
        pos = vit.interpolate_pos_encoding(size, size)
        ref = resample_abs_pos_embed(vit.pos_embed, [grid, grid], [4, 4], num_prefix_tokens=1, antialias=False)
        torch.testing.assert_close(pos, ref, atol=1e-6, rtol=1e-6)
        assert vit.forward_features(torch.randn(2, 3, size, size)).shape == (2, 1 + grid * grid, 32)
    torch.testing.assert_close(vit.interpolate_pos_encoding(8, 16)[:, :1], vit.pos_embed[:, :1])  # class token kept
    with torch.no_grad():  # a constant grid stays constant
        vit.pos_embed[:, 1:] = 0.5
    torch.testing.assert_close(vit.interpolate_pos_encoding(8, 8)[:, 1:], torch.full((1, 4, 32), 0.5))
    vit.train()
    vit(torch.randn(2, 3, 8, 8)).sum().backward()
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad[:, 1:].abs().sum() > 0
    for stem in ("patch", "conv"):  # only with dynamic_img_size; the sides must still be multiples of P
        with pytest.raises(ValueError, match="image_size=16x16"):
            tiny_vit(stem=stem)(torch.randn(1, 3, 8, 8))
        with pytest.raises(ValueError, match="divisible by patch_size=4"):
            tiny_vit(stem=stem, dynamic_img_size=True)(torch.randn(1, 3, 10, 10))
        assert tiny_vit(stem=stem, dynamic_img_size=True)(torch.randn(1, 3, 8, 8)).shape == (1, 5)


# -- timm parity ------------------------------------------------------------------------------------

timm_vit = pytest.importorskip("timm.models.vision_transformer")

GRID = [
    # img, patch, in_chans, dim, depth, heads, qkv_bias, classes, mlp_ratio
    (32, 4, 3, 48, 2, 3, True, 10, 4.0),
    (32, 8, 3, 64, 1, 4, False, 10, 4.0),
    (16, 2, 1, 32, 3, 1, True, 0, 4.0),
    (28, 7, 1, 24, 2, 2, True, 7, 2.0),
    ((24, 16), 8, 4, 16, 1, 2, False, 3, 3.0),
    (64, 16, 3, 96, 2, 6, True, 100, 4.0),
]


@pytest.mark.parametrize("img,patch,chans,dim,depth,heads,qkv_bias,classes,mlp_ratio", GRID)
def test_from_timm_matches(img, patch, chans, dim, depth, heads, qkv_bias, classes, mlp_ratio) -> None:
    torch.manual_seed(0)
    ref = timm_vit.VisionTransformer(
        img_size=img, patch_size=patch, in_chans=chans, num_classes=classes, embed_dim=dim, depth=depth,
        num_heads=heads, qkv_bias=qkv_bias, mlp_ratio=mlp_ratio,
    ).eval()  # fmt: skip
    # timm zero-initialises the head and biases; randomise everything so the test can fail
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = ViT.from_timm(ref).eval()
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn(3, chans, h, w)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.forward_head(ours.forward_features(x), pre_logits=True),
            ref.forward_head(ref.forward_features(x), pre_logits=True),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        # read: what cannot be read, or shows in no parameter and in no output at the native size
        (dict(dynamic_img_size=True), "dynamic_img_size"),
        (dict(dynamic_img_pad=True), "dynamic_img_pad"),
        (dict(patch_size=(4, 2)), "non-square patches"),
        # the strict state dict: parameters ViT lacks, has, or shapes otherwise
        (dict(class_token=False, global_pool="avg"), "no class token"),
        (dict(global_pool="avg"), "global_pool='avg'"),
        (dict(reg_tokens=4), "register tokens"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(init_values=1e-5), "layer scale"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(global_pool="token", fc_norm=True), "fc_norm"),
        (dict(final_norm=False), "final_norm=False"),
        (dict(no_embed_class=True), "no_embed_class"),
        (dict(pos_embed="none"), "positional embedding"),
        (dict(proj_bias=False), "bias"),
        (dict(scale_mlp_norm=True), "scale_mlp_norm"),
        (dict(global_pool="map"), "global_pool='map'"),
        # eps and the activation, checked by name: the outputs alone can miss them
        (dict(act_layer="gelu_tanh"), "GELU"),
        (dict(act_layer="relu"), "GELU"),
        (dict(norm_layer=torch.nn.LayerNorm), "eps=1e-05"),
        # the output comparison
        (dict(global_pool="avg", fc_norm=False), "outputs differ by"),
        (dict(global_pool=""), "outputs differ in shape"),
        (dict(block_fn=timm_vit.ResPostBlock), "outputs differ by"),
    ],
)
def test_from_timm_refuses(kwargs, match) -> None:
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    ref = timm_vit.VisionTransformer(**{**args, **kwargs})
    with pytest.raises(ValueError, match="cannot represent") as err:
        ViT.from_timm(ref)
    assert match in str(err.value)


def test_from_timm_refuses_non_vit() -> None:
    with pytest.raises(TypeError, match="VisionTransformer"):
        ViT.from_timm(torch.nn.Linear(2, 2))


def test_from_timm_keeps_rng_and_modes() -> None:
    """Training-time options (timm's GELU class, dropout, patch dropout) load; the comparison draws
    from its own generator and leaves the timm model in train mode."""
    torch.manual_seed(0)
    ref = timm_vit.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, act_layer="gelu", patch_drop_rate=0.5,
        drop_rate=0.1,
    ).train()  # fmt: skip
    state = torch.get_rng_state()
    ours = ViT.from_timm(ref)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(mod.training for mod in ref.modules()) and ours.training
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)


# -- config and LightningModule ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ci", "cpu", "gpu"])
@pytest.mark.parametrize("data", ["shapes", "digits"])
def test_presets(name, data) -> None:
    cfg = ViTConfig.preset(name, data)
    assert cfg.data == data
    assert cfg.embed_dim % cfg.num_heads == 0 and cfg.image_size % cfg.patch_size == 0
    assert cfg.max_epochs > 0 and cfg.lr > 0 and cfg.warmup_epochs < cfg.max_epochs


def test_preset_bad_data() -> None:
    with pytest.raises(ValueError, match="data must be"):
        ViTConfig.preset("ci", "cifar")


@pytest.mark.parametrize("name", ["ci", "cpu", "gpu"])
def test_classifier_fills_from_preset(name) -> None:
    cfg = ViTConfig.preset(name)
    model = ViTClassifier(profile=name)
    assert model.hparams.embed_dim == cfg.embed_dim and model.hparams.lr == cfg.lr


def test_preset_sizes_grow() -> None:
    sizes = [ViTConfig.preset(p).embed_dim * ViTConfig.preset(p).depth for p in ("ci", "cpu", "gpu")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[2]
    with pytest.raises(ValueError, match="profile"):
        ViTConfig.preset("laptop")


def test_warmup_cosine() -> None:
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)


class Quadrants(torch.utils.data.Dataset):
    """Label = which quadrant is brighter, in a colour that also depends on it; learnable in a few steps."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 0.5 - 1
        for i, y in enumerate(self.labels.tolist()):
            r, c = divmod(y, 2)
            self.images[i, y % 3, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 1.5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def _loader(n: int, seed: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(Quadrants(n, seed), batch_size=32, shuffle=shuffle)


def _classifier(**kw) -> ViTClassifier:
    args = dict(image_size=16, patch_size=4, in_chans=3, num_classes=4, embed_dim=32, depth=2, num_heads=2)
    return ViTClassifier(**{**args, "lr": 3e-3, "warmup_epochs": 0.2, **kw})


def _trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**args, **kw})


def _mean_loss(model: ViTClassifier, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(b["image"]), b["label"]) for b in loader]
    return float(torch.stack(losses).mean())


def test_fast_dev_run(tmp_path) -> None:
    model = _classifier()
    _trainer(tmp_path, fast_dev_run=2).fit(model, _loader(128, shuffle=True), _loader(64, seed=1))


def test_few_steps_lower_the_loss_and_log_accuracy(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    model = _classifier()
    val = _loader(128, seed=1)
    before = _mean_loss(model, val)
    model.train()
    trainer = _trainer(tmp_path, max_epochs=3, enable_checkpointing=False)
    trainer.fit(model, _loader(512, shuffle=True), val)
    after = _mean_loss(model, val)
    assert after < 0.8 * before, (before, after)
    for key in ("train/acc", "val/acc", "train/loss_epoch", "val/loss"):
        assert key in trainer.callback_metrics, key
    metrics = trainer.test(model, _loader(128, seed=2), verbose=False)[0]
    assert set(metrics) == {"test/acc", "test/loss"}


def test_checkpoint_loads_with_weights_only(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    model = _classifier(embed_dim=16)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    trainer.fit(model, _loader(64))
    path = tmp_path / "vit.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["embed_dim"] == 16
    fresh = ViTClassifier(**ckpt["hyper_parameters"])
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), atol=0, rtol=0)
    reloaded = ViTClassifier.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(reloaded.eval()(x), model.eval()(x), atol=0, rtol=0)


@pytest.mark.slow
def test_results_ci_learns() -> None:
    from minivfm.models.vit import results

    out = results("ci")
    # chance is 1/12 on Shapes and 1/10 on Digits
    assert out["shapes_acc"] > 0.2 and out["digits_acc"] > 0.5, out
    assert out["seconds"] > 0


def test_hparams_are_the_filled_in_values() -> None:
    """LightningCLI records the arguments as given (None); hparams must hold the preset's values."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    cfg = ViTConfig.preset("ci")
    given = dict(image_size=32, in_chans=3, num_classes=12, lr=None, max_epochs=None, profile="ci")
    with _given_hyperparameters_context(hparams=given, instantiator="lightning.pytorch.cli.instantiate_module"):
        model = ViTClassifier(**given)
    assert model.hparams["lr"] == cfg.lr and model.hparams["max_epochs"] == cfg.max_epochs
    assert model.hparams["embed_dim"] == cfg.embed_dim and model.hparams["num_classes"] == 12
    assert model.hparams_initial["lr"] == cfg.lr  # what the logger writes to hparams.yaml
    assert ViTClassifier(profile="ci", max_epochs=3).hparams["max_epochs"] == 3
