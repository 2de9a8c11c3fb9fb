"""Masked autoencoder (MAE).

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", https://arxiv.org/abs/2111.06377.
Reference code: https://github.com/facebookresearch/mae (``models_mae.py``). The method (section 3):

    - masking: split the image into N patches and keep a random ``(1 - mask_ratio) N`` of them,
      uniformly without replacement (75% masked by default);
    - encoder: a ViT on the visible patches only (with their positions and the class token), so
      pretraining costs a fraction of a full ViT step;
    - decoder: the encoded visible tokens plus one shared, learned mask token at every masked
      position, with positional embeddings, a few light transformer blocks, and a linear layer to
      the P * P * C pixels of each patch;
    - loss: the mean squared error on the masked patches only, optionally against each patch's
      pixels normalised by their own mean and standard deviation (``norm_pix_loss``).

The encoder is a plain :class:`minivfm.models.vit.ViT` (patch stem, no head), so its weights load
into a ``ViT`` for probing and fine-tuning with ``load_state_dict(strict=True)``. Positions are
MAE's fixed 2-D sin-cos embeddings, in the encoder (copied into the ViT's ``pos_embed`` and frozen)
and in the decoder.

Shape glossary: B batch, C channels, H x W image, P patch size, N = HW / P^2 patches,
K = int(N (1 - mask_ratio)) visible patches, D encoder width, Dd decoder width.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivfm.models.vit import (
    ViT,
    adamw_warmup_cosine,
    headless_kwargs,
    map_batches,
    patchify,
    results_trainer,
    unpatchify,
)
from minivfm.nn import Block, sincos_pos_embed_2d
from minivfm.profiles import fill_from_preset, preset_arguments
from minivfm.profiles import profile as _profile

__all__ = ["MAEConfig", "random_masking", "mae_loss", "MAE", "LitMAE", "results"]


# -- config -----------------------------------------------------------------------------------------


@dataclass
class MAEConfig:
    """Sizes of the MAE and how to pretrain it; :meth:`preset` picks them for a profile."""

    image_size: int = 32
    in_channels: int = 3
    # the encoder: a ViT with the patch stem
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    # the decoder
    decoder_embed_dim: int = 64
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    # pretraining
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    batch_size: int = 128
    max_epochs: int = 10
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    # data for results(): pretraining images, held-out reconstructions, the linear probe's splits
    num_train: int = 20_000
    num_val: int = 1000
    num_probe_train: int = 4000
    num_probe_test: int = 2000
    finetune_epochs: int = 20  # fine-tuning on 100 labels per class

    @classmethod
    def preset(cls, profile: str | None = None) -> MAEConfig:
        """The config for a profile (``ci``, ``cpu``, ``gpu``; ``None`` reads ``MINIVFM_PROFILE``)."""
        name = _profile(profile)
        if name == "ci":
            return cls(
                patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2, batch_size=64, max_epochs=2, lr=2e-3, warmup_epochs=0.5, num_train=512,
                num_val=128, num_probe_train=600, num_probe_test=300, finetune_epochs=2,
            )  # fmt: skip
        if name == "cpu":
            # ViTConfig.preset("cpu")'s sizes with the patch stem: 16 tokens, 4 of them visible. Patch 4
            # (64 tokens) costs 3.5x more per step and, pretrained for the same 40 s, probed no better
            # (0.25 against 0.27 at patch 8; one run each, on a busy machine)
            return cls(
                patch_size=8, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2,
                decoder_num_heads=4, batch_size=128, max_epochs=12, lr=1.5e-3, warmup_epochs=1.0,
                num_train=20_000, num_val=1000, num_probe_train=4000, num_probe_test=2000, finetune_epochs=15,
            )  # fmt: skip
        return cls(
            patch_size=4, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128, decoder_depth=4,
            decoder_num_heads=4, norm_pix_loss=True, batch_size=256, max_epochs=200, lr=1.5e-3,
            warmup_epochs=10.0, num_train=100_000, num_val=5000, num_probe_train=10_000, num_probe_test=5000,
            finetune_epochs=50,
        )  # fmt: skip

    def encoder_kwargs(self) -> dict:
        """The arguments of the encoder :class:`ViT` (no head, the patch stem)."""
        return headless_kwargs(self, stem="patch")


# -- the functions a lesson rebuilds ----------------------------------------------------------------


def random_masking(
    x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random subset of each sequence's tokens (MAE's ``random_masking``).

    Argsort one uniform noise value per token: the first ``K = int(N * (1 - mask_ratio))`` of the
    shuffle are kept, and ``ids_restore = argsort(ids_shuffle)`` undoes the shuffle.

    Arguments:
        x: tokens ``(B, N, D)``.
        mask_ratio: the fraction of tokens to remove, in ``[0, 1)``.
        generator: draws the noise (on ``x``'s device); ``None`` uses the global RNG.

    Returns:
        ``x_visible`` ``(B, K, D)``, the kept tokens in shuffled order; ``mask`` ``(B, N)``, 1 for a
        removed token and 0 for a kept one, in the original order; ``ids_restore`` ``(B, N)``, the
        position of each original token in the shuffled sequence.
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected tokens of shape (B, N, D), got {got}")
    if not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio: expected a fraction in [0, 1), got {mask_ratio!r}")
    B, N, D = x.shape
    len_keep = int(N * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio: {mask_ratio} of {N} tokens keeps none; use a smaller ratio")
    noise = torch.rand(B, N, generator=generator, device=x.device)  # (B, N)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N): ascending noise, the first K are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
    x_visible = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))  # (B, K, D)
    mask = torch.ones(B, N, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, N), in the original order
    return x_visible, mask, ids_restore


def mae_loss(pred: Tensor, target_patches: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """Mean squared error on the masked patches only (section 3, "Reconstruction target").

    Arguments:
        pred: predicted pixels ``(B, N, P*P*C)``.
        target_patches: the image's patches ``(B, N, P*P*C)`` (:func:`minivfm.models.vit.patchify`).
        mask: ``(B, N)``, 1 for a masked patch (those count), 0 for a visible one.
        norm_pix: normalise each target patch by its own mean and standard deviation first.

    Returns:
        A scalar: the per-pixel MSE averaged over the masked patches (0 if none is masked).
    """
    if pred.shape != target_patches.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target_patches: expected the same shape (B, N, P*P*C), got {tuple(pred.shape)} "
            f"and {tuple(target_patches.shape)}"
        )
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask: expected shape {tuple(pred.shape[:2])} (B, N), got {tuple(mask.shape)}")
    target = target_patches
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target).pow(2).mean(dim=-1)  # (B, N), per patch
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


# -- the model --------------------------------------------------------------------------------------


class MAE(nn.Module):
    """A masked autoencoder around a :class:`ViT` encoder.

    Arguments:
        encoder: a ViT with the patch stem and no head (``num_classes=0``). Its ``pos_embed`` is set
            to MAE's fixed sin-cos positions and frozen.
        decoder_embed_dim: decoder width Dd.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads.
        mlp_ratio: the decoder MLP's hidden width as a multiple of Dd.
        mask_ratio: the default fraction of patches to mask, in ``[0, 1)``.
        norm_pix_loss: predict per-patch normalised pixels (:func:`mae_loss`'s ``norm_pix``).
    """

    def __init__(
        self,
        encoder: ViT,
        decoder_embed_dim: int = 64,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, ViT):
            raise ValueError(f"encoder: expected a minivfm ViT, got {type(encoder).__name__}")
        if not encoder.patch_embed.patch_local:
            raise ValueError(
                f"encoder: MAE needs a stem that keeps each patch to itself (stem='patch'), got "
                f"{type(encoder.patch_embed).__name__}: "
                "a convolution that sees across patch borders leaks the pixels of masked patches into the "
                "visible tokens"
            )
        if encoder.num_classes != 0:
            raise ValueError(
                f"encoder: expected a ViT without a head (num_classes=0), got num_classes={encoder.num_classes}; "
                "pretraining does not train a head (load the encoder into a ViT with a head to fine-tune)"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: expected a fraction in [0, 1), got {mask_ratio!r}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        pe = encoder.patch_embed
        self.patch_size, self.image_size, self.in_chans = pe.patch_size, pe.image_size, pe.in_chans
        num_patches, D = pe.num_patches, encoder.embed_dim
        with torch.no_grad():  # MAE's fixed positions in the encoder
            encoder.pos_embed.copy_(sincos_pos_embed_2d(D, pe.grid_size, cls_token=True)[None])
        encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(D, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = sincos_pos_embed_2d(decoder_embed_dim, pe.grid_size, cls_token=True)[None]  # (1, 1+N, Dd)
        self.register_buffer("decoder_pos_embed", pos)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)
        self.num_patches = num_patches
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, *self.decoder_blocks.modules(), self.decoder_pred):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def patchify(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, N, P*P*C)``, the targets."""
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``(B, N, P*P*C) -> (B, C, H, W)``."""
        return unpatchify(patches, self.patch_size, self.image_size)

    def forward_encoder(
        self, images: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches only (the steps of ``ViT.forward_features``, masking between).

        Returns:
            ``latent`` ``(B, 1+K, D)`` (class token first), ``mask`` ``(B, N)`` and ``ids_restore``
            ``(B, N)`` from :func:`random_masking`.
        """
        enc = self.encoder
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        x = enc.patch_embed(images)  # (B, N, D), checks the input
        x = x + enc.pos_embed[:, 1:]  # positions before masking: each token keeps its own
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)  # (B, K, D)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1+K, D)
        x = enc.norm(enc.blocks(x))  # (B, 1+K, D)
        return x, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Encoded visible tokens ``(B, 1+K, D)`` -> predicted pixels of every patch ``(B, N, P*P*C)``."""
        x = self.decoder_embed(latent)  # (B, 1+K, Dd)
        B, K1, Dd = x.shape
        mask_tokens = self.mask_token.expand(B, ids_restore.shape[1] + 1 - K1, -1)  # (B, N-K, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, N, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, Dd))  # (B, N, Dd), original order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        x = self.decoder_norm(self.decoder_blocks(x))  # (B, 1+N, Dd)
        return self.decoder_pred(x)[:, 1:]  # (B, N, P*P*C), the class token dropped

    def forward(
        self, images: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Images ``(B, C, H, W)`` -> ``(loss, pred (B, N, P*P*C), mask (B, N))``."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)  # (B, N, P*P*C)
        loss = mae_loss(pred, self.patchify(images), mask, self.norm_pix_loss)
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(
        self, images: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The visible patches of ``images`` with the predicted ones in the masked places, ``(B, C, H, W)``.

        With ``norm_pix_loss`` the prediction is un-normalised with each masked patch's true mean and
        standard deviation (as MAE's visualisations do), so only the structure inside a patch is predicted.
        """
        _, pred, mask = self(images, mask_ratio, generator)
        target = self.patchify(images)  # (B, N, P*P*C)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        m = mask[..., None]  # (B, N, 1)
        return self.unpatchify(target * (1 - m) + pred * m)  # (B, C, H, W)

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights, for ``ViT(**cfg.encoder_kwargs()).load_state_dict(..., strict=True)``."""
        return self.encoder.state_dict()


# -- Lightning --------------------------------------------------------------------------------------


class LitMAE(L.LightningModule):
    """Pretrains an :class:`MAE` on unlabelled images; logs ``train/val/test`` ``loss`` (the masked-patch MSE).

    Arguments left ``None`` come from ``MAEConfig.preset()`` for the active profile. AdamW with
    betas (0.9, 0.95) and weight decay on weight matrices only, linear warmup then cosine decay per
    step. ``max_epochs`` trains nothing here: ``minivfm fit`` reads it from ``hparams``.
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
        decoder_embed_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_num_heads: int | None = None,
        mask_ratio: float | None = None,
        norm_pix_loss: bool | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        warmup_epochs: float | None = None,
        max_epochs: int | None = None,
        profile: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        fill_from_preset(self, MAEConfig.preset(profile))
        hp = self.hparams
        encoder = ViT(**headless_kwargs(hp, stem="patch"))
        self.model = MAE(
            encoder, hp.decoder_embed_dim, hp.decoder_depth, hp.decoder_num_heads, hp.mlp_ratio, hp.mask_ratio,
            hp.norm_pix_loss,
        )  # fmt: skip

    @classmethod
    def from_config(cls, cfg: MAEConfig, **overrides) -> LitMAE:
        """Build from a :class:`MAEConfig` (the fields that are constructor arguments)."""
        return cls(**{**preset_arguments(cfg, LitMAE), **overrides})

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model(images)  # (loss, pred, mask)

    def _step(self, batch: dict, stage: str) -> Tensor:
        images = batch["image"]
        loss, _, _ = self.model(images)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True,
                 batch_size=len(images))  # fmt: skip
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_epochs, (0.9, 0.95))


class _FineTune(L.LightningModule):
    """A ViT classifier trained end to end (cross-entropy, AdamW); only ``results()`` uses it."""

    def __init__(self, vit: ViT, lr: float, weight_decay: float, warmup_epochs: float) -> None:
        super().__init__()
        self.model, self.lr, self.weight_decay, self.warmup_epochs = vit, lr, weight_decay, warmup_epochs

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return F.cross_entropy(self.model(batch["image"]), batch["label"], label_smoothing=0.1)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.lr, self.weight_decay, self.warmup_epochs, (0.9, 0.999))


# -- results ----------------------------------------------------------------------------------------


def _loader(images: Tensor, labels: Tensor, batch_size: int) -> torch.utils.data.DataLoader:
    data = torch.utils.data.StackDataset(image=images, label=labels.long())
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(images) > batch_size)


def _features(vit: ViT, images: Tensor) -> Tensor:
    """Frozen features: the mean of the patch tokens after the final norm, ``(N, D)`` on the CPU."""
    return map_batches(vit, lambda x: vit.forward_features(x)[:, 1:].mean(1).float(), images)


def _accuracy(vit: ViT, images: Tensor, labels: Tensor) -> float:
    pred = map_batches(vit, lambda x: vit(x).argmax(-1), images)
    return (pred == labels).float().mean().item()


def _step_ratio(model: MAE, images: Tensor, repeats: int = 10, warmup: int = 3) -> float:
    """Seconds of one MAE step (forward and backward at its mask ratio) over one step of the same
    encoder on every token, each the median of ``repeats`` after ``warmup``."""
    model.train()
    enc = model.encoder

    def mae_step() -> None:
        model(images)[0].backward()

    def vit_step() -> None:
        enc.forward_features(images)[:, 0].pow(2).mean().backward()

    def median_seconds(step) -> float:
        times = []
        for i in range(warmup + repeats):
            if images.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if images.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        return statistics.median(times)

    return median_seconds(mae_step) / median_seconds(vit_step)


def results(profile: str) -> dict:
    """Pretrain the MAE under ``profile`` on Shapes scenes (seed 0), then measure:

    - ``recon_mse``: the masked-patch MSE (pixels in [-1, 1], per-patch normalised under
      ``norm_pix_loss``, as trained) on ``num_val`` held-out images (seed 2), one fixed mask; baseline:
      the mean training image in the masked places;
    - ``linear_probe_acc``: :func:`minivfm.metrics.linear_probe` on the frozen encoder's mean-pooled
      tokens, Shapes labels (train seed 3, test seed 4); baseline (and ``linear_probe_acc_random``):
      the same probe on a randomly initialised ViT of the same sizes;
    - ``finetune_acc_100``: a ViT initialised with the MAE encoder and fine-tuned end to end on 100
      labelled images per class (seed 3), tested on the probe's test set; baseline (and
      ``scratch_acc_100``): the same ViT trained from scratch on the same images;
    - ``step_ratio``: the time of one MAE training step over that of the same encoder on all tokens;
    - ``seconds``: everything above.
    """
    from minivfm import metrics
    from minivfm.data import shapes_in_memory

    cfg = MAEConfig.preset(profile)
    start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    train = shapes_in_memory(cfg.num_train, cfg.image_size, seed=0)
    x_train = train.images * 2 - 1  # (N, C, H, W) in [-1, 1]
    lit = LitMAE.from_config(cfg)
    results_trainer(cfg.max_epochs, profile).fit(lit, _loader(x_train, train.labels, cfg.batch_size))
    mae = lit.model.eval()
    device = next(mae.parameters()).device

    # masked-patch MSE on held-out images with one fixed mask, and the mean training image's
    x_val = shapes_in_memory(cfg.num_val, cfg.image_size, seed=2).images * 2 - 1
    mean_patches = mae.patchify(x_train.mean(0, keepdim=True))  # (1, N, P*P*C)
    if mae.norm_pix_loss:  # the loss compares per-patch normalised pixels: normalise the baseline too
        var = mean_patches.var(dim=-1, keepdim=True)
        mean_patches = (mean_patches - mean_patches.mean(dim=-1, keepdim=True)) / (var + 1.0e-6) ** 0.5
    generator = torch.Generator(device).manual_seed(0)
    recon, mean_mse = [], []
    with torch.no_grad():
        for x in x_val.split(500):
            x = x.to(device)
            _, pred, mask = mae(x, generator=generator)
            target = mae.patchify(x)
            recon.append(mae_loss(pred.float(), target, mask, mae.norm_pix_loss).item() * len(x))
            baseline = mean_patches.to(device).expand_as(target)
            mean_mse.append(mae_loss(baseline, target, mask, mae.norm_pix_loss).item() * len(x))

    # linear probes: the MAE encoder and a random one of the same sizes
    probe_train = shapes_in_memory(cfg.num_probe_train, cfg.image_size, seed=3)
    probe_test = shapes_in_memory(cfg.num_probe_test, cfg.image_size, seed=4)
    xtr, xte = probe_train.images * 2 - 1, probe_test.images * 2 - 1
    ytr, yte = probe_train.labels, probe_test.labels

    def probe(vit: ViT) -> float:
        return metrics.linear_probe(_features(vit, xtr), ytr, _features(vit, xte), yte)

    torch.manual_seed(1)
    random_vit = ViT(**cfg.encoder_kwargs()).to(device)
    probe_acc, probe_random = probe(mae.encoder), probe(random_vit)

    # fine-tuning on 100 labels per class: from the MAE encoder and from scratch
    num_classes = probe_train.num_classes
    idx = torch.cat([(ytr == k).nonzero().flatten()[:100] for k in range(num_classes)])

    def finetune(state: dict | None) -> float:
        torch.manual_seed(2)
        vit = ViT(**{**cfg.encoder_kwargs(), "num_classes": num_classes})
        if state is not None:
            missing, unexpected = vit.load_state_dict(state, strict=False)
            assert set(missing) == {"head.weight", "head.bias"} and not unexpected, (missing, unexpected)
        lit_ft = _FineTune(vit, cfg.lr, cfg.weight_decay, cfg.warmup_epochs)
        results_trainer(cfg.finetune_epochs, profile).fit(lit_ft, _loader(xtr[idx], ytr[idx], min(64, cfg.batch_size)))
        return _accuracy(vit, xte, yte)

    finetune_acc, scratch_acc = finetune(mae.encoder_state_dict()), finetune(None)
    step_ratio = _step_ratio(mae, x_val[: cfg.batch_size].to(device))
    mae.eval()
    return {
        "recon_mse": sum(recon) / len(x_val), "linear_probe_acc": probe_acc, "linear_probe_acc_random": probe_random,
        "finetune_acc_100": finetune_acc, "scratch_acc_100": scratch_acc, "step_ratio": step_ratio,
        "seconds": time.perf_counter() - start,
        "baselines": {
            "recon_mse": sum(mean_mse) / len(x_val), "linear_probe_acc": probe_random,
            "finetune_acc_100": scratch_acc, "step_ratio": 1.0,
        },
    }  # fmt: skip
