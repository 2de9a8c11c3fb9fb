"""DCGAN and conditional GAN: losses, modules, manual optimization, sample grids, checkpoints."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from minivfm.models.gan import (
    Discriminator,
    GANConfig,
    Generator,
    LitGAN,
    discriminator_loss,
    generator_loss,
    mean_pairwise_distance,
)

SMALL = dict(in_channels=3, image_size=16, latent_dim=8, g_channels=(16, 8), d_channels=(8, 16))


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, size: int = 16, num_classes: int = 3):
        self.x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": i % self.num_classes}


def _trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    args.update(kw)
    return L.Trainer(**args)


# ----------------------------------------------------------------------------- losses


def test_losses_at_logits_zero():
    torch.testing.assert_close(discriminator_loss(torch.zeros(5), torch.zeros(7)), torch.tensor(2 * math.log(2)))
    torch.testing.assert_close(generator_loss(torch.zeros(5)), torch.tensor(math.log(2)))


def test_losses_equal_binary_cross_entropy():
    real, fake = torch.randn(6) * 4, torch.randn(9) * 4
    bce = F.binary_cross_entropy_with_logits
    expected_d = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    torch.testing.assert_close(discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(generator_loss(fake), bce(fake, torch.ones_like(fake)))


def test_losses_are_stable_at_large_logits():
    d = discriminator_loss(torch.full((3,), 500.0), torch.full((3,), -500.0))
    assert torch.isfinite(d) and d.item() < 1e-6
    g = generator_loss(torch.full((3,), -500.0))
    assert torch.isfinite(g) and g.item() == pytest.approx(500.0)


def test_generator_loss_does_not_saturate():
    # D confidently rejects the fakes: the saturating loss log(1 - D) has almost no gradient,
    # the non-saturating -log D still has a gradient of about -1 per logit.
    logits = torch.full((4,), -8.0, requires_grad=True)
    generator_loss(logits).backward()
    assert (logits.grad * 4 < -0.99).all()
    sat = torch.full((4,), -8.0, requires_grad=True)
    torch.log1p(-torch.sigmoid(sat)).mean().backward()
    assert (sat.grad.abs() * 4 < 1e-3).all()


def test_mean_pairwise_distance():
    assert mean_pairwise_distance(torch.ones(5, 3, 4, 4)).item() == 0.0
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 2.0)
    assert mean_pairwise_distance(torch.cat([a, b])).item() == pytest.approx(2.0)
    x = torch.randn(6, 3, 4, 4)
    assert mean_pairwise_distance(x) > mean_pairwise_distance(x[:1].expand(6, -1, -1, -1) + 0.01 * x)


# ----------------------------------------------------------------------------- modules


def test_generator_and_discriminator_shapes():
    cfg = GANConfig.preset("ci")
    G = Generator(cfg.latent_dim, cfg.g_channels, 3, cfg.image_size)
    D = Discriminator(3, cfg.d_channels, cfg.image_size)
    x = G(torch.randn(5, cfg.latent_dim))
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (5,)


def test_conditional_generator_honours_labels():
    torch.manual_seed(0)
    G = Generator(8, (16, 8), 3, 16, num_classes=4).eval()
    D = Discriminator(3, (8, 16), 16, num_classes=4).eval()
    z = torch.randn(1, 8).expand(4, 8)
    labels = torch.arange(4)
    x = G(z, labels)
    assert x.shape == (4, 3, 16, 16)
    # same noise, different labels: different images; same label: the same image
    assert all(not torch.allclose(x[i], x[j]) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(G(z, torch.full((4,), 2)), x[2:3].expand(4, -1, -1, -1))
    # the projection discriminator's logit depends on the label
    logits = torch.stack([D(x[:1], torch.tensor([k])) for k in range(4)])
    assert logits.unique().numel() == 4


def test_gradients_reach_every_parameter():
    G = Generator(8, (16, 8), 3, 16, num_classes=3)
    D = Discriminator(3, (8, 16), 16, num_classes=3)
    labels = torch.tensor([0, 1, 2, 1])
    fake = G(torch.randn(4, 8), labels)
    d_loss = discriminator_loss(D(torch.rand(4, 3, 16, 16), labels), D(fake, labels))
    (d_loss + generator_loss(D(fake, labels))).backward()
    for net in (G, D):
        missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing


@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_presets_build(profile):
    cfg = GANConfig.preset(profile)
    assert cfg.betas == (0.5, 0.999)
    model = LitGAN.from_config(cfg)
    assert model.sample(2).shape == (2, 3, cfg.image_size, cfg.image_size)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: discriminator_loss(torch.zeros(2, dtype=torch.long), torch.zeros(2)), "real_logits"),
        (lambda: discriminator_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long)), "fake_logits"),
        (lambda: generator_loss(torch.zeros(2, dtype=torch.long)), "fake_logits"),
        (lambda: mean_pairwise_distance(torch.zeros(1, 3)), "images"),
        (lambda: Generator(8, (16, 8), 3, image_size=32), "image_size"),
        (lambda: Generator(0, (16, 8), 3, 16), "latent_dim"),
        (lambda: Generator(8, (16, 8), 3, 16, num_classes=-1), "num_classes"),
        (lambda: Generator(8, (16, 8), 3, 16)(torch.zeros(2, 7)), "z"),
        (lambda: Generator(8, (16, 8), 3, 16)(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)), "labels"),
        (lambda: Generator(8, (16, 8), 3, 16, num_classes=3)(torch.zeros(2, 8)), "labels"),
        (lambda: Generator(8, (16, 8), 3, 16, num_classes=3)(torch.zeros(2, 8), torch.tensor([0, 3])), "labels"),
        (lambda: Discriminator(3, (8, 16), 16)(torch.zeros(2, 1, 16, 16)), "x"),
        (lambda: Discriminator(3, (8, 16), 16, num_classes=3)(torch.zeros(2, 3, 16, 16), torch.zeros(3).long()),
         "labels"),
        (lambda: LitGAN(**SMALL, lr=0), "lr"),
        (lambda: LitGAN(**SMALL).sample(0), "num_samples"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


# ----------------------------------------------------------------------------- Lightning


@pytest.mark.parametrize("num_classes", [0, 3])
def test_manual_optimization_changes_both_networks(tmp_path, num_classes):
    L.seed_everything(0)
    model = LitGAN(**SMALL, num_classes=num_classes)
    assert model.automatic_optimization is False
    opt_g, opt_d = model.configure_optimizers()
    assert opt_g.param_groups[0]["betas"] == (0.5, 0.999) and opt_d.param_groups[0]["betas"] == (0.5, 0.999)
    g0 = {k: v.clone() for k, v in model.generator.state_dict().items()}
    d0 = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    loader = torch.utils.data.DataLoader(_Images(num_classes=max(num_classes, 1)), batch_size=8)
    trainer = _trainer(tmp_path)
    trainer.fit(model, loader)
    # manual optimization: global_step counts optimizer steps, two per batch
    assert trainer.global_step == 2 * len(loader)
    for name, p in model.generator.named_parameters():
        assert not torch.equal(p.detach(), g0[name]), f"generator.{name} did not change"
    for name, p in model.discriminator.named_parameters():
        assert not torch.equal(p.detach(), d0[name]), f"discriminator.{name} did not change"
    assert {"train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"} <= set(trainer.callback_metrics)


def test_training_uses_the_losses_a_subclass_sets(tmp_path):
    """Lesson 02 trains ``LitGAN`` with the student's losses by setting the two class attributes."""
    calls = []

    class YourGAN(LitGAN):
        @staticmethod
        def discriminator_loss(real_logits, fake_logits):
            calls.append("d")
            return discriminator_loss(real_logits, fake_logits)

        @staticmethod
        def generator_loss(fake_logits):
            calls.append("g")
            return generator_loss(fake_logits)

    loader = torch.utils.data.DataLoader(_Images(16), batch_size=8)
    _trainer(tmp_path).fit(YourGAN(**SMALL), loader)
    assert calls == ["d", "g"] * len(loader)


def test_sample_grid_saved_every_epoch(tmp_path):
    L.seed_everything(0)
    model = LitGAN(**SMALL, num_classes=3, num_grid=6)
    loader = torch.utils.data.DataLoader(_Images(16), batch_size=8)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="gan")
    _trainer(tmp_path, max_epochs=2, logger=logger).fit(model, loader)
    pngs = sorted(p.name for p in (tmp_path / "gan" / "version_0" / "samples").glob("*.png"))
    assert pngs == ["epoch_000.png", "epoch_001.png"]
    assert len(model.sample_history) == 2 and model.sample_history[0].shape == (6, 3, 16, 16)
    assert not torch.equal(model.sample_history[0], model.sample_history[1])


def test_checkpoint_loads_with_weights_only(tmp_path):
    L.seed_everything(0)
    model = LitGAN(**SMALL, num_classes=3)
    loader = torch.utils.data.DataLoader(_Images(16), batch_size=8)
    trainer = _trainer(tmp_path)
    trainer.fit(model, loader)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2
    restored = LitGAN.load_from_checkpoint(path, weights_only=True)
    assert restored.hparams.num_classes == 3
    for k, v in model.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k
    labels = torch.tensor([0, 1, 2])
    g = torch.Generator().manual_seed(0)
    a = model.sample(3, labels, generator=g)
    b = restored.sample(3, labels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_conditional_gan_learns_shapes(tmp_path):
    from minivfm import metrics
    from minivfm.data import Shapes, collate

    cfg = GANConfig.preset("ci")
    data = Shapes(cfg.num_train, seed=0)
    cfg.num_classes = data.num_classes
    L.seed_everything(0)
    model = LitGAN.from_config(cfg)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate)
    trainer = _trainer(tmp_path, max_epochs=7)
    trainer.fit(model, loader)  # 112 steps
    labels = torch.arange(240) % cfg.num_classes
    samples = model.sample(240, labels, generator=torch.Generator().manual_seed(0))
    assert trainer.callback_metrics["train/d_loss"] < 2 * math.log(2)  # D beats chance
    # already after 112 steps the reference classifier finds the asked-for class more often than chance
    assert metrics.sample_acc(samples, labels) > 1 / cfg.num_classes


@pytest.mark.slow
def test_results_ci_reports_metrics_with_baselines() -> None:
    from minivfm.models.gan import results

    out = results("ci")
    assert set(out) >= {"sample_fd", "sample_acc", "seconds", "baselines"}
    assert out["baselines"]["sample_acc"] == pytest.approx(1 / 12)
    assert out["sample_fd"] > out["baselines"]["sample_fd"] > 0, out
    assert 0 <= out["sample_acc"] <= 1
