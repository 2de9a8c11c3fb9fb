"""VAE and VQ-VAE: the pure functions, the modules, the Lightning wrappers."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from minivfm.models.vae import (
    VAE,
    VQVAE,
    LitVAE,
    LitVQVAE,
    VAEConfig,
    VQVAEConfig,
    codebook_usage,
    elbo_loss,
    kl_divergence,
    quantize,
    reparameterize,
    vq_losses,
)

SMALL = dict(in_channels=3, image_size=16, channels=(8, 16))


def _images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, size: int = 16):
        self.x = _images(n, size, seed=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": i % 3}


def _trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    args.update(kw)
    return L.Trainer(**args)


# ----------------------------------------------------------------------------- reparameterize, KL, ELBO


def test_reparameterize_with_given_noise_is_mu_plus_sigma_noise():
    mu, logvar, noise = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(reparameterize(mu, logvar, noise), mu + torch.exp(logvar / 2) * noise)


def test_reparameterize_statistics():
    torch.manual_seed(0)
    mu = torch.tensor([-2.0, 0.0, 3.0])
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.25)])
    z = reparameterize(mu.expand(200_000, 3), logvar.expand(200_000, 3))
    torch.testing.assert_close(z.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0, 0.5]), atol=0.02, rtol=0)


def test_reparameterize_gradients_reach_mu_and_logvar():
    mu = torch.randn(5, requires_grad=True)
    logvar = torch.randn(5, requires_grad=True)
    noise = torch.randn(5)
    reparameterize(mu, logvar, noise).sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(5))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(logvar.detach() / 2) * noise)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    assert torch.equal(kl_divergence(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)), torch.zeros(3))
    kl = kl_divergence(torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2))
    assert kl.shape == (3,) and (kl > 0).all()


def test_kl_matches_torch_distributions_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(2, 6), torch.randn(2, 6) * 0.5
    q = torch.distributions.Normal(mu, torch.exp(logvar / 2))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    exact = kl_divergence(mu, logvar)
    torch.testing.assert_close(exact, torch.distributions.kl_divergence(q, p).sum(1))
    z = q.sample((200_000,))  # (S, 2, 6)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(mc, exact, atol=0.05, rtol=0.02)


def test_elbo_loss_is_summed_squared_error_plus_beta_kl():
    x, x_rec = _images(4), _images(4, seed=2)
    mu, logvar = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    sse = (x - x_rec).pow(2).sum((1, 2, 3))
    kl = kl_divergence(mu, logvar)
    torch.testing.assert_close(elbo_loss(x, x_rec, mu, logvar, beta=0.0), sse.mean())
    torch.testing.assert_close(elbo_loss(x, x_rec, mu, logvar, beta=3.0), (sse + 3 * kl).mean())


# ----------------------------------------------------------------------------- VQ


def test_quantize_picks_the_nearest_code():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(10, 5, generator=g)
    z = torch.randn(2, 3, 3, 5, generator=g)
    z_q, idx = quantize(z, codebook)
    brute = torch.cdist(z.reshape(-1, 5), codebook).argmin(1).reshape(2, 3, 3)
    assert idx.dtype == torch.long and torch.equal(idx, brute)
    torch.testing.assert_close(z_q, codebook[idx])
    z_q, idx = quantize(codebook[[3, 7, 3]], codebook)  # codes map onto themselves
    assert idx.tolist() == [3, 7, 3]


def test_quantize_straight_through_gradient():
    codebook = torch.randn(10, 5, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    z_q, _ = quantize(z, codebook)
    upstream = torch.randn(4, 5)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # copied unchanged
    assert codebook.grad is None  # only the codebook loss moves the codes


def test_vq_losses_route_gradients():
    codebook = torch.randn(10, 5, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    _, idx = quantize(z, codebook)
    codebook_loss, commitment_loss = vq_losses(z, codebook, idx)
    torch.testing.assert_close(codebook_loss, commitment_loss)  # same value, different gradients
    (g_code,) = torch.autograd.grad(codebook_loss, [codebook], retain_graph=True)
    assert g_code.abs().sum() > 0
    assert torch.autograd.grad(codebook_loss, [z], allow_unused=True)[0] is None
    assert torch.autograd.grad(commitment_loss, [codebook], allow_unused=True)[0] is None


def test_codebook_usage():
    perplexity, used = codebook_usage(torch.arange(8).repeat(3), 8)
    assert perplexity.item() == pytest.approx(8.0) and used.item() == 1.0
    perplexity, used = codebook_usage(torch.full((10,), 2), 8)
    assert perplexity.item() == pytest.approx(1.0) and used.item() == 1 / 8


# ----------------------------------------------------------------------------- modules


def test_vae_shapes_and_latent_is_a_small_spatial_map():
    cfg = VAEConfig.preset("ci")
    vae = VAE(cfg.in_channels, cfg.image_size, cfg.channels, cfg.latent_channels)
    x = _images(2, 32)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (2, 4, 8, 8)
    assert vae.decode(mu).shape == x.shape
    x_rec, mu, logvar = vae(x)
    assert x_rec.shape == x.shape
    for out in (vae.sample(3), vae.reconstruct(x), vae.interpolate(x[0], x[1], steps=5)):
        assert out.shape[1:] == x.shape[1:] and out.min() >= -1 and out.max() <= 1
    assert vae.interpolate(x[0], x[1], steps=5).shape[0] == 5


def test_vae_interpolation_ends_are_the_reconstructions():
    vae = VAE(**SMALL).eval()
    x = _images(2)
    line = vae.interpolate(x[0], x[1], steps=4)
    torch.testing.assert_close(line[[0, -1]], vae.reconstruct(x))


def test_vae_sample_is_seeded():
    vae = VAE(**SMALL).eval()
    a = vae.sample(2, generator=torch.Generator().manual_seed(0))
    b = vae.sample(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_gradients_reach_every_vae_parameter():
    vae = VAE(**SMALL)
    x = _images()
    x_rec, mu, logvar = vae(x)
    elbo_loss(x, x_rec, mu, logvar).backward()
    missing = [n for n, p in vae.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_gradients_reach_every_vqvae_parameter():
    vq = VQVAE(**SMALL, embed_dim=4, num_codes=8)
    x = _images()
    x_rec, _, codebook_loss, commitment_loss = vq(x)
    ((x_rec - x).pow(2).mean() + codebook_loss + 0.25 * commitment_loss).backward()
    missing = [n for n, p in vq.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_vqvae_tokens_round_trip():
    vq = VQVAE(**SMALL, embed_dim=4, num_codes=8).eval()
    x = _images()
    tokens = vq.tokenize(x)
    assert tokens.shape == (4, 4, 4) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 8
    torch.testing.assert_close(vq.decode_indices(tokens), vq.reconstruct(x))


@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_presets_build(profile):
    cfg = VAEConfig.preset(profile)
    vae = VAE(cfg.in_channels, cfg.image_size, cfg.channels, cfg.latent_channels)
    assert vae.latent_shape == (4, 8, 8)
    qcfg = VQVAEConfig.preset(profile)
    LitVQVAE.from_config(qcfg)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: reparameterize(torch.zeros(2, 3), torch.zeros(2, 4)), "logvar"),
        (lambda: reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3)), "noise"),
        (lambda: kl_divergence(torch.zeros(2, 3), torch.zeros(3, 2)), "logvar"),
        (lambda: elbo_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.zeros(2)), "x_rec"),
        (lambda: elbo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), -1.0), "beta"),
        (lambda: quantize(torch.zeros(2, 3), torch.zeros(5, 4)), "z"),
        (lambda: quantize(torch.zeros(2, 4), torch.zeros(5)), "codebook"),
        (lambda: VAE(image_size=30, channels=(8, 16)), "image_size"),
        (lambda: VAE(channels=()), "channels"),
        (lambda: VAE(latent_channels=0), "latent_channels"),
        (lambda: VAE(**SMALL).encode(torch.zeros(1, 1, 16, 16)), "x"),
        (lambda: VAE(**SMALL).decode(torch.zeros(1, 3, 4, 4)), "z"),
        (lambda: VAE(**SMALL).interpolate(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), steps=1), "steps"),
        (lambda: VAE(**SMALL).sample(0), "num_samples"),
        (lambda: VQVAE(num_codes=0), "num_codes"),
        (lambda: LitVAE(beta=-1), "beta"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


# ----------------------------------------------------------------------------- Lightning


@pytest.mark.parametrize("lit", ["vae", "vqvae"])
def test_lightning_steps_and_checkpoint_loads_with_weights_only(tmp_path, lit):
    L.seed_everything(0)
    if lit == "vae":
        model = LitVAE(**SMALL, latent_channels=2)
    else:
        model = LitVQVAE(**SMALL, embed_dim=4, num_codes=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(_Images(), batch_size=8)
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=1)
    trainer.fit(model, loader, loader)
    assert trainer.global_step == 4
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {"train/loss", "train/recon_mse", "val/loss"} <= set(trainer.callback_metrics)
    if lit == "vqvae":
        assert {"train/perplexity", "train/codes_used"} <= set(trainer.callback_metrics)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    cls = type(model)
    restored = cls.load_from_checkpoint(path, weights_only=True)
    assert ckpt["hyper_parameters"]["image_size"] == 16
    for k, v in model.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k


def test_dead_codes_are_restarted_on_encoder_outputs(tmp_path):
    L.seed_everything(0)
    model = LitVQVAE(**SMALL, embed_dim=4, num_codes=8)
    with torch.no_grad():
        model.model.quantizer.codebook[1:] = 1e3  # unreachable: only code 0 is ever picked
    loader = torch.utils.data.DataLoader(_Images(16), batch_size=8)
    _trainer(tmp_path, max_steps=-1, max_epochs=1).fit(model, loader)
    codebook = model.model.quantizer.codebook.detach()
    assert (codebook[1:].abs() < 100).all()  # moved onto encoder outputs
    _, used = codebook_usage(model.model.tokenize(_images(8)), 8)
    assert used > 1 / 8


# -- lesson checks ----------------------------------------------------------------------------------------


def _nearest(z, codebook):
    flat = z.reshape(-1, z.shape[-1])
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
    return dist.argmin(dim=1).reshape(z.shape[:-1])


def _rep_crashes_on_none(mu, logvar, noise=None):  # right with noise given, never draws its own
    return mu + torch.exp(0.5 * logvar) * noise


def _rep_no_default(mu, logvar, noise):  # the documented default noise=None is missing
    return mu + torch.exp(0.5 * logvar) * noise


def _rep_wrong_noise_shape(mu, logvar, noise=None):  # draws noise of a shape of its own
    if noise is None:
        noise = torch.randn(mu.shape[-1])[:2]
    return mu + torch.exp(0.5 * logvar) * noise


def _rep_uniform_noise(mu, logvar, noise=None):
    if noise is None:
        noise = torch.rand_like(mu)
    return mu + torch.exp(0.5 * logvar) * noise


def _rep_no_noise(mu, logvar, noise=None):  # noise=None silently means no noise
    if noise is None:
        return mu + 0 * logvar
    return mu + torch.exp(0.5 * logvar) * noise


def _q_gradient_to_codebook(z, codebook):  # right values and gradient to z, but the codebook gets one too
    e = codebook[_nearest(z, codebook)]
    return e + (z - z.detach()), _nearest(z, codebook)


def _q_no_straight_through(z, codebook):  # z_q = e: the gradient reaches the codebook, not z
    indices = _nearest(z, codebook)
    return codebook[indices], indices


def _q_flat_indices(z, codebook):  # forgets to reshape the indices back to z.shape[:-1]
    indices = _nearest(z, codebook)
    return z + (codebook[indices] - z).detach(), indices.flatten()


def _q_broadcasting(z, codebook):  # distances without flattening z: a broadcasting error inside
    dist = (z[:, None] - codebook).pow(2).sum(-1)
    indices = dist.argmin(1)
    return z + (codebook[indices] - z).detach(), indices


def test_vae_checks_pass_the_library(capsys):
    from minivfm.course.checks import vae as checks

    state = torch.random.get_rng_state()
    checks.check_reparameterize(reparameterize)
    assert torch.equal(torch.random.get_rng_state(), state)  # the noise=None path leaves the global RNG alone
    checks.check_kl_divergence(kl_divergence)
    checks.check_elbo_loss(elbo_loss)
    checks.check_quantize(quantize)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("✓ ") for line in lines), lines


WRONG_IMPLEMENTATIONS = [  # (check, a wrong implementation, what its failure message must say)
    ("check_reparameterize", _rep_crashes_on_none, r"without noise \(noise=None\) raised TypeError.*randn_like"),
    ("check_reparameterize", _rep_no_default, r"raised TypeError.*noise=None"),
    ("check_reparameterize", _rep_wrong_noise_shape, r"noise=None.*raised RuntimeError.*the shape of mu"),
    ("check_reparameterize", _rep_uniform_noise, r"expected about 0 and 1.*randn_like"),
    ("check_reparameterize", _rep_no_noise, r"no noise was drawn.*randn_like"),
    ("check_quantize", _q_gradient_to_codebook, r"gradient of z_q reaches the codebook.*\(e - z\)\.detach\(\)"),
    ("check_quantize", _q_no_straight_through, r"no gradient reaches the encoder output z.*straight-through"),
    ("check_quantize", _q_flat_indices, r"expected shape \(4, 6, 6\), got \(144\)\. Hint: .*z\.shape\[:-1\]"),
    ("check_quantize", _q_broadcasting, r"raised RuntimeError.*Hint: .*reshape\(-1, D\)"),
]


@pytest.mark.parametrize(
    "check, wrong, message", WRONG_IMPLEMENTATIONS, ids=[w.__name__[1:] for _, w, _ in WRONG_IMPLEMENTATIONS]
)
def test_vae_checks_fail_wrong_implementations_with_a_hint(check, wrong, message):
    from minivfm.course.checks import vae as checks

    with pytest.raises(AssertionError, match=message) as err:
        getattr(checks, check)(wrong)
    assert "Hint:" in str(err.value)


@pytest.mark.slow
def test_vae_learns_shapes_better_than_the_mean_image(tmp_path):
    from minivfm.data import Shapes, collate

    cfg = VAEConfig.preset("ci")
    L.seed_everything(0)
    train = torch.utils.data.DataLoader(Shapes(cfg.num_train, seed=0), batch_size=cfg.batch_size, shuffle=True,
                                        collate_fn=collate)
    test_x = collate([Shapes(128, seed=5)[i] for i in range(128)])["image"]
    model = LitVAE.from_config(cfg)
    _trainer(tmp_path, max_steps=-1, max_epochs=cfg.max_epochs).fit(model, train)
    mse = (model.model.eval().reconstruct(test_x) - test_x).pow(2).mean().item()
    baseline = (test_x - test_x.mean(0, keepdim=True)).pow(2).mean().item()
    assert mse < 0.7 * baseline, (mse, baseline)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vae", "vqvae"])
def test_results_ci_beats_the_mean_image(name: str) -> None:
    """``minivfm results vae vqvae`` under ci: every metric has its baseline, and even the tiny ci
    models reconstruct better than the mean training image does."""
    from minivfm.results import runner

    out = runner(name)("ci")
    assert out["seconds"] > 0 and set(out["baselines"]) <= set(out)
    assert out["recon_mse"] < out["baselines"]["recon_mse"], out
    if name == "vae":
        assert out["sample_fd"] > out["baselines"]["sample_fd"] > 0, out  # the real-data floor is a floor
    else:
        assert out["baselines"]["codes_used"] < out["codes_used"] <= 1, out
