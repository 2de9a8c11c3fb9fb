"""Generative adversarial networks: DCGAN and its class-conditional variant.

GAN: Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014.
    - the minimax game, eq. 1:
      ``min_G max_D E_x[log D(x)] + E_z[log(1 - D(G(z)))]``
    - the non-saturating generator loss (section 3): maximize ``log D(G(z))``
      instead of minimizing ``log(1 - D(G(z)))``, which has no gradient early on.
    With logits ``l`` and ``D = sigmoid(l)``: ``-log D = softplus(-l)`` and
    ``-log(1 - D) = softplus(l)``.
DCGAN: Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep
    Convolutional Generative Adversarial Networks", ICLR 2016: strided (transposed)
    convolutions, batch norm, ReLU in G, LeakyReLU(0.2) in D, Adam(lr 2e-4, betas (0.5, 0.999)).
Conditional GAN: Mirza & Osindero 2014 (the label embedding fed to G);
    projection discriminator: Miyato & Koyama, "cGANs with Projection
    Discriminator", ICLR 2018, eq. 3: ``D(x, y) = psi(phi(x)) + embed(y) . phi(x)``.
Reference code: https://github.com/pytorch/examples/tree/main/dcgan

Shapes: B batch, Z latent size, C image channels, H = W image size, F features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import minivfm
from minivfm.profiles import fill_from_preset

__all__ = [
    "GANConfig",
    "discriminator_loss",
    "generator_loss",
    "mean_pairwise_distance",
    "dcgan_init",
    "Generator",
    "Discriminator",
    "LitGAN",
    "results",
]


# ----------------------------------------------------------------------------- config


@dataclass
class GANConfig:
    """Sizes and training hyperparameters of the DCGAN."""

    in_channels: int = 3
    image_size: int = 32
    latent_dim: int = 64
    g_channels: tuple[int, ...] = (128, 64, 32)  # G widths at 4x4, 8x8, 16x16; image_size = 4 * 2**len
    d_channels: tuple[int, ...] = (32, 64, 128)  # D widths at 16x16, 8x8, 4x4
    num_classes: int = 0  # > 0: class-conditional
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    batch_size: int = 64
    max_epochs: int = 10
    num_train: int = 4096
    num_samples: int = 1000  # images generated for sample_fd / sample_acc

    @classmethod
    def preset(cls, profile: str | None = None) -> GANConfig:
        p = minivfm.profile(profile)
        if p == "ci":
            return cls(latent_dim=32, g_channels=(64, 32, 16), d_channels=(16, 32, 64), max_epochs=3,
                       num_train=1024, num_samples=128)
        if p == "cpu":
            return cls(g_channels=(96, 48, 24), d_channels=(24, 48, 96), max_epochs=8, num_train=4096,
                       num_samples=256)  # the DDPM's N, so the three sample_fd rows compare
        return cls(latent_dim=128, g_channels=(256, 128, 64), d_channels=(64, 128, 256), batch_size=128,
                   max_epochs=40, num_train=50000, num_samples=2000)  # the DDPM's N


# ----------------------------------------------------------------------------- the functions students rebuild


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``-E[log D(x)] - E[log(1 - D(G(z)))]`` (Goodfellow et al. 2014, eq. 1, negated), from logits.

    Arguments:
        real_logits: ``(B,)`` D's logits on real images.
        fake_logits: ``(B',)`` D's logits on generated images.

    Returns:
        A scalar; ``2 log 2`` when D answers 0.5 everywhere (logits 0).
    """
    if not real_logits.is_floating_point():
        raise ValueError(f"real_logits: expected float logits, got dtype {real_logits.dtype}")
    if not fake_logits.is_floating_point():
        raise ValueError(f"fake_logits: expected float logits, got dtype {fake_logits.dtype}")
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The non-saturating generator loss ``-E[log D(G(z))]`` (Goodfellow et al. 2014, section 3)."""
    if not fake_logits.is_floating_point():
        raise ValueError(f"fake_logits: expected float logits, got dtype {fake_logits.dtype}")
    return F.softplus(-fake_logits).mean()


def mean_pairwise_distance(images: Tensor) -> Tensor:
    """Mean L2 distance between all pairs of ``images`` ``(B, ...)``, per pixel (RMS).

    A diversity score: it drops toward 0 when a generator collapses onto a few images.
    """
    if images.ndim < 2 or images.shape[0] < 2:
        raise ValueError(f"images: expected a batch of at least 2, got shape {tuple(images.shape)}")
    flat = images.reshape(images.shape[0], -1).float()
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5  # (B, B)
    n = flat.shape[0]
    return d.sum() / (n * (n - 1))


# ----------------------------------------------------------------------------- modules


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. 2016, section 4): weights ``N(0, 0.02)``, batch-norm
    scales ``N(1, 0.02)``, biases 0. Apply with ``model.apply(dcgan_init)``."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _check_size(image_size: int, channels: tuple[int, ...], name: str) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"{name}: expected a non-empty tuple of positive widths, got {channels}")
    if image_size != 4 * 2 ** len(channels):
        raise ValueError(
            f"image_size: expected 4 * 2**len({name}) = {4 * 2 ** len(channels)} for {name}={channels}, "
            f"got {image_size}"
        )
    return channels


def _check_labels(labels: Tensor | None, batch: int, num_classes: int) -> None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels: this model is unconditional (num_classes=0); pass labels=None")
        return
    if labels is None:
        raise ValueError(f"labels: this model is class-conditional (num_classes={num_classes}); pass labels (B,)")
    if labels.shape != (batch,) or labels.dtype != torch.long:
        raise ValueError(f"labels: expected a long tensor of shape ({batch},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if batch and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels: expected class ids in [0, {num_classes}), got {labels.min()}..{labels.max()}")


class Generator(nn.Module):
    """DCGAN generator: ``z (B, Z)`` (and ``labels (B,)``) -> images ``(B, C, H, W)`` in [-1, 1].

    Arguments:
        latent_dim: Z.
        channels: widths at 4x4, 8x8, ...; each entry doubles the size: H = 4 * 2**len(channels).
        out_channels: C.
        num_classes: > 0 makes it class-conditional: a learned label embedding of size Z is
            concatenated to ``z``.
    """

    def __init__(self, latent_dim: int = 64, channels: tuple[int, ...] = (128, 64, 32), out_channels: int = 3,
                 image_size: int = 32, num_classes: int = 0):
        super().__init__()
        channels = _check_size(image_size, channels, "channels")
        if latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive size, got {latent_dim}")
        if num_classes < 0:
            raise ValueError(f"num_classes: expected 0 (unconditional) or a positive number, got {num_classes}")
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.label_embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = latent_dim * (2 if num_classes else 1)
        self.fc = nn.Linear(in_dim, channels[0] * 16, bias=False)
        self.bn0 = nn.BatchNorm2d(channels[0])
        ups: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            ups += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        ups += [nn.ConvTranspose2d(channels[-1], out_channels, 4, 2, 1), nn.Tanh()]
        self.ups = nn.Sequential(*ups)
        self.channels = channels
        self.apply(dcgan_init)  # the label embedding keeps N(0, 1), the scale of z

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z: expected shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        _check_labels(labels, z.shape[0], self.num_classes)
        if self.label_embed is not None:
            z = torch.cat([z, self.label_embed(labels)], dim=1)  # (B, 2Z)
        h = self.fc(z).reshape(z.shape[0], self.channels[0], 4, 4)  # (B, F, 4, 4)
        return self.ups(F.relu(self.bn0(h)))  # (B, C, H, W)


class Discriminator(nn.Module):
    """DCGAN discriminator: images ``(B, C, H, W)`` (and ``labels (B,)``) -> logits ``(B,)``.

    With ``num_classes > 0`` it is a projection discriminator (Miyato & Koyama 2018):
    the logit gains ``embed(y) . phi(x)``.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128), image_size: int = 32,
                 num_classes: int = 0):
        super().__init__()
        channels = _check_size(image_size, channels, "channels")
        if num_classes < 0:
            raise ValueError(f"num_classes: expected 0 (unconditional) or a positive number, got {num_classes}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers)
        feat_dim = channels[-1] * 16
        self.head = nn.Linear(feat_dim, 1)
        self.label_embed = nn.Embedding(num_classes, feat_dim) if num_classes else None
        self.apply(dcgan_init)
        if self.label_embed is not None:  # small, like the head: the projection starts near 0
            nn.init.normal_(self.label_embed.weight, 0.0, 0.02)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected images of shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        _check_labels(labels, x.shape[0], self.num_classes)
        h = self.features(x).flatten(1)  # (B, F * 16)
        logits = self.head(h).squeeze(1)  # (B,)
        if self.label_embed is not None:
            logits = logits + (self.label_embed(labels) * h).sum(dim=1)
        return logits


# ----------------------------------------------------------------------------- Lightning


class LitGAN(L.LightningModule):
    """DCGAN training with manual optimization: one D step, then one G step, per batch.

    Logs ``train/d_loss``, ``train/g_loss``, ``train/d_real`` and ``train/d_fake`` (mean D
    probabilities). At the end of every training epoch it generates a grid from fixed noise
    (and fixed labels), keeps it in ``sample_history`` and, with a logger, writes
    ``<log_dir>/samples/epoch_NNN.png``.
    """

    def __init__(self, in_channels: int | None = None, image_size: int | None = None, latent_dim: int | None = None,
                 g_channels: tuple[int, ...] | None = None, d_channels: tuple[int, ...] | None = None,
                 num_classes: int | None = None, lr: float | None = None, betas: tuple[float, float] | None = None,
                 num_grid: int = 64, max_epochs: int | None = None, num_samples: int | None = None,
                 profile: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        fill_from_preset(self, GANConfig.preset(profile))
        hp = self.hparams
        if hp.lr <= 0:
            raise ValueError(f"lr: expected a positive learning rate, got {hp.lr}")
        if num_grid < 1:
            raise ValueError(f"num_grid: expected a positive number of grid images, got {num_grid}")
        in_channels, image_size, latent_dim, num_classes = hp.in_channels, hp.image_size, hp.latent_dim, hp.num_classes
        g_channels, d_channels = hp.g_channels, hp.d_channels
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, tuple(g_channels), in_channels, image_size, num_classes)
        self.discriminator = Discriminator(in_channels, tuple(d_channels), image_size, num_classes)
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("grid_z", torch.randn(num_grid, latent_dim, generator=g), persistent=False)
        grid_labels = torch.arange(num_grid) % num_classes if num_classes else torch.zeros(0, dtype=torch.long)
        self.register_buffer("grid_labels", grid_labels, persistent=False)
        self.sample_history: list[Tensor] = []

    # the two losses, as attributes: lesson 02 trains a subclass that sets the student's own
    discriminator_loss = staticmethod(discriminator_loss)
    generator_loss = staticmethod(generator_loss)

    @classmethod
    def from_config(cls, cfg: GANConfig, **kwargs) -> LitGAN:
        return cls(cfg.in_channels, cfg.image_size, cfg.latent_dim, tuple(cfg.g_channels),
                   tuple(cfg.d_channels), cfg.num_classes, cfg.lr, tuple(cfg.betas),
                   max_epochs=cfg.max_epochs, num_samples=cfg.num_samples, **kwargs)

    def generate(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """``num_samples`` samples for the metrics and their labels (cycling through the classes;
        ``None`` for an unconditional GAN)."""
        num_classes = self.hparams.num_classes
        labels = torch.arange(num_samples) % num_classes if num_classes else None
        images = []
        for start in range(0, num_samples, 256):
            chunk = None if labels is None else labels[start : start + 256]
            images.append(self.sample(min(256, num_samples - start), chunk, generator=generator).cpu())
        return torch.cat(images), labels

    @torch.no_grad()
    def sample(self, num_samples: int, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` images ``(B, C, H, W)`` in [-1, 1] from G in eval mode.

        ``labels``: ``(num_samples,)`` class ids for a conditional GAN (``None``: cycle through classes).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples: expected a positive number, got {num_samples}")
        G = self.generator
        z = torch.randn(num_samples, G.latent_dim, generator=generator, device=self.device_of(G))
        if G.num_classes and labels is None:
            labels = torch.arange(num_samples, device=z.device) % G.num_classes
        was_training = G.training
        G.eval()
        out = G(z, None if labels is None else labels.to(z.device))
        G.train(was_training)
        return out

    @staticmethod
    def device_of(module: nn.Module) -> torch.device:
        return next(module.parameters()).device

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x = batch["image"]
        y = batch["label"] if self.hparams.num_classes else None
        z = torch.randn(x.shape[0], self.hparams.latent_dim, device=x.device)
        fake = self.generator(z, y)

        # D step: push D(x) -> 1 and D(G(z)) -> 0; G is not updated (fake is detached).
        real_logits = self.discriminator(x, y)
        fake_logits = self.discriminator(fake.detach(), y)
        d_loss = self.discriminator_loss(real_logits, fake_logits)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()

        # G step: the non-saturating loss through the just-updated D.
        g_loss = self.generator_loss(self.discriminator(fake, y))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()

        kw = dict(on_epoch=True, on_step=False, batch_size=x.shape[0])
        self.log("train/d_loss", d_loss.detach(), prog_bar=True, **kw)
        self.log("train/g_loss", g_loss.detach(), prog_bar=True, **kw)
        self.log("train/d_real", torch.sigmoid(real_logits.detach()).mean(), **kw)
        self.log("train/d_fake", torch.sigmoid(fake_logits.detach()).mean(), **kw)

    def on_train_epoch_end(self) -> None:
        G = self.generator
        was_training = G.training
        G.eval()
        with torch.no_grad():
            grid = G(self.grid_z, self.grid_labels if self.hparams.num_classes else None).cpu()
        G.train(was_training)
        self.sample_history.append(grid)
        log_dir = getattr(self.logger, "log_dir", None) if self.logger is not None else None
        if log_dir:
            import matplotlib.pyplot as plt

            from minivfm.viz import image_grid

            path = Path(log_dir) / "samples" / f"epoch_{self.current_epoch:03d}.png"
            plt.close(image_grid(grid, nrow=8, title=f"epoch {self.current_epoch}", path=path))

    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas)
        return [opt_g, opt_d]


# ----------------------------------------------------------------------------- results


def results(profile: str) -> dict:
    """Train the class-conditional GAN under ``profile``; return ``sample_fd``, ``sample_acc``, ``seconds``
    and ``baselines`` (the real-data floor of ``sample_fd`` at the same N, chance for ``sample_acc``)."""
    from minivfm import metrics
    from minivfm.data import collate, shapes_in_memory

    cfg = GANConfig.preset(profile)
    L.seed_everything(0, workers=True)
    start = time.perf_counter()
    data = shapes_in_memory(cfg.num_train, cfg.image_size, seed=0)  # rendered once, held in memory
    cfg.num_classes = int(data.num_classes)
    train = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                        collate_fn=collate)
    model = LitGAN.from_config(cfg)
    trainer = L.Trainer(max_epochs=cfg.max_epochs, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    g = torch.Generator(device=LitGAN.device_of(model)).manual_seed(0)
    samples, labels = model.generate(cfg.num_samples, generator=g)
    return {
        "sample_fd": float(metrics.sample_fd(samples)),
        "sample_acc": float(metrics.sample_acc(samples, labels)),
        "seconds": seconds,
        "baselines": {"sample_fd": metrics.real_fd(cfg.num_samples), "sample_acc": 1 / cfg.num_classes},
    }
