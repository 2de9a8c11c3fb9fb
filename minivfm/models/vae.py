"""Variational and vector-quantized autoencoders.

VAE: Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
    - the evidence lower bound (ELBO), eq. 3:
      ``log p(x) >= E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))``
    - the reparameterization trick, section 2.4: ``z = mu + sigma * eps``, ``eps ~ N(0, I)``
    - the KL term in closed form for a Gaussian posterior and a standard normal
      prior, appendix B (eq. 10): ``-KL = 1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)``
    beta-VAE (Higgins et al., ICLR 2017) weights the KL term by ``beta``.

VQ-VAE: van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete Representation
Learning", NeurIPS 2017.
    - nearest-code lookup, eq. 1-2: ``z_q(x) = e_k``, ``k = argmin_j ||z_e(x) - e_j||``
    - the straight-through estimator (section 3.2): the decoder's gradient is
      copied from ``z_q`` to ``z_e``
    - the loss, eq. 3: ``log p(x|z_q) + ||sg[z_e] - e||^2 + commitment ||z_e - sg[e]||^2``
      (the paper's beta; lesson 01 writes gamma, since beta is the VAE's KL weight)
    Reference code: https://github.com/google-deepmind/sonnet (``vqvae.py``).

The VAE's latent is a small spatial map, ``(B, latent_channels, H/4, W/4)``
(``(B, 4, 8, 8)`` at 32x32), so that a diffusion model can run on it (latent
diffusion, lesson 03) through :meth:`VAE.encode` and :meth:`VAE.decode`.

Shapes: B batch, C image channels, H/W image size, Z latent channels, h/w
latent size (H / 2**levels), D code dimension, K number of codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import minivfm
from minivfm.profiles import fill_from_preset

__all__ = [
    "VAEConfig",
    "VQVAEConfig",
    "reparameterize",
    "kl_divergence",
    "elbo_loss",
    "quantize",
    "vq_losses",
    "codebook_usage",
    "Encoder",
    "Decoder",
    "VAE",
    "VectorQuantizer",
    "VQVAE",
    "LitVAE",
    "LitVQVAE",
    "results",
    "train_vae",
    "encode_latents",
    "decode_latents",
]


# ----------------------------------------------------------------------------- config


@dataclass
class VAEConfig:
    """Sizes and training hyperparameters of the VAE."""

    in_channels: int = 3
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64)  # one stride-2 level per entry: 32x32 -> 8x8
    latent_channels: int = 4
    beta: float = 1.0
    lr: float = 2e-3
    batch_size: int = 64
    max_epochs: int = 10
    num_train: int = 4096
    num_val: int = 512
    num_samples: int = 1000  # images generated for sample_fd

    @classmethod
    def preset(cls, profile: str | None = None) -> VAEConfig:
        p = minivfm.profile(profile)
        if p == "ci":
            return cls(channels=(16, 32), batch_size=64, max_epochs=4, num_train=1024, num_val=128,
                       num_samples=128)
        if p == "cpu":
            return cls(channels=(32, 64), batch_size=64, max_epochs=6, num_train=4096, num_val=512,
                       num_samples=256)  # the DDPM's N, so the three sample_fd rows compare
        return cls(channels=(64, 128), batch_size=128, max_epochs=40, num_train=50000, num_val=2000,
                   num_samples=2000)  # the DDPM's N


@dataclass
class VQVAEConfig:
    """Sizes and training hyperparameters of the VQ-VAE."""

    in_channels: int = 3
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64)
    embed_dim: int = 16  # D, the dimension of one code
    num_codes: int = 64  # K, the codebook size
    commitment: float = 0.25  # the commitment weight: beta in eq. 3 of van den Oord et al., gamma in lesson 01
    lr: float = 2e-3
    batch_size: int = 64
    max_epochs: int = 8
    num_train: int = 4096
    num_val: int = 512

    @classmethod
    def preset(cls, profile: str | None = None) -> VQVAEConfig:
        p = minivfm.profile(profile)
        if p == "ci":
            return cls(channels=(16, 32), embed_dim=8, num_codes=32, max_epochs=4, num_train=1024, num_val=128)
        if p == "cpu":
            return cls(channels=(32, 64), embed_dim=16, num_codes=64, max_epochs=6, num_train=4096, num_val=512)
        return cls(channels=(64, 128), embed_dim=32, num_codes=256, batch_size=128, max_epochs=40,
                   num_train=50000, num_val=2000)


# ----------------------------------------------------------------------------- the functions students rebuild


def reparameterize(mu: Tensor, logvar: Tensor, noise: Tensor | None = None) -> Tensor:
    """Sample ``z ~ N(mu, exp(logvar))`` as a differentiable function of ``mu`` and ``logvar``.

    Kingma & Welling 2014, section 2.4: ``z = mu + sigma * eps`` with ``sigma = exp(logvar / 2)``.

    Arguments:
        mu: the posterior mean, any shape, e.g. ``(B, Z, h, w)``.
        logvar: the posterior log-variance, same shape as ``mu``.
        noise: ``eps``, same shape; ``None`` draws it from ``N(0, I)``.

    Returns:
        ``z``, same shape as ``mu``.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"logvar: expected the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if noise is None:
        noise = torch.randn_like(mu)
    elif noise.shape != mu.shape:
        raise ValueError(f"noise: expected the shape of mu {tuple(mu.shape)}, got {tuple(noise.shape)}")
    return mu + torch.exp(0.5 * logvar) * noise


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` in closed form, one value per sample.

    Kingma & Welling 2014, appendix B: ``KL = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)``,
    summed over every dimension but the first (batch).

    Arguments:
        mu, logvar: ``(B, ...)``, the same shape.

    Returns:
        ``(B,)``, in nats.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"logvar: expected the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if mu.ndim < 1:
        raise ValueError("mu: expected a batch-first tensor (B, ...), got a scalar")
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(dim=1)


def elbo_loss(x: Tensor, x_rec: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0) -> Tensor:
    """The negative ELBO (eq. 3 of Kingma & Welling 2014), averaged over the batch.

    The decoder is a Gaussian ``p(x|z) = N(x_rec, 1/2 I)``, so ``-log p(x|z)`` is the
    squared error summed over pixels (up to a constant), and the loss per sample is
    ``sum((x - x_rec)^2) + beta * KL(q(z|x) || N(0, I))``.

    Arguments:
        x, x_rec: images ``(B, C, H, W)``.
        mu, logvar: the posterior ``(B, ...)``.
        beta: the KL weight (``1`` is the VAE, ``> 1`` the beta-VAE).

    Returns:
        A scalar.
    """
    if x.shape != x_rec.shape:
        raise ValueError(f"x_rec: expected the shape of x {tuple(x.shape)}, got {tuple(x_rec.shape)}")
    if mu.shape[0] != x.shape[0]:
        raise ValueError(f"mu: expected batch size {x.shape[0]} (that of x), got {mu.shape[0]}")
    if beta < 0:
        raise ValueError(f"beta: expected a non-negative KL weight, got {beta}")
    rec = (x - x_rec).pow(2).reshape(x.shape[0], -1).sum(dim=1)  # (B,)
    return (rec + beta * kl_divergence(mu, logvar)).mean()


def quantize(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Replace each vector of ``z`` by its nearest code, with a straight-through gradient.

    van den Oord et al. 2017, eq. 1-2 and section 3.2. The forward value is the
    nearest code ``e_k``; the backward pass copies the gradient from ``z_q`` to ``z``
    unchanged (``z_q = z + sg[e_k - z]``), because ``argmin`` has no gradient.

    Arguments:
        z: encoder outputs, channels last, ``(..., D)``.
        codebook: ``(K, D)``.

    Returns:
        ``z_q``: ``(..., D)``, the codes, with gradient flowing to ``z`` (none to the codebook);
        ``indices``: ``(...)`` long, the code index of each vector.
    """
    if codebook.ndim != 2:
        raise ValueError(f"codebook: expected shape (K, D), got {tuple(codebook.shape)}")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"z: expected the last dimension to be the code dimension D={codebook.shape[1]}, "
            f"got shape {tuple(z.shape)}"
        )
    flat = z.reshape(-1, z.shape[-1])  # (N, D)
    # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)  # (N, K)
    indices = dist.argmin(dim=1).reshape(z.shape[:-1])  # (...)
    e = codebook[indices]  # (..., D)
    z_q = z + (e - z).detach()
    return z_q, indices


def vq_losses(z: Tensor, codebook: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The codebook and commitment terms of eq. 3 of van den Oord et al. 2017.

    Arguments:
        z: encoder outputs ``(..., D)``.
        codebook: ``(K, D)``.
        indices: ``(...)``, from :func:`quantize`.

    Returns:
        ``codebook_loss = ||sg[z] - e||^2`` (moves the codes toward the encoder outputs) and
        ``commitment_loss = ||z - sg[e]||^2`` (keeps the encoder near its codes), both means.
    """
    e = codebook[indices]
    return F.mse_loss(e, z.detach()), F.mse_loss(z, e.detach())


def codebook_usage(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """How many codes are in use: ``(perplexity, fraction of codes used)``.

    Perplexity is ``exp(entropy)`` of the code histogram: ``num_codes`` when every
    code is used equally, ``1`` when one code takes everything.
    """
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum()
    return entropy.exp(), (counts > 0).float().mean()


# ----------------------------------------------------------------------------- modules


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def _check_sizes(in_channels: int, image_size: int, channels: tuple[int, ...]) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if in_channels < 1:
        raise ValueError(f"in_channels: expected a positive number of channels, got {in_channels}")
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"channels: expected a non-empty tuple of positive widths, got {channels}")
    if image_size % (2 ** len(channels)) != 0:
        raise ValueError(
            f"image_size: expected a multiple of {2 ** len(channels)} (one halving per entry of "
            f"channels={channels}), got {image_size}"
        )
    return channels


class Encoder(nn.Module):
    """Convolutional encoder: ``(B, C, H, W) -> (B, out_channels, H / 2**L, W / 2**L)``, L = len(channels)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        prev = channels[0]
        for c in channels:
            layers += [
                nn.Conv2d(prev, c, 4, stride=2, padding=1), _norm(c), nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU(),
            ]  # fmt: skip
            prev = c
        layers.append(nn.Conv2d(prev, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: ``(B, in_channels, h, w) -> (B, out_channels, h * 2**L, w * 2**L)``."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        rev = tuple(reversed(channels))
        layers: list[nn.Module] = [nn.Conv2d(in_channels, rev[0], 3, padding=1), _norm(rev[0]), nn.SiLU()]
        prev = rev[0]
        for c in rev:
            layers += [
                nn.ConvTranspose2d(prev, c, 4, stride=2, padding=1), _norm(c), nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU(),
            ]  # fmt: skip
            prev = c
        layers.append(nn.Conv2d(prev, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class VAE(nn.Module):
    """A convolutional VAE with a spatial Gaussian latent ``(B, Z, h, w)``.

    Arguments:
        in_channels: image channels C.
        image_size: H = W, a multiple of ``2 ** len(channels)``.
        channels: encoder widths, one stride-2 level each (reversed in the decoder).
        latent_channels: Z.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, channels: tuple[int, ...] = (32, 64),
                 latent_channels: int = 4):
        super().__init__()
        self.channels = _check_sizes(in_channels, image_size, channels)
        if latent_channels < 1:
            raise ValueError(f"latent_channels: expected a positive number, got {latent_channels}")
        self.in_channels, self.image_size, self.latent_channels = in_channels, image_size, latent_channels
        self.latent_size = image_size // 2 ** len(self.channels)
        self.encoder = Encoder(in_channels, self.channels, 2 * latent_channels)
        self.decoder = Decoder(latent_channels, self.channels, in_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def _check_images(self, x: Tensor) -> None:
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected images of shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``(B, C, H, W)`` in [-1, 1] -> ``(mu, logvar)``, each ``(B, Z, h, w)``."""
        self._check_images(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """``z`` ``(B, Z, h, w)`` -> images ``(B, C, H, W)`` (unclamped)."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"z: expected latents of shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(x_rec, mu, logvar)``."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean: images ``(B, C, H, W)`` in [-1, 1]."""
        mu, _ = self.encode(x)
        return self.decode(mu).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Decode ``z ~ N(0, I)``: images ``(num_samples, C, H, W)`` in [-1, 1]."""
        if num_samples < 1:
            raise ValueError(f"num_samples: expected a positive number, got {num_samples}")
        device = next(self.parameters()).device
        z = torch.randn((num_samples, *self.latent_shape), generator=generator, device=device)
        return self.decode(z).clamp(-1, 1)

    @torch.no_grad()
    def interpolate(self, x_a: Tensor, x_b: Tensor, steps: int = 8) -> Tensor:
        """Decode a straight line between the posterior means of two images.

        Arguments:
            x_a, x_b: ``(C, H, W)`` or ``(1, C, H, W)``.
            steps: the number of images on the line, ends included (at least 2).

        Returns:
            ``(steps, C, H, W)`` in [-1, 1], from ``x_a`` to ``x_b``.
        """
        if steps < 2:
            raise ValueError(f"steps: expected at least 2 (the two ends), got {steps}")
        x = torch.stack([x_a.reshape(-1, *x_a.shape[-3:])[0], x_b.reshape(-1, *x_b.shape[-3:])[0]])
        mu, _ = self.encode(x)
        t = torch.linspace(0, 1, steps, device=mu.device).reshape(-1, 1, 1, 1)
        return self.decode((1 - t) * mu[:1] + t * mu[1:]).clamp(-1, 1)


class VectorQuantizer(nn.Module):
    """A codebook of ``num_codes`` vectors of dimension ``embed_dim`` and the lookup into it.

    Input and output are channels-first maps ``(B, D, h, w)``; :func:`quantize` works channels last.
    """

    def __init__(self, num_codes: int, embed_dim: int):
        super().__init__()
        if num_codes < 1:
            raise ValueError(f"num_codes: expected a positive codebook size, got {num_codes}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim: expected a positive code dimension, got {embed_dim}")
        self.num_codes, self.embed_dim = num_codes, embed_dim
        self.codebook = nn.Parameter(torch.empty(num_codes, embed_dim).uniform_(-1 / num_codes, 1 / num_codes))

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``z_e`` ``(B, D, h, w)`` -> ``(z_q (B, D, h, w), indices (B, h, w), codebook_loss, commitment_loss)``."""
        z = z_e.permute(0, 2, 3, 1)  # (B, h, w, D)
        z_q, indices = quantize(z, self.codebook)
        codebook_loss, commitment_loss = vq_losses(z, self.codebook, indices)
        return z_q.permute(0, 3, 1, 2), indices, codebook_loss, commitment_loss

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes for ``indices`` ``(B, h, w)`` as a map ``(B, D, h, w)``."""
        return self.codebook[indices].permute(0, 3, 1, 2)


class VQVAE(nn.Module):
    """VQ-VAE: encoder, vector quantizer, decoder. The latent is a ``(B, h, w)`` map of code indices."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, channels: tuple[int, ...] = (32, 64),
                 embed_dim: int = 16, num_codes: int = 64):
        super().__init__()
        self.channels = _check_sizes(in_channels, image_size, channels)
        self.in_channels, self.image_size = in_channels, image_size
        self.latent_size = image_size // 2 ** len(self.channels)
        self.encoder = Encoder(in_channels, self.channels, embed_dim)
        self.quantizer = VectorQuantizer(num_codes, embed_dim)
        self.decoder = Decoder(embed_dim, self.channels, in_channels)

    def encode(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> continuous encoder outputs ``z_e`` ``(B, D, h, w)``."""
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected images of shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        return self.encoder(x)

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)

    @torch.no_grad()
    def tokenize(self, x: Tensor) -> Tensor:
        """Images -> code indices ``(B, h, w)``: the tokens a prior over tokens (a PixelCNN, a transformer) predicts."""
        return self.quantizer(self.encode(x))[1]

    @torch.no_grad()
    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices ``(B, h, w)`` -> images ``(B, C, H, W)`` in [-1, 1]."""
        return self.decode(self.quantizer.lookup(indices)).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode_indices(self.tokenize(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(x_rec, indices, codebook_loss, commitment_loss)``."""
        z_q, indices, codebook_loss, commitment_loss = self.quantizer(self.encode(x))
        return self.decode(z_q), indices, codebook_loss, commitment_loss


# ----------------------------------------------------------------------------- Lightning


class LitVAE(L.LightningModule):
    """Trains a :class:`VAE` on the negative ELBO; logs ``loss``, ``recon_mse`` (per pixel) and ``kl``."""

    def __init__(self, in_channels: int | None = None, image_size: int | None = None,
                 channels: tuple[int, ...] | None = None, latent_channels: int | None = None,
                 beta: float | None = None, lr: float | None = None, max_epochs: int | None = None,
                 num_samples: int | None = None, profile: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        fill_from_preset(self, VAEConfig.preset(profile))
        hp = self.hparams
        if hp.beta < 0:
            raise ValueError(f"beta: expected a non-negative KL weight, got {hp.beta}")
        self.model = VAE(hp.in_channels, hp.image_size, tuple(hp.channels), hp.latent_channels)

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> LitVAE:
        return cls(cfg.in_channels, cfg.image_size, tuple(cfg.channels), cfg.latent_channels, cfg.beta, cfg.lr,
                   cfg.max_epochs, cfg.num_samples)

    def generate(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, None]:
        """``num_samples`` prior samples for the metrics (unconditional: no labels)."""
        return self.model.sample(num_samples, generator=generator), None

    def _step(self, batch: dict, stage: str) -> Tensor:
        x = batch["image"]
        x_rec, mu, logvar = self.model(x)
        loss = elbo_loss(x, x_rec, mu, logvar, self.hparams.beta)
        kw = dict(on_epoch=True, on_step=False, batch_size=x.shape[0])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", **kw)
        self.log(f"{stage}/recon_mse", F.mse_loss(x_rec.detach(), x), **kw)
        self.log(f"{stage}/kl", kl_divergence(mu.detach(), logvar.detach()).mean(), **kw)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class LitVQVAE(L.LightningModule):
    """Trains a :class:`VQVAE`; logs the losses, ``perplexity`` and ``codes_used`` (fraction of the codebook).

    ``restart_dead_codes``: at the end of each training epoch, codes that no vector
    picked during the epoch are moved onto random encoder outputs of the last batch
    (a common fix for codebook collapse; see Dhariwal et al. 2020, Jukebox).
    """

    def __init__(self, in_channels: int | None = None, image_size: int | None = None,
                 channels: tuple[int, ...] | None = None, embed_dim: int | None = None, num_codes: int | None = None,
                 commitment: float | None = None, lr: float | None = None, restart_dead_codes: bool = True,
                 max_epochs: int | None = None, profile: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        fill_from_preset(self, VQVAEConfig.preset(profile))
        hp = self.hparams
        if hp.commitment < 0:
            raise ValueError(f"commitment: expected a non-negative weight, got {hp.commitment}")
        self.model = VQVAE(hp.in_channels, hp.image_size, tuple(hp.channels), hp.embed_dim, hp.num_codes)
        self.register_buffer("_epoch_counts", torch.zeros(hp.num_codes), persistent=False)
        self._last_z: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: VQVAEConfig, **kwargs) -> LitVQVAE:
        return cls(cfg.in_channels, cfg.image_size, tuple(cfg.channels), cfg.embed_dim, cfg.num_codes,
                   cfg.commitment, cfg.lr, max_epochs=cfg.max_epochs, **kwargs)

    def _step(self, batch: dict, stage: str) -> Tensor:
        x = batch["image"]
        x_rec, indices, codebook_loss, commitment_loss = self.model(x)
        recon = F.mse_loss(x_rec, x)
        loss = recon + codebook_loss + self.hparams.commitment * commitment_loss
        perplexity, used = codebook_usage(indices, self.hparams.num_codes)
        kw = dict(on_epoch=True, on_step=False, batch_size=x.shape[0])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", **kw)
        self.log(f"{stage}/recon_mse", recon.detach(), **kw)
        self.log(f"{stage}/codebook_loss", codebook_loss.detach(), **kw)
        self.log(f"{stage}/commitment_loss", commitment_loss.detach(), **kw)
        self.log(f"{stage}/perplexity", perplexity, **kw)
        self.log(f"{stage}/codes_used", used, **kw)
        if stage == "train" and self.hparams.restart_dead_codes:
            self._epoch_counts += torch.bincount(indices.reshape(-1), minlength=self.hparams.num_codes)
            with torch.no_grad():
                self._last_z = self.model.encode(x).permute(0, 2, 3, 1).reshape(-1, self.hparams.embed_dim)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.hparams.restart_dead_codes and self._last_z is not None:
            dead = (self._epoch_counts == 0).nonzero().flatten()
            if len(dead) > 0:
                pick = torch.randint(len(self._last_z), (len(dead),), device=self._last_z.device)
                with torch.no_grad():
                    self.model.quantizer.codebook[dead] = self._last_z[pick]
            self._epoch_counts.zero_()
            self._last_z = None

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# ----------------------------------------------------------------------------- results


def _fit_autoencoder(model: L.LightningModule, cfg, profile: str) -> tuple[float, float, float]:
    """Train ``model`` (built after ``L.seed_everything(0)``) on ``cfg.num_train`` Shapes (seed 0); return
    the seconds it took, its per-pixel ``recon_mse`` on ``cfg.num_val`` held-out Shapes (seed 2) and that
    of the baseline that reconstructs every image as the mean training image."""
    from minivfm.data import collate, shapes_in_memory

    start = time.perf_counter()
    data = shapes_in_memory(cfg.num_train, cfg.image_size, seed=0)
    train = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)
    trainer = L.Trainer(max_epochs=cfg.max_epochs, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision="bf16-mixed" if minivfm.profile(profile) == "gpu" else "32-true")
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    net = model.model.eval()
    device = next(net.parameters()).device
    x = shapes_in_memory(cfg.num_val, cfg.image_size, seed=2).images * 2 - 1
    mean_image = (data.images * 2 - 1).mean(0)
    with torch.no_grad():
        rec = torch.cat([net.reconstruct(b.to(device)).cpu() for b in x.split(256)])
    return seconds, F.mse_loss(rec, x).item(), F.mse_loss(mean_image.expand_as(x), x).item()


def results(profile: str) -> dict:
    """Train the VAE under ``profile``; return ``recon_mse`` (per pixel, held-out Shapes, decoding the
    posterior mean), ``sample_fd`` (``cfg.num_samples`` prior samples, :func:`minivfm.metrics.sample_fd`),
    ``seconds`` (data and training) and ``baselines``: the mean-image reconstruction and the real-data
    floor of ``sample_fd`` (:func:`minivfm.metrics.real_fd` at the same N)."""
    from minivfm import metrics

    cfg = VAEConfig.preset(profile)
    L.seed_everything(0, workers=True)  # before the weights are drawn: results do not depend on what ran before
    model = LitVAE.from_config(cfg)
    seconds, recon_mse, mean_mse = _fit_autoencoder(model, cfg, profile)
    samples, _ = model.generate(cfg.num_samples, generator=torch.Generator(model.device).manual_seed(0))
    return {
        "recon_mse": recon_mse, "sample_fd": metrics.sample_fd(samples), "seconds": seconds,
        "baselines": {"recon_mse": mean_mse, "sample_fd": metrics.real_fd(cfg.num_samples)},
    }  # fmt: skip


def results_vqvae(profile: str) -> dict:
    """Train the VQ-VAE under ``profile``; return ``recon_mse`` (held-out Shapes), ``codes_used`` (the
    fraction of the codebook that the held-out images use), ``seconds`` and ``baselines`` (the
    mean-image reconstruction; one code of the codebook)."""
    cfg = VQVAEConfig.preset(profile)
    L.seed_everything(0, workers=True)
    model = LitVQVAE.from_config(cfg)
    seconds, recon_mse, mean_mse = _fit_autoencoder(model, cfg, profile)
    from minivfm.data import shapes_in_memory

    x = shapes_in_memory(cfg.num_val, cfg.image_size, seed=2).images * 2 - 1
    with torch.no_grad():
        indices = torch.cat([model.model(b.to(model.device))[1].cpu() for b in x.split(256)])
    _, used = codebook_usage(indices, cfg.num_codes)
    return {
        "recon_mse": recon_mse, "codes_used": float(used), "seconds": seconds,
        "baselines": {"recon_mse": mean_mse, "codes_used": 1 / cfg.num_codes},
    }  # fmt: skip


# ----------------------------------------------------------------------------- latents for diffusion (lesson 03)


def train_vae(profile: str, images: Tensor, labels: Tensor) -> VAE:
    """Train the VAE of ``VAEConfig.preset(profile)`` on the first ``num_train`` of ``images`` ``(N, C, H, W)``
    in [-1, 1] (``labels`` ``(N,)`` ride along) for ``max_epochs`` epochs; returns the :class:`VAE` in eval mode."""
    cfg = VAEConfig.preset(profile)
    model = LitVAE.from_config(cfg)
    n = min(len(images), cfg.num_train)
    data = torch.utils.data.StackDataset(image=images[:n], label=labels[:n].long())
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    trainer = L.Trainer(max_steps=cfg.max_epochs * len(loader), accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision="bf16-mixed" if minivfm.profile(profile) == "gpu" else "32-true")  # fmt: skip
    trainer.fit(model, loader)
    return model.model.eval()


@torch.no_grad()
def encode_latents(vae: VAE, images: Tensor, batch_size: int = 512) -> Tensor:
    """The posterior means of ``images`` ``(N, C, H, W)`` under ``vae``: latents ``(N, Z, h, w)`` on the CPU."""
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(x.to(device))[0].cpu() for x in images.split(batch_size)])


@torch.no_grad()
def decode_latents(vae: VAE, z: Tensor, batch_size: int = 512) -> Tensor:
    """Latents ``(N, Z, h, w)`` decoded by ``vae``: images ``(N, C, H, W)`` in [-1, 1] on the CPU."""
    device = next(vae.parameters()).device
    return torch.cat([vae.decode(x.to(device)).clamp(-1, 1).cpu() for x in z.split(batch_size)])
