"""Metrics: Frechet distance, the shipped reference classifier, k-NN and linear probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minivfm import metrics


def _gaussian(n, mean, cov, seed):
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(mean, cov, size=n)


def test_frechet_identical_sets_is_zero():
    a = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_is_symmetric_and_positive():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 8, generator=g), torch.randn(400, 8, generator=g) * 1.5 + 0.3
    ab, ba = metrics.frechet_distance(a, b), metrics.frechet_distance(b, a)
    assert ab > 0.1
    assert ab == pytest.approx(ba, rel=1e-9)


def test_frechet_gaussian_closed_form_diagonal():
    # for diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert metrics.frechet_gaussian(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_gaussian_closed_form_commuting_full_covariances():
    # covariances sharing eigenvectors Q: tr sqrt(S1 S2) = sum sqrt(l1 l2)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    l1, l2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    c1, c2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + l1.sum() + l2.sum() - 2 * np.sqrt(l1 * l2).sum()
    assert metrics.frechet_gaussian(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)


def test_frechet_gaussian_matches_scipy_sqrtm_for_general_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    c1, c2 = a @ a.T + 0.1 * np.eye(10), b @ b.T + 0.1 * np.eye(10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    covmean = scipy_linalg.sqrtm(c1 @ c2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean)
    assert metrics.frechet_gaussian(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_samples_approaches_closed_form():
    mean_a, mean_b = np.zeros(4), np.array([1.0, 0.0, 0.0, 0.0])
    cov_a, cov_b = np.eye(4), np.diag([1.0, 4.0, 1.0, 1.0])
    a, b = _gaussian(20000, mean_a, cov_a, 0), _gaussian(20000, mean_b, cov_b, 1)
    expected = 1.0 + (2.0 - 1.0) ** 2  # mean shift + (sqrt(4) - sqrt(1))^2
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, abs=0.08)


def test_frechet_handles_singular_covariance():
    a = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))  # N < D: rank-deficient
    b = a + 0.01
    fd = metrics.frechet_distance(a, b)
    assert np.isfinite(fd) and fd == pytest.approx(64 * 1e-4, rel=1e-3)


def test_frechet_bad_arguments():
    with pytest.raises(ValueError, match="feats_a"):
        metrics.frechet_distance(torch.zeros(10), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="same width"):
        metrics.frechet_distance(torch.zeros(10, 2), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="feats_b"):
        metrics.frechet_distance(torch.zeros(10, 2), torch.full((10, 2), float("nan")))


def test_reference_file_is_safetensors_and_loads_without_pickle():
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert metrics.REFERENCE_PATH.exists(), "run `python -m minivfm.metrics train-reference`"
    state = load_file(str(metrics.REFERENCE_PATH))
    model = metrics.ReferenceClassifier()
    model.load_state_dict(state, strict=True)
    with safe_open(str(metrics.REFERENCE_PATH), "pt") as f:
        meta = f.metadata()
    assert meta["command"] == metrics.REFERENCE_COMMAND
    assert metrics.REFERENCE_PATH.stat().st_size < 1_000_000


def test_reference_roundtrip_with_torch_load_weights_only(tmp_path):
    model = metrics.load_reference()
    torch.save(model.state_dict(), tmp_path / "ref.pt")
    state = torch.load(tmp_path / "ref.pt", weights_only=True)
    other = metrics.ReferenceClassifier()
    other.load_state_dict(state)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(other.eval()(x), model(x))


def test_reference_classifier_is_accurate_on_real_shapes():
    images, labels = metrics.real_images(1000, "test")
    assert metrics.sample_acc(images, labels) > 0.95
    feats = metrics.reference_features(images[:10])
    assert feats.shape == (10, 64)


@pytest.mark.slow
def test_real_fd_floor_is_small_and_noise_is_far():
    floor = metrics.real_fd(500)
    noise = torch.randn(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert floor < 0.2 * metrics.sample_fd(noise)
    # the floor shrinks with more images (FD is biased upwards at small N)
    assert metrics.real_fd(2000) < floor


def test_sample_acc_and_features_check_their_arguments():
    with pytest.raises(ValueError, match="images"):
        metrics.reference_features(torch.zeros(4, 32, 32))
    with pytest.raises(ValueError, match="labels"):
        metrics.sample_acc(torch.zeros(4, 3, 32, 32), torch.zeros(3))
    with pytest.raises(ValueError, match="split"):
        metrics.real_images(10, "val")


def _clusters(n, seed, d=8, k=4, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    return centers[labels] + spread * torch.randn(n, d, generator=g), labels


def test_knn_accuracy():
    xtr, ytr = _clusters(400, 0)
    xte, yte = _clusters(200, 1)
    assert metrics.knn_accuracy(xtr, ytr, xte, yte, k=10) > 0.95
    # random labels: chance level
    yrand = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(5))
    assert metrics.knn_accuracy(xtr, yrand, xte, yte, k=10) < 0.5
    with pytest.raises(ValueError, match="k must"):
        metrics.knn_accuracy(xtr, ytr, xte, yte, k=0)


def test_linear_probe():
    xtr, ytr = _clusters(400, 0, spread=1.0)
    xte, yte = _clusters(200, 1, spread=1.0)
    assert metrics.linear_probe(xtr, ytr, xte, yte) > 0.9
    with pytest.raises(ValueError, match="same D"):
        metrics.linear_probe(xtr, ytr, xte[:, :3], yte)


# -- attention masks (DINO) ---------------------------------------------------------------------------


def _dino_threshold(attn: torch.Tensor, mass: float) -> torch.Tensor:
    """DINO's visualize_attention.py: sort ascending, keep where the cumulative share > 1 - mass."""
    val, idx = torch.sort(attn, dim=-1)
    cum = torch.cumsum(val / val.sum(-1, keepdim=True), dim=-1)
    keep = cum > (1 - mass)
    return torch.gather(keep, -1, torch.argsort(idx, dim=-1))


def test_attention_mask_keeps_the_top_mass():
    attn = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    assert metrics.attention_mask(attn, 0.6).tolist() == [[False, True, False, True], [True] * 4]
    assert metrics.attention_mask(attn, 0.5)[0].tolist() == [False, True, False, False]
    assert metrics.attention_mask(attn, 0.85)[0].tolist() == [True] * 4  # ties with the last one kept stay
    # no ties: the same masks as DINO's code, on any leading dimensions, unnormalised weights too
    attn = torch.rand(3, 4, 16, generator=torch.Generator().manual_seed(0)) * 5
    for mass in (0.3, 0.6, 0.9):
        assert torch.equal(metrics.attention_mask(attn, mass), _dino_threshold(attn, mass))


def test_attention_mask_errors():
    with pytest.raises(ValueError, match="mass"):
        metrics.attention_mask(torch.rand(2, 4), 0.0)
    with pytest.raises(ValueError, match="mass"):
        metrics.attention_mask(torch.rand(2, 4), 1.5)
    with pytest.raises(ValueError, match="attn_cls"):
        metrics.attention_mask(torch.tensor([[0.5, -0.1]]))
    with pytest.raises(ValueError, match="attn_cls"):
        metrics.attention_mask(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="attn_cls"):
        metrics.attention_mask([0.5, 0.5])


def test_mask_iou():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = torch.zeros(3, 4, 4, dtype=torch.bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 shared of 12
    a[1], b[1] = True, True
    torch.testing.assert_close(metrics.mask_iou(a, b), torch.tensor([1 / 3, 1.0, 1.0]))  # both empty: 1
    with pytest.raises(ValueError, match="same shape"):
        metrics.mask_iou(a, b[:, :2])
    with pytest.raises(ValueError, match=r"pred: expected masks of shape \(B, H, W\)"):
        metrics.mask_iou(a[0], b[0])


def test_attn_miou_perfect_uniform_and_errors():
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 8:16, 8:24] = 1  # two patch-aligned 8x8 patches of a 4x4 grid: tokens 5 and 6
    masks[1, 0:8, 24:32] = 2  # instance ids count as foreground: token 3
    attn = torch.full((2, 16), 1e-3)
    attn[0, [5, 6]], attn[1, 3] = 1.0, 1.0
    assert metrics.attn_miou(attn, masks) == pytest.approx(1.0)
    heads = torch.stack([attn, attn], 1)  # (B, heads, N): heads are averaged first
    assert metrics.attn_miou(heads, masks.bool()) == pytest.approx(1.0)
    # uniform attention keeps every patch: the IoU is the foreground's share of the image
    assert metrics.attn_miou(torch.ones(2, 16), masks) == pytest.approx((128 / 1024 + 64 / 1024) / 2)
    # attention on the background only
    assert metrics.attn_miou(1.0 - attn, masks) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="square grid"):
        metrics.attn_miou(torch.ones(2, 15), masks)
    with pytest.raises(ValueError, match="square grid"):
        metrics.attn_miou(torch.ones(2, 9), masks)  # 3 does not divide 32
    with pytest.raises(ValueError, match="same batch size"):
        metrics.attn_miou(torch.ones(3, 16), masks)
    with pytest.raises(ValueError, match=r"masks: expected foreground masks of shape \(B, H, W\)"):
        metrics.attn_miou(torch.ones(2, 16), masks[0])
    with pytest.raises(ValueError, match=r"attn_cls: expected \(B, N\) or \(B, heads, N\)"):
        metrics.attn_miou(torch.ones(16), masks)
