"""DDPM: the noise schedule against diffusers, the pure functions, the denoiser, training."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from minivfm.models import ddpm
from minivfm.models.ddpm import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
ATOL, RTOL = 1e-6, 1e-5
TIMESTEPS = [0, 1, 2, 10, 100, 250, 500, 750, 990, 998, 999]


def _ddpm_ref(schedule: str):
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=DIFFUSERS_SCHEDULE[schedule],
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=False,
    )


def _ddim_ref(schedule: str, steps: int):
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=DIFFUSERS_SCHEDULE[schedule],
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    ref.set_timesteps(steps)
    return ref


def _shapes(num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` Shapes images (seed 0) in [-1, 1] and their labels."""
    from minivfm.data import shapes_in_memory

    data = shapes_in_memory(num, 32, seed=0)
    return data.images * 2 - 1, data.labels


def _close(a, b, atol=ATOL, rtol=RTOL):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs error {err:.3g}"


# -- the schedule against diffusers -------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_betas_and_alphas_cumprod_match_diffusers(schedule):
    ours, ref = NoiseSchedule(1000, schedule), _ddpm_ref(schedule)
    assert ours.betas.dtype == ref.betas.dtype == torch.float32
    assert ours.alphas_cumprod.dtype == ref.alphas_cumprod.dtype
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_matches_diffusers(schedule):
    ours, ref = NoiseSchedule(1000, schedule), _ddpm_ref(schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(TIMESTEPS), 3, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor(TIMESTEPS)
    _close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", TIMESTEPS)
def test_step_matches_diffusers(schedule, t):
    ours, ref = NoiseSchedule(1000, schedule), _ddpm_ref(schedule)
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(4, 3, 8, 8, generator=g)
    eps = torch.randn(x_t.shape, generator=g)
    # diffusers draws its noise with torch.randn(shape, generator=...): reproduce it from the same seed
    expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(123)).prev_sample
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(123))
    _close(ours.step(eps, t, x_t, noise), expected)
    # the predicted x0 is diffusers' pred_original_sample
    x0_ref = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
    _close(ours.predict_x0(eps, t, x_t), x0_ref)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 10, 50, 1000])
def test_ddim_step_matches_diffusers(schedule, steps):
    ours, ref = NoiseSchedule(1000, schedule), _ddim_ref(schedule, steps)
    assert ours.ddim_timesteps(steps) == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(steps)
    ts = ref.timesteps.tolist()
    # every step of a schedule of `steps` (all 1000 for the last one: a subset to keep the test fast)
    if len(ts) > 60:
        ts = ts[:20] + ts[480:500] + ts[-20:]
    ratio = 1000 // steps
    for t in ts:
        x_t = torch.randn(2, 3, 8, 8, generator=g)
        eps = torch.randn(x_t.shape, generator=g)
        expected = ref.step(eps, t, x_t, eta=0.0).prev_sample
        _close(ours.ddim_step(eps, t, t - ratio, x_t), expected)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_trajectory_matches_diffusers(schedule):
    """A whole 50-step DDIM chain with a fixed epsilon function stays within tolerance."""
    ours, ref = NoiseSchedule(1000, schedule), _ddim_ref(schedule, 50)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()

    def eps_fn(z, t):
        return torch.tanh(z) * (1 + t / 1000)

    ts = ours.ddim_timesteps(50)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = ours.ddim_step(eps_fn(x, t), t, t_prev, x)
        y = ref.step(eps_fn(y, t), t, y).prev_sample
    _close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_eta_matches_diffusers(schedule):
    ours, ref = NoiseSchedule(1000, schedule), _ddim_ref(schedule, 20)
    g = torch.Generator().manual_seed(5)
    x_t, eps, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    for t in (950, 500, 0):
        expected = ref.step(eps, t, x_t, eta=0.7, variance_noise=noise).prev_sample
        _close(ours.ddim_step(eps, t, t - 50, x_t, eta=0.7, noise=noise), expected)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_clip_sample_matches_diffusers(schedule):
    """With clip_sample the predicted x0 is clamped, as diffusers' clip_sample=True (range 1)."""
    ref = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule], clip_sample=True)
    ref_ddim = diffusers.DDIMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule], clip_sample=True)
    ref_ddim.set_timesteps(50)
    ours = NoiseSchedule(1000, schedule)
    g = torch.Generator().manual_seed(7)
    for t in (999, 600, 100, 0):
        x_t, eps = torch.randn(2, 3, 8, 8, generator=g) * 2, torch.randn(2, 3, 8, 8, generator=g)
        expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
        _close(ours.step(eps, t, x_t, noise, clip_sample=1.0), expected)
    for t in (980, 500, 0):
        x_t, eps = torch.randn(2, 3, 8, 8, generator=g) * 2, torch.randn(2, 3, 8, 8, generator=g)
        _close(ours.ddim_step(eps, t, t - 20, x_t, clip_sample=1.0), ref_ddim.step(eps, t, x_t).prev_sample)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dynamic_thresholding_matches_diffusers(schedule):
    """threshold=r is diffusers' thresholding=True with dynamic_thresholding_ratio=r (our s has no upper
    bound: diffusers' sample_max_value is set out of reach); use_clipped_model_output as diffusers'."""
    kw = dict(beta_schedule=DIFFUSERS_SCHEDULE[schedule], thresholding=True, dynamic_thresholding_ratio=0.99,
              sample_max_value=1e9)  # fmt: skip
    ref = diffusers.DDPMScheduler(**kw)
    ref_ddim = diffusers.DDIMScheduler(**kw)
    ref_ddim.set_timesteps(50)
    ours = NoiseSchedule(1000, schedule)
    g = torch.Generator().manual_seed(11)
    for t in (999, 600, 100, 0):
        x_t, eps = torch.randn(2, 3, 8, 8, generator=g) * 3, torch.randn(2, 3, 8, 8, generator=g) * 3
        expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
        _close(ours.step(eps, t, x_t, noise, threshold=0.99), expected)
    for t in (980, 500, 20):
        x_t, eps = torch.randn(2, 3, 8, 8, generator=g) * 3, torch.randn(2, 3, 8, 8, generator=g) * 3
        for clipped in (False, True):
            expected = ref_ddim.step(eps, t, x_t, use_clipped_model_output=clipped).prev_sample
            _close(ours.ddim_step(eps, t, t - 20, x_t, threshold=0.99, use_clipped_model_output=clipped), expected)
    x0 = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([0.5, 1.5, 3.0, 6.0]).reshape(-1, 1, 1, 1)
    capped = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    _close(ddpm.dynamic_threshold(x0, 0.9, max_value=2.5), capped._threshold_sample(x0))


def test_dynamic_threshold_properties():
    g = torch.Generator().manual_seed(0)
    inside = torch.rand(2, 3, 8, 8, generator=g) * 1.8 - 0.9
    assert torch.equal(ddpm.dynamic_threshold(inside, 0.99), inside)  # s = 1: in-range samples are untouched
    x0 = torch.randn(3, 3, 8, 8, generator=g) * torch.tensor([1.0, 4.0, 10.0]).reshape(-1, 1, 1, 1)
    out = ddpm.dynamic_threshold(x0, 0.95)
    assert out.abs().max() <= 1.0
    for i in range(3):  # each sample on its own: the same as thresholding it alone
        assert torch.equal(out[i : i + 1], ddpm.dynamic_threshold(x0[i : i + 1], 0.95))
    big = x0[2].abs().flatten()
    s = big.quantile(0.95)
    assert torch.allclose(out[2], x0[2].clamp(-s, s) / s)  # pixels below the quantile keep their ratios
    assert (ddpm.dynamic_threshold(x0, 1.0).abs().amax((1, 2, 3)) == 1).all()  # ratio 1: scale by the max
    for bad in (0.0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="threshold"):
            NoiseSchedule().step(torch.zeros(1, 2), 5, torch.zeros(1, 2), threshold=bad)
        with pytest.raises(ValueError, match="threshold"):
            NoiseSchedule().ddim_step(torch.zeros(1, 2), 5, 1, torch.zeros(1, 2), threshold=bad)
        with pytest.raises(ValueError, match="threshold"):  # the functional form the lesson rebuilds
            ddpm.ddim_update(torch.zeros(1, 2), torch.zeros(1, 2), 5, 1, NoiseSchedule().alphas_cumprod, threshold=bad)
        with pytest.raises(ValueError, match="ratio"):
            ddpm.dynamic_threshold(torch.zeros(1, 2), bad)
    with pytest.raises(ValueError, match="threshold"):
        ddpm.LitDDPM(threshold=2.0)


# -- properties ----------------------------------------------------------------------------------------


def test_add_noise_broadcasts_over_any_shape():
    s = NoiseSchedule()
    for shape in [(5,), (5, 7), (5, 4, 6, 6), (5, 2, 3, 4, 4)]:
        x0, noise = torch.randn(shape), torch.randn(shape)
        t = torch.tensor([0, 10, 100, 500, 999])
        out = s.add_noise(x0, noise, t)
        assert out.shape == x0.shape
        abar = s.alphas_cumprod[t].reshape(-1, *([1] * (len(shape) - 1)))
        _close(out, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_step_with_zero_noise_is_posterior_mean():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    for t in (1, 300, 999):
        abar, abar_prev = s.alphas_cumprod[t].double(), s.alphas_cumprod[t - 1].double()
        eps = (x_t - abar.sqrt().float() * x0) / (1 - abar).sqrt().float()  # the epsilon that predicts x0
        beta = 1 - abar / abar_prev
        mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0.double() + (
            (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
        ) * x_t.double()
        _close(s.step(eps, t, x_t, torch.zeros_like(x_t)), mean.float(), atol=1e-4, rtol=1e-4)
        assert torch.equal(s.step(eps, t, x_t, torch.zeros_like(x_t)), s.step(eps, t, x_t))
        noise = torch.randn(x_t.shape, generator=g)
        diff = s.step(eps, t, x_t, noise) - s.step(eps, t, x_t)
        _close(diff, s.posterior_variance(t).sqrt() * noise)


def test_step_at_t0_returns_predicted_x0():
    s = NoiseSchedule()
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    _close(s.step(eps, 0, x_t, torch.randn_like(x_t)), s.predict_x0(eps, 0, x_t))


def test_ddim_last_step_goes_to_x0():
    s = NoiseSchedule(1000, "cosine")
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in (0, 20, 999):
        _close(s.ddim_step(eps, t, -1, x_t), s.predict_x0(eps, t, x_t))
        _close(s.ddim_step(eps, t, -7, x_t), s.predict_x0(eps, t, x_t))


def test_cosine_schedule_properties():
    s = NoiseSchedule(1000, "cosine")
    abar = s.alphas_cumprod.double()
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    assert s.betas[-1] == pytest.approx(0.999)  # the cap is hit at the very end
    assert (abar[1:] < abar[:-1]).all()  # strictly decreasing
    assert abar[0] > 0.9999 and abar[-1] < 1e-6
    # alpha-bar follows f(t)/f(0) with f(u) = cos^2((u + s)/(1 + s) pi/2) (Nichol & Dhariwal eq. 17)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert abar[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-4)
    # the cosine schedule destroys information more slowly than the linear one in the middle
    assert abar[500] > NoiseSchedule(1000, "linear").alphas_cumprod[500]


def test_linear_schedule_endpoints():
    s = NoiseSchedule(1000, "linear")
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1] < 1e-4


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: NoiseSchedule(schedule="quadratic"), "schedule"),
        (lambda: NoiseSchedule(num_steps=0), "num_steps"),
        (lambda: NoiseSchedule(num_steps=10.0), "num_steps"),
        (lambda: NoiseSchedule().step(torch.zeros(2, 3), 1000, torch.zeros(2, 3)), "t"),
        (lambda: NoiseSchedule().step(torch.zeros(2, 3), -1, torch.zeros(2, 3)), "t"),
        (lambda: NoiseSchedule().step(torch.zeros(2, 3), 1.5, torch.zeros(2, 3)), "t"),
        (lambda: NoiseSchedule().step(torch.zeros(2, 4), 5, torch.zeros(2, 3)), "eps"),
        (lambda: NoiseSchedule().step(torch.zeros(2, 3), 5, torch.zeros(2, 3), torch.zeros(3)), "noise"),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1])), "t"),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 3), torch.zeros(2, 3), 5), "t"),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1, 1000])), "t"),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 1.0])), "t"),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 3), torch.zeros(2, 2), torch.tensor([1, 2])), "noise"),
        (lambda: NoiseSchedule().ddim_step(torch.zeros(2), 10, 10, torch.zeros(2)), "t_prev"),
        (lambda: NoiseSchedule().ddim_step(torch.zeros(2), 10, 5, torch.zeros(2), eta=-1.0), "eta"),
        (lambda: NoiseSchedule().ddim_step(torch.zeros(2), 10, 5, torch.zeros(2), eta=0.5), "noise"),
        (lambda: NoiseSchedule().ddim_timesteps(0), "num_inference_steps"),
        (lambda: NoiseSchedule().step(torch.zeros(2), 5, torch.zeros(2), clip_sample=-1.0), "clip_sample"),
        (lambda: NoiseSchedule().ddim_step(torch.zeros(2), 5, 1, torch.zeros(2), clip_sample=0), "clip_sample"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value)


def test_cfg_mix():
    c, u = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    _close(ddpm.cfg_mix(c, u, 1.0), c)  # u + (c - u): equal up to float rounding
    assert torch.equal(ddpm.cfg_mix(c, u, 0.0), u)
    _close(ddpm.cfg_mix(c, u, 3.0), u + 3 * (c - u))


# -- the denoiser, the loss, the samplers ---------------------------------------------------------------


def _tiny_unet(**kw):
    args = dict(in_channels=3, image_size=16, channels=(16, 32), num_classes=5, patch=2, emb_dim=32)
    args.update(kw)
    return ddpm.UNet(**args)


def test_unet_shapes_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = _tiny_unet()
    # zero-initialised output and residual convs would block gradients on the first step: perturb them
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 4, 5])
    out = net(x, t, y)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


@pytest.mark.parametrize("kw", [dict(patch=1, channels=(16, 32, 32)), dict(in_channels=4, image_size=8, patch=1)])
def test_unet_other_layouts(kw):
    net = _tiny_unet(**kw)
    c, s = net.in_channels, net.image_size
    assert net(torch.randn(2, c, s, s), torch.tensor([3, 4]), None).shape == (2, c, s, s)


def test_unet_bad_inputs():
    net = _tiny_unet()
    with pytest.raises(ValueError, match="x must"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="y must"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="image_size"):
        _tiny_unet(image_size=12, patch=4)


def test_v_parametrised_output_is_an_eps_prediction():
    """With alphas_cumprod, forward returns sqrt(1 - a) x_t + sqrt(a) v, v being the body's output."""
    torch.manual_seed(0)
    ac = NoiseSchedule(1000, "cosine").alphas_cumprod
    plain, vnet = _tiny_unet(), _tiny_unet(alphas_cumprod=ac)
    vnet.load_state_dict(plain.state_dict())  # the buffer is not part of the state dict
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.01 * torch.randn_like(p))
        vnet.load_state_dict(plain.state_dict())
        x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([0, 1, 5])
        v = plain(x, t, y)
        a = ac[t].reshape(-1, 1, 1, 1)
        _close(vnet(x, t, y), (1 - a).sqrt() * x + a.sqrt() * v, atol=1e-6)
    # a fresh (zero-output) network predicts eps ~ x_t at the noisiest step
    fresh = _tiny_unet(alphas_cumprod=ac)
    x = torch.randn(2, 3, 16, 16)
    _close(fresh(x, torch.tensor([999, 999])), x, atol=1e-3)


def test_null_class_is_the_unconditional_model():
    net = _tiny_unet().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
        x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 500])
        null = torch.full((3,), 5)
        assert torch.equal(net(x, t, None), net(x, t, null))
        assert not torch.allclose(net(x, t, torch.tensor([0, 1, 2])), net(x, t, null))


def test_guidance_scale_one_is_the_conditional_model():
    torch.manual_seed(0)
    net = _tiny_unet().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    s = NoiseSchedule(50)
    y = torch.tensor([0, 3])
    g0 = torch.Generator().manual_seed(0)
    a = ddpm.sample_ddim(net, s, (2, 3, 16, 16), y, 1.0, num_steps=5, generator=g0, clip_sample=None)
    x0 = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    x = x0
    ts = s.ddim_timesteps(5)
    with torch.no_grad():
        for i, t in enumerate(ts):
            eps = net(x, torch.full((2,), t), y)
            x = s.ddim_step(eps, t, ts[i + 1] if i + 1 < len(ts) else -1, x)
    _close(a, x, atol=1e-5)
    # and a scale of 3 gives something else
    g0 = torch.Generator().manual_seed(0)
    b = ddpm.sample_ddim(net, s, (2, 3, 16, 16), y, 3.0, num_steps=5, generator=g0, clip_sample=None)
    assert not torch.allclose(a, b)
    # the guided eps is cfg_mix of the two branches
    with torch.no_grad():
        xt, tt = torch.randn(2, 3, 16, 16), torch.tensor([7, 7])
        got = ddpm._guided_eps(net, xt, tt, y, 2.5)
        want = ddpm.cfg_mix(net(xt, tt, y), net(xt, tt, None), 2.5)
    _close(got, want, atol=1e-5)


def test_guidance_at_and_interval_checks():
    assert ddpm.guidance_at(900, 8.0) == 8.0  # no interval: every step
    assert ddpm.guidance_at(849, 8.0, (0, 850)) == 8.0
    assert ddpm.guidance_at(850, 8.0, (0, 850)) == 1.0  # hi is excluded
    assert ddpm.guidance_at(99, 8.0, (100, 850)) == 1.0 and ddpm.guidance_at(100, 8.0, (100, 850)) == 8.0
    net, s, y = _tiny_unet().eval(), NoiseSchedule(50), torch.tensor([0, 3])
    for bad in [(10, 10), (20, 10), (-1, 10), (0, 51), (0, 10.0), (0,), 850, (True, 10)]:
        for sampler in (ddpm.sample_ddim, ddpm.sample_ancestral):
            with pytest.raises(ValueError, match="guidance_interval"):
                sampler(net, s, (2, 3, 16, 16), y, 3.0, guidance_interval=bad)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_guidance_interval_guides_only_inside_it(sampler):
    """Inside (lo, hi) the step sees cfg_mix of the two branches, outside it the conditional eps alone."""
    torch.manual_seed(0)
    net = _tiny_unet().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    s, y, shape, interval = NoiseSchedule(50), torch.tensor([0, 3]), (2, 3, 16, 16), (10, 30)
    kw = dict(clip_sample=1.0, threshold=0.9)

    def run(**extra):
        g = torch.Generator().manual_seed(0)
        if sampler == "ddim":
            return ddpm.sample_ddim(net, s, shape, y, 3.0, num_steps=10, generator=g, **kw, **extra)
        return ddpm.sample_ancestral(net, s, shape, y, 3.0, generator=g, **kw, **extra)

    got = run(guidance_interval=interval)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    ts = s.ddim_timesteps(10) if sampler == "ddim" else list(reversed(range(50)))
    guided = 0
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((2,), t)
            eps = net(x, tt, y)
            if 10 <= t < 30:
                eps, guided = ddpm.cfg_mix(eps, net(x, tt, None), 3.0), guided + 1
            if sampler == "ddim":
                x = s.ddim_step(eps, t, ts[i + 1] if i + 1 < len(ts) else -1, x, use_clipped_model_output=True, **kw)
            else:
                x = s.step(eps, t, x, torch.randn(shape, generator=g) if t > 0 else None, **kw)
    assert 0 < guided < len(ts)
    _close(got, x, atol=1e-5)
    assert not torch.allclose(got, run(), atol=1e-3)  # guiding every step gives something else
    _close(run(guidance_interval=(0, 50)), run(), atol=1e-6)  # the whole range is every step


def test_ancestral_sampler_uses_step():
    net = _tiny_unet().eval()
    s = NoiseSchedule(20)
    g = torch.Generator().manual_seed(0)
    out, traj = ddpm.sample_ancestral(
        net, s, (2, 3, 16, 16), torch.tensor([1, 2]), generator=g, return_trajectory=True, trajectory_every=5
    )
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert len(traj) == 1 + 4 and torch.equal(traj[-1], out)


def test_ddpm_loss_and_label_dropout():
    eps = torch.randn(4, 3, 8, 8)
    assert ddpm.ddpm_loss(eps, eps) == 0
    assert ddpm.ddpm_loss(torch.zeros_like(eps), eps) == pytest.approx(eps.pow(2).mean().item())
    y = torch.arange(10000) % 12
    dropped = ddpm.drop_labels(y, 0.1, 12, generator=torch.Generator().manual_seed(0))
    frac = (dropped == 12).float().mean().item()
    assert 0.08 < frac < 0.12
    assert torch.equal(dropped[dropped != 12], y[dropped != 12])
    assert torch.equal(ddpm.drop_labels(y, 0.0, 12), y)


def test_weighted_loss_and_min_snr_weight():
    g = torch.Generator().manual_seed(0)
    pred, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))
    w = torch.tensor([1.0, 0.5, 0.0, 2.0])
    assert ddpm.ddpm_loss(pred, eps, w).item() == pytest.approx((w * per_sample).mean().item(), rel=1e-6)
    assert ddpm.ddpm_loss(pred, eps, torch.ones(4)).item() == pytest.approx(ddpm.ddpm_loss(pred, eps).item())
    with pytest.raises(ValueError, match="weight"):
        ddpm.ddpm_loss(pred, eps, torch.ones(3))

    s = ddpm.NoiseSchedule(1000, "cosine")
    t = torch.arange(1000)
    snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
    for gamma in (1.0, 5.0):
        w = ddpm.min_snr_weight(s.alphas_cumprod, t, gamma)
        assert w.shape == (1000,) and torch.isfinite(w).all() and (w > 0).all() and (w <= 1).all()
        assert torch.allclose(w, torch.minimum(snr, torch.tensor(gamma)) / snr)  # Hang et al. 2023
        assert (w[snr <= gamma] == 1).all() and (w[snr > gamma] < 1).all()
    assert ddpm.min_snr_weight(torch.tensor([0.0, 0.5]), torch.tensor([0, 1]), 1.0).tolist() == [1.0, 1.0]
    for bad in (0, -1.0, True, "5"):
        with pytest.raises(ValueError, match="gamma"):
            ddpm.min_snr_weight(s.alphas_cumprod, t, bad)


def test_training_step_uses_min_snr_weights():
    """The module's loss with min_snr_gamma equals the weighted loss computed by hand."""
    cfg = ddpm.DDPMConfig.preset("ci")
    x, y = _shapes(8)
    losses = {}
    for gamma in (0.0, 1.0):  # 0: the plain (unweighted) loss
        plain = dict(min_snr_gamma=gamma, p_uncond=0.0, t_sampling="uniform")
        model = ddpm.LitDDPM.from_config(dataclasses.replace(cfg, **plain))
        model.log = lambda *a, **k: None
        torch.manual_seed(0)
        losses[gamma] = model._step({"image": x, "label": y}, "train").item()
        torch.manual_seed(0)
        t = torch.randint(0, 1000, (8,))
        eps = torch.randn_like(x)
        with torch.no_grad():
            pred = model.model(model.schedule.add_noise(x, eps, t), t, y)
        w = None if gamma == 0 else ddpm.min_snr_weight(model.schedule.alphas_cumprod, t, gamma)
        assert losses[gamma] == pytest.approx(ddpm.ddpm_loss(pred, eps, w).item(), rel=1e-5)
    assert losses[1.0] < losses[0.0]


def test_sample_timesteps():
    g = torch.Generator().manual_seed(0)
    for method in ddpm.T_SAMPLING:
        t = ddpm.sample_timesteps(20000, 1000, method, generator=g)
        assert t.shape == (20000,) and t.dtype == torch.long and 0 <= t.min() and t.max() <= 999
    u = ddpm.sample_timesteps(20000, 1000, "uniform", generator=g).float()
    assert ((u >= 250) & (u < 750)).float().mean().item() == pytest.approx(0.5, abs=0.015)
    with pytest.raises(ValueError, match="t_sampling"):
        ddpm.sample_timesteps(4, 1000, "beta")
    for gone in ("lognormal", "logit_normal"):  # logit-normal is only the upper part of "split"
        with pytest.raises(ValueError, match="t_sampling"):
            ddpm.LitDDPM(t_sampling=gone)


def test_split_timesteps():
    """"split": low_fraction of the batch uniform below split_t, the rest logit-normal above it."""
    g = torch.Generator().manual_seed(0)
    t = ddpm.sample_timesteps(20000, 1000, "split", generator=g, split_t=300, low_fraction=0.5)
    low, high = t[:10000].float(), t[10000:].float()
    assert low.min() == 0 and low.max() == 299 and high.min() >= 300 and high.max() <= 999
    assert low.mean().item() == pytest.approx(149.5, abs=3)  # uniform on [0, 300)
    # truncated logit-normal: P(t < 500 | t >= 300) = (1/2 - Phi(logit 0.3)) / (1 - Phi(logit 0.3)) = 0.376
    assert (high < 500).float().mean().item() == pytest.approx(0.376, abs=0.015)
    for frac, n_low in ((0.3, 3), (0.0, 0), (1.0, 10)):
        assert (ddpm.sample_timesteps(10, 1000, "split", low_fraction=frac) < 300).sum().item() == n_low
    a = ddpm.sample_timesteps(64, 1000, "split", generator=torch.Generator().manual_seed(3), split_t=400)
    b = ddpm.sample_timesteps(64, 1000, "split", generator=torch.Generator().manual_seed(3), split_t=400)
    assert torch.equal(a, b) and (a[:32] < 400).all() and (a[32:] >= 400).all()
    for bad in (dict(split_t=0), dict(split_t=1000), dict(low_fraction=1.5), dict(low_fraction=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ddpm.sample_timesteps(4, 1000, "split", **bad)
    with pytest.raises(ValueError, match="low_fraction"):
        ddpm.LitDDPM(t_sampling="split", t_low_fraction=-0.1)
    with pytest.raises(ValueError, match="split_t"):
        ddpm.LitDDPM(t_sampling="split", t_split=1000)


def test_training_step_draws_split_timesteps():
    """The module trains on the timesteps of sample_timesteps("split", its t_split, its t_low_fraction)."""
    cfg = dataclasses.replace(ddpm.DDPMConfig.preset("ci"), p_uncond=0.0, min_snr_gamma=0.0, t_sampling="split",
                              t_split=200, t_low_fraction=0.25)  # fmt: skip
    model = ddpm.LitDDPM.from_config(cfg)
    model.log = lambda *a, **k: None
    x, y = _shapes(8)
    torch.manual_seed(0)
    loss = model._step({"image": x, "label": y}, "train").item()
    torch.manual_seed(0)
    t = ddpm.sample_timesteps(8, 1000, "split", split_t=200, low_fraction=0.25)
    assert (t[:2] < 200).all() and (t[2:] >= 200).all()
    eps = torch.randn_like(x)
    with torch.no_grad():
        want = ddpm.ddpm_loss(model.model(model.schedule.add_noise(x, eps, t), t, y), eps).item()
    assert loss == pytest.approx(want, rel=1e-5)


class _Loud(torch.nn.Module):
    """A stand-in eps-model whose guided predictions push x_0 far outside [-1, 1]."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, y=None):
        return -2.0 * x + 0.3 * (y if y is not None else torch.zeros_like(t)).reshape(-1, 1, 1, 1).float()


@pytest.mark.parametrize("limits", [dict(clip_sample=1.0), dict(clip_sample=1.0, threshold=0.9)])
def test_ddim_sampler_rederives_eps_from_the_limited_x0(limits):
    """When x_0 is clipped or thresholded, sample_ddim pairs it with the eps that x_0 implies."""
    s, y, shape = NoiseSchedule(100), torch.tensor([1, 3]), (2, 3, 4, 4)
    got = ddpm.sample_ddim(_Loud(), s, shape, y, 4.0, num_steps=10, generator=torch.Generator().manual_seed(0),
                           **limits)  # fmt: skip
    replays = {}
    for rederive in (True, False):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        ts = s.ddim_timesteps(10)
        for i, t in enumerate(ts):
            eps = ddpm.cfg_mix(_Loud()(x, None, y), _Loud()(x, None, torch.full_like(y, 4)), 4.0)
            x = s.ddim_step(eps, t, ts[i + 1] if i + 1 < len(ts) else -1, x, use_clipped_model_output=rederive,
                            **limits)  # fmt: skip
        replays[rederive] = x
    _close(got, replays[True])
    assert (got - replays[False]).abs().max() > 0.1  # the rule matters here: x_0 was limited
    assert got.abs().max() <= 1.0 + 1e-5


def test_config_presets_build():
    for profile in ("ci", "cpu", "gpu"):
        cfg = ddpm.DDPMConfig.preset(profile)
        assert cfg.num_steps == 1000
        model = ddpm.LitDDPM.from_config(cfg)
        assert model.model.patch == cfg.patch
        lat = ddpm.LitDDPM.from_config(cfg, latent_shape=(4, 8, 8))
        assert lat.hparams.in_channels == 4 and lat.hparams.image_size == 8
        assert lat.hparams.clip_sample == 0 and lat.hparams.threshold == 0  # latents: never clipped
        assert lat.hparams.max_steps == cfg.latent_max_steps and lat.hparams.guidance_interval == (0, 1000)


def test_latent_unet_has_its_own_attention_flags():
    """The latent U-Net takes ``latent_attention`` (its own levels), not the pixel U-Net's ``attention``."""
    cfg = dataclasses.replace(ddpm.DDPMConfig.preset("ci"), attention=(False, True), latent_attention=(True, False))
    net = ddpm.LitDDPM.from_config(cfg, latent_shape=(4, 8, 8)).model
    assert [not isinstance(a, torch.nn.Identity) for a in net.down_attn] == [True, False]
    pixel = ddpm.LitDDPM.from_config(cfg).model
    assert [not isinstance(a, torch.nn.Identity) for a in pixel.down_attn] == [False, True]
    with pytest.raises(ValueError, match="one flag per level"):
        ddpm.LitDDPM.from_config(dataclasses.replace(cfg, latent_attention=(True,)), latent_shape=(4, 8, 8))


def test_litddpm_without_arguments_takes_the_preset(monkeypatch):
    """LitDDPM() (as `minivfm fit --config configs/ddpm.yaml` builds it) fills every argument from
    DDPMConfig.preset() of the active profile; hparams hold the filled values, never None."""
    import inspect

    monkeypatch.setenv("MINIVFM_PROFILE", "ci")
    cfg = ddpm.DDPMConfig.preset("ci")
    model = ddpm.LitDDPM()
    names = set(inspect.signature(ddpm.LitDDPM.__init__).parameters) - {"self", "profile"}
    assert names <= {f.name for f in dataclasses.fields(cfg)}  # every argument is a config field
    assert set(model.hparams) == names and all(v is not None for v in model.hparams.values())
    assert {k: getattr(cfg, k) for k in names} == dict(model.hparams)
    assert model.model.patch == cfg.patch and model.model.stem.out_channels == cfg.channels[0]
    assert model.hparams.max_steps == cfg.max_steps
    cpu = ddpm.LitDDPM(profile="cpu", lr=1e-3)  # an explicit profile, and an argument that wins over it
    assert cpu.hparams.channels == ddpm.DDPMConfig.preset("cpu").channels and cpu.hparams.lr == 1e-3
    assert "profile" not in cpu.hparams
    # the same model again from its hparams (as a checkpoint reloads it)
    again = ddpm.LitDDPM(**model.hparams)
    assert dict(again.hparams) == dict(model.hparams)
    images, labels = model.generate(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [0, 1, 2] and torch.isfinite(images).all()


def test_latent_helpers_shapes():
    from minivfm.models.vae import VAE, decode_latents, encode_latents

    vae = VAE(3, 32, (16, 32), 4).eval()
    x, _ = _shapes(5)
    z = encode_latents(vae, x, batch_size=2)
    assert z.shape == (5, 4, 8, 8)
    with torch.no_grad():
        _close(z, vae.encode(x)[0], atol=1e-5)  # batched: equal up to the convolutions' float rounding
    out = decode_latents(vae, z, batch_size=2)
    assert out.shape == x.shape and out.abs().max() <= 1


def test_a_few_steps_lower_the_loss():
    """Overfit a fixed batch for a few optimizer steps: the loss on fixed (t, noise) must drop."""
    import lightning as L

    L.seed_everything(0)
    model = ddpm.LitDDPM.from_config(ddpm.DDPMConfig.preset("ci"))
    x, y = _shapes(32)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (32,), generator=g)
    eps = torch.randn(x.shape, generator=g)

    def fixed_loss():
        with torch.no_grad():
            return ddpm.ddpm_loss(model.model(model.schedule.add_noise(x, eps, t), t, y), eps).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(model.model.parameters(), lr=2e-3)
    for _ in range(30):
        loss = ddpm.ddpm_loss(model.model(model.schedule.add_noise(x, eps, t), t, y), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_lightning_training_and_ema():
    import lightning as L

    L.seed_everything(0)
    cfg = ddpm.DDPMConfig.preset("ci")
    model = ddpm.LitDDPM.from_config(cfg)
    x, y = _shapes(128)
    ema_before = [p.clone() for p in model.ema.parameters()]
    ddpm.fit(model, x, y, batch_size=32, max_steps=8, profile="ci")
    assert model.global_step == 8
    assert all(not p.requires_grad for p in model.ema.parameters())
    changed = any(not torch.equal(a, b) for a, b in zip(ema_before, model.ema.parameters()))
    assert changed
    # the EMA lags behind the trained weights
    diffs = [(a - b).abs().max().item() for a, b in zip(model.ema.parameters(), model.model.parameters())]
    assert max(diffs) > 0
    samples = model.sample(torch.tensor([0, 1]), guidance_scale=2.0, num_steps=5)
    assert samples.shape == (2, 3, 32, 32) and torch.isfinite(samples).all()


# -- lesson checks ----------------------------------------------------------------------------------------


def test_lesson_checks_pass_the_library_and_catch_mistakes(capsys):
    from minivfm.course.checks import ddpm as checks

    checks.check_q_sample(ddpm.q_sample)
    checks.check_posterior_mean_x0(ddpm.posterior_mean_x0)
    checks.check_ddim_update(ddpm.ddim_update)
    checks.check_cfg_mix(ddpm.cfg_mix)

    def diffusion_loss(net, x0, y, t, noise, ac, weight=None):  # the library's pieces, as Algorithm 1
        return ddpm.ddpm_loss(net(ddpm.q_sample(x0, t, noise, ac), t, y), noise, weight)

    checks.check_diffusion_loss(diffusion_loss)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("✓ ") for line in lines)

    def q_no_broadcast(x0, t, noise, ac):  # forgets sqrt on the noise coefficient
        a = ac[t].reshape(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a) * noise

    def pm_wrap_around(x0, x_t, t, ac):  # alpha_bar[-1] at t = 0 is the last entry, not 1
        a, ap = ac[t], ac[t - 1]
        b = 1 - a / ap
        return ap.sqrt() * b / (1 - a) * x0 + (1 - b).sqrt() * (1 - ap) / (1 - a) * x_t

    def ddim_last_step(eps, x_t, t, t_prev, ac):  # uses alphas_cumprod[t_prev] even for t_prev < 0
        a, ap = ac[t], ac[t_prev]
        return ap.sqrt() * (x_t - (1 - a).sqrt() * eps) / a.sqrt() + (1 - ap).sqrt() * eps

    def cfg_wrong(c, u, s):
        return c + s * (c - u)

    def loss_unweighted(net, x0, y, t, noise, ac, weight=None):  # ignores the Min-SNR weights
        return ddpm.ddpm_loss(net(ddpm.q_sample(x0, t, noise, ac), t, y), noise)

    def loss_per_sample(net, x0, y, t, noise, ac, weight=None):  # forgets the mean over the batch
        err = (net(ddpm.q_sample(x0, t, noise, ac), t, y) - noise).pow(2).flatten(1).mean(1)
        return err if weight is None else err * weight

    def loss_detached(net, x0, y, t, noise, ac, weight=None):  # the right value, but no gradient
        return diffusion_loss(net, x0, y, t, noise, ac, weight).detach()

    def loss_wrong_weight_shape(net, x0, y, t, noise, ac, weight=None):  # a raw broadcasting error
        err = (net(ddpm.q_sample(x0, t, noise, ac), t, y) - noise).pow(2).flatten(1).mean(1)
        return (err if weight is None else err * weight[:3]).mean()

    def not_done(*args):
        raise NotImplementedError()

    for check, bad in [
        (checks.check_q_sample, q_no_broadcast),
        (checks.check_posterior_mean_x0, pm_wrap_around),
        (checks.check_ddim_update, ddim_last_step),
        (checks.check_cfg_mix, cfg_wrong),
        (checks.check_diffusion_loss, loss_unweighted),
        (checks.check_diffusion_loss, loss_per_sample),
        (checks.check_diffusion_loss, loss_detached),
        (checks.check_diffusion_loss, loss_wrong_weight_shape),
        (checks.check_q_sample, not_done),
    ]:
        with pytest.raises(AssertionError):
            check(bad)
    with pytest.raises(AssertionError, match="shape error inside your function"):
        checks.check_diffusion_loss(loss_wrong_weight_shape)


@pytest.mark.slow
def test_results_ci_runs_and_reports_every_metric():
    out = ddpm.results("ci")
    shapes = [f"{p}sample_acc_{s}" for p in ("", "ddim_") for s in ("circle", "square", "triangle")]
    for key in ["sample_fd", "sample_acc", "ddim_sample_fd", "latent_sample_fd", "seconds",
                "ancestral_seconds", "ddim_seconds", *shapes]:  # fmt: skip
        assert key in out and math.isfinite(out[key]), key
    assert 0 <= out["sample_acc"] <= 1
    # the accuracy by shape, weighted by how often each shape was asked for, is the whole accuracy
    asked = (torch.arange(int(out["num_samples"])) % 12 // 4).bincount(minlength=3).float()
    by_shape = torch.tensor([out[k] for k in shapes[:3]])
    assert (by_shape * asked).sum().item() / asked.sum().item() == pytest.approx(out["sample_acc"], abs=1e-6)
    base = out["baselines"]
    assert set(base) == {k for k in out if "sample_acc" in k or "sample_fd" in k}
    assert base["sample_acc"] == pytest.approx(1 / 12) and base["sample_acc_square"] == pytest.approx(1 / 12)
    assert base["sample_fd"] < out["sample_fd"]  # the real-data floor; 150 ci steps are far from it
    assert out["ddim_seconds"] < out["ancestral_seconds"]


def test_update_ema_warm_up_and_buffers():
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)  # parameters that require grad
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ddpm.update_ema(ema, model, 0.99, step=0)  # warm-up: decay 1/10, not 0.99
    assert torch.allclose(ema.weight, torch.full((3,), 0.1 * 1.0 + 0.9 * 2.0))
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers are copied, not averaged
    before = ema.weight.clone()
    ddpm.update_ema(ema, model, 0.99, step=10_000)  # past the warm-up: the decay itself
    assert torch.allclose(ema.weight, 0.99 * before + 0.01 * model.weight)
