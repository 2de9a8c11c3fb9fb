"""Tests for minivfm.models.dino: views, the loss, the centre, the EMA teacher, the Lightning module."""

from __future__ import annotations

import copy
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from minivfm.models.dino import (
    DINO,
    DINOConfig,
    DINOHead,
    LitDINO,
    cosine_schedule,
    dino_loss,
    ema_update,
    multi_crop,
    photometric_jitter,
    random_resized_crop,
    teacher_temperature,
    update_center,
)
from minivfm.models.vit import ViT

B, C, S = 4, 3, 16  # batch, channels, image size; local views 8x8, patch 4


def tiny_backbone(**kw) -> ViT:
    args = dict(image_size=S, patch_size=4, in_chans=C, num_classes=0, embed_dim=16, depth=2, num_heads=2,
                dynamic_img_size=True)  # fmt: skip
    return ViT(**{**args, **kw})


def tiny_dino(**kw) -> DINO:
    torch.manual_seed(0)
    args = dict(out_dim=32, hidden_dim=24, bottleneck_dim=8, num_local_crops=3, local_size=8)
    return DINO(tiny_backbone(), **{**args, **kw})


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(B, C, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- views --------------------------------------------------------------------------------------------


def test_random_resized_crop_of_the_whole_image_is_the_image_or_its_mirror() -> None:
    x = images()
    out = random_resized_crop(x, S, (1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    for b in range(B):
        same, mirror = torch.allclose(out[b], x[b], atol=1e-5), torch.allclose(out[b], x[b].flip(-1), atol=1e-5)
        assert same or mirror, b
    flips = [torch.allclose(out[b], x[b].flip(-1), atol=1e-5) for b in range(B)]
    assert any(flips) and not all(flips)  # half of them, at random


def test_random_resized_crop_zooms_into_a_part() -> None:
    x = torch.zeros(1, 1, 16, 16)
    x[..., :8, :8] = 1.0  # one bright quarter: a small crop is either all bright, all dark or a mix
    outs = random_resized_crop(x.expand(64, -1, -1, -1), 8, (0.05, 0.1), generator=torch.Generator().manual_seed(0))
    assert outs.shape == (64, 1, 8, 8)
    means = outs.mean((1, 2, 3))
    assert (means > 0.99).any() and (means < 0.01).any()
    a = random_resized_crop(images(), 8, (0.1, 0.4), generator=torch.Generator().manual_seed(3))
    b = random_resized_crop(images(), 8, (0.1, 0.4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_multi_crop_views() -> None:
    views = multi_crop(images(), 3, 8, jitter=(0.4, 0.4, 0.2), generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(B, C, S, S)] * 2 + [(B, C, 8, 8)] * 3
    assert all(v.min() >= -1 and v.max() <= 1 for v in views)
    assert not torch.equal(views[0], views[1])
    assert len(multi_crop(images(), 0, 8)) == 2


def test_photometric_jitter_keeps_colour_names() -> None:
    x = images()
    torch.testing.assert_close(photometric_jitter(x, 0.0, 0.0, 0.0), x, atol=1e-6, rtol=0)
    red = torch.tensor([0.90, 0.13, 0.13]) * 2 - 1  # the Shapes palette's red, in [-1, 1]
    grey = torch.full((3,), 0.4 * 2 - 1)
    img = torch.cat([red.view(3, 1, 1).expand(3, 4, 8), grey.view(3, 1, 1).expand(3, 4, 8)], 1)  # (3, 8, 8)
    out = photometric_jitter(img.expand(256, -1, -1, -1), generator=torch.Generator().manual_seed(0))
    top = out[:, :, 0, 0]  # (256, 3) the red pixels
    assert (top.argmax(1) == 0).all() and (top[:, 0] - top[:, 1:].max(1).values > 0.5).all()
    assert out.min() >= -1 and out.max() <= 1 and out[:, :, 0, 0].std(0).min() > 0.01


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: random_resized_crop(torch.rand(3, 8, 8), 4, (0.1, 0.4)), r"images: expected a \(B, C, H, W\)"),
        (lambda: random_resized_crop(torch.rand(1, 3, 8, 8), 4, (0.5, 0.1)), "scale"),
        (lambda: random_resized_crop(torch.rand(1, 3, 8, 8), 0, (0.1, 0.4)), "size"),
        (lambda: multi_crop(torch.rand(1, 3, 8, 8), -1, 4), "num_local_crops"),
        (lambda: multi_crop(torch.rand(1, 3, 8, 8), 2, 4, local_scale=(0.0, 0.4)), "local_scale"),
        (lambda: photometric_jitter(torch.rand(1, 3, 8, 8), brightness=1.5), "brightness"),
    ],
)
def test_view_errors(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# -- the loss -----------------------------------------------------------------------------------------


def reference_dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, ncrops):
    """DINOLoss.forward of facebookresearch/dino (main_dino.py), without the centre update."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # the same view
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


@pytest.mark.parametrize("views", [2, 3, 6])
def test_dino_loss_matches_the_reference_loop(views: int) -> None:
    g = torch.Generator().manual_seed(views)
    student, teacher, center = (
        torch.randn(views * B, 10, generator=g),
        torch.randn(2 * B, 10, generator=g),
        torch.randn(1, 10, generator=g),
    )
    ours = dino_loss(student, teacher, center, 0.1, 0.04, n_global=2)
    torch.testing.assert_close(ours, reference_dino_loss(student, teacher, center, 0.1, 0.04, views))
    torch.testing.assert_close(dino_loss(student, teacher, center[0], 0.1, 0.04), ours)  # a (K,) centre too


def test_dino_loss_skips_same_view_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher, center = (
        torch.randn(3 * B, 10, generator=g),
        torch.randn(2 * B, 10, generator=g),
        torch.zeros(1, 10),
    )
    base = dino_loss(student, teacher, center, 0.1, 0.04)
    # teacher view 0 is only compared with student views 1 and 2: changing student view 0 only
    # changes the (teacher 1, student 0) term, so the loss with student view 0 set to teacher 1's
    # logits scaled to the same distribution drops by exactly that term's excess
    s2 = student.clone()
    s2[:B] = teacher[B:] * (0.1 / 0.04)  # P_s(view 0) = P_t(view 1)
    q1 = F.softmax(teacher[B:] / 0.04, -1)
    old_term = -(q1 * F.log_softmax(student[:B] / 0.1, -1)).sum(-1).mean()
    entropy = -(q1 * q1.log()).sum(-1).mean()
    torch.testing.assert_close(dino_loss(s2, teacher, center, 0.1, 0.04), base + (entropy - old_term) / 4)
    # with two views the loss is the mean of the two cross terms only
    two = dino_loss(student[: 2 * B], teacher, center, 0.1, 0.04)
    q0 = F.softmax(teacher[:B] / 0.04, -1)
    cross = -(q0 * F.log_softmax(student[B : 2 * B] / 0.1, -1)).sum(-1).mean() + old_term
    torch.testing.assert_close(two, cross / 2)


def test_dino_loss_gradients_reach_the_student_only() -> None:
    student = torch.randn(3 * B, 10, requires_grad=True)
    teacher = torch.randn(2 * B, 10, requires_grad=True)
    center = torch.zeros(1, 10, requires_grad=True)
    dino_loss(student, teacher, center, 0.1, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and center.grad is None


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(12, 10), torch.randn(8, 9), torch.zeros(1, 10)), "same K"),
        ((torch.randn(12, 10), torch.randn(8, 10), torch.zeros(1, 9)), "center"),
        ((torch.randn(10, 10), torch.randn(8, 10), torch.zeros(1, 10)), "student_out"),
        ((torch.randn(4, 10), torch.randn(8, 10), torch.zeros(1, 10)), "student_out"),
        ((torch.randn(12, 10), torch.randn(7, 10), torch.zeros(1, 10)), "teacher_out"),
        ((torch.randn(12), torch.randn(8, 10), torch.zeros(1, 10)), "student_out and teacher_out"),
    ],
)
def test_dino_loss_errors(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        dino_loss(*args, student_temp=0.1, teacher_temp=0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss(torch.randn(12, 10), torch.randn(8, 10), torch.zeros(1, 10), 0.1, 0.0)
    with pytest.raises(ValueError, match="n_global"):
        dino_loss(torch.randn(12, 10), torch.randn(8, 10), torch.zeros(1, 10), 0.1, 0.04, n_global=0)


# -- the centre ---------------------------------------------------------------------------------------


def test_update_center_in_one_process() -> None:
    center, out = torch.randn(1, 5), torch.randn(6, 5)
    torch.testing.assert_close(update_center(center, out, 0.9), 0.9 * center + 0.1 * out.mean(0, keepdim=True))
    torch.testing.assert_close(update_center(center, out, 1.0), center)
    with pytest.raises(ValueError, match="center and teacher_out"):
        update_center(torch.zeros(5), out, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        update_center(center, out, 1.5)


def _center_worker(rank: int, world_size: int, port: int, path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out = torch.arange(5.0) + 10 * rank + torch.arange(3 + rank)[:, None]  # rank 0: 3 rows, rank 1: 4 rows
        center = update_center(torch.ones(1, 5), out, 0.5)
        torch.save(center, f"{path}/center{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_center_averages_over_processes(tmp_path) -> None:
    """Two CPU processes (gloo): the centre moves towards the mean over both processes' rows."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_center_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rows = torch.cat([torch.arange(5.0) + 10 * r + torch.arange(3 + r)[:, None] for r in range(2)])  # (7, 5)
    expected = 0.5 * torch.ones(1, 5) + 0.5 * rows.mean(0, keepdim=True)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"center{rank}.pt", weights_only=True), expected)


# -- schedules and EMA --------------------------------------------------------------------------------


def test_schedules() -> None:
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(200, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temperature(40, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(0, 0.04, 0.07, 0) == pytest.approx(0.07)


def test_ema_update_math() -> None:
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    with pytest.raises(ValueError, match="same architecture"):
        ema_update(torch.nn.Linear(3, 3), student, 0.9)


# -- the head and the model ---------------------------------------------------------------------------


def test_head_last_layer_is_weight_normalised_with_unit_norm() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    assert head(torch.randn(5, 16)).shape == (5, 32)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones(32, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))
    # outputs are cosines between a unit vector and unit prototypes
    assert head(torch.randn(5, 16) * 100).abs().max() <= 1 + 1e-5
    keys = set(head.state_dict())
    assert {"last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"} <= keys
    other = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    other.load_state_dict(head.state_dict(), strict=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(other(x), head(x))
    torch.testing.assert_close(copy.deepcopy(head)(x), head(x))


def test_dino_shapes_and_centre_update() -> None:
    model = tiny_dino()
    assert torch.equal(model.center, torch.zeros(1, 32))
    loss, student_out, teacher_out = model(images())
    assert loss.ndim == 0 and student_out.shape == (5 * B, 32) and teacher_out.shape == (2 * B, 32)
    torch.testing.assert_close(model.center, 0.1 * teacher_out.mean(0, keepdim=True))
    model.eval()
    center = model.center.clone()
    model(images())
    assert torch.equal(model.center, center)  # no update in eval mode
    assert model.backbone is model.teacher.backbone


def test_gradients_reach_the_student_only() -> None:
    model = tiny_dino()
    model(images())[0].backward()
    for name, p in model.student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name.endswith("original0"), name  # only the head's fixed g
    for name, p in model.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    # the teacher starts as a copy of the student
    for t, s in zip(model.teacher.parameters(), model.student.parameters()):
        assert torch.equal(t, s)


def test_update_teacher_moves_it_towards_the_student() -> None:
    model = tiny_dino()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.75)
    for t0, t, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, 0.75 * t0 + 0.25 * s)


def test_determinism_with_a_seed() -> None:
    def run() -> torch.Tensor:
        model = tiny_dino()
        torch.manual_seed(5)
        return model(images())[0]

    assert torch.equal(run(), run())
    model = tiny_dino().eval()
    a = model(images(), generator=torch.Generator().manual_seed(1))[0]
    b = model(images(), generator=torch.Generator().manual_seed(1))[0]
    c = model(images(), generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dino_refuses_bad_backbones_and_arguments() -> None:
    with pytest.raises(ValueError, match="minivfm ViT"):
        DINO(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="num_classes=0"):
        DINO(tiny_backbone(num_classes=5), local_size=8)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        DINO(tiny_backbone(dynamic_img_size=False), local_size=8)
    with pytest.raises(ValueError, match="local_size"):
        DINO(tiny_backbone(), local_size=6)
    with pytest.raises(ValueError, match="global_scale"):
        DINO(tiny_backbone(), local_size=8, global_scale=(0.4, 1.5))
    with pytest.raises(ValueError, match="brightness"):
        DINO(tiny_backbone(), local_size=8, jitter=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"images: expected a \(B, C, H, W\)"):
        tiny_dino()(torch.rand(C, S, S))
    assert DINO(tiny_backbone(dynamic_img_size=False), local_size=S).local_size == S  # no resampling needed


# -- Lightning ----------------------------------------------------------------------------------------


def test_lit_dino_fills_from_the_preset(monkeypatch) -> None:
    monkeypatch.setenv("MINIVFM_PROFILE", "ci")
    lit = LitDINO()
    cfg = DINOConfig.preset("ci")
    assert all(v is not None for v in lit.hparams.values()), dict(lit.hparams)
    assert "profile" not in lit.hparams and lit.hparams.max_epochs == cfg.max_epochs
    assert lit.model.num_local_crops == cfg.num_local_crops and lit.model.center.shape == (1, cfg.out_dim)
    assert LitDINO.from_config(cfg, embed_dim=24).model.backbone.embed_dim == 24


def test_lit_dino_trains_with_an_ema_teacher(tmp_path) -> None:
    import lightning as L

    cfg = DINOConfig.preset("ci")
    torch.manual_seed(0)
    lit = LitDINO(profile="ci")
    x = torch.rand(16, 3, cfg.image_size, cfg.image_size) * 2 - 1
    data = torch.utils.data.StackDataset(image=x, label=torch.zeros(16, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=16)  # one step, one epoch, then validation
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                        limit_val_batches=1)  # fmt: skip
    teacher0 = [p.detach().clone() for p in lit.model.teacher.parameters()]
    student0 = [p.detach().clone() for p in lit.model.student.parameters()]
    trainer.fit(lit, loader, loader)
    # one optimiser step, then the EMA with the schedule's first momentum
    m = cosine_schedule(0, int(trainer.estimated_stepping_batches), cfg.momentum_teacher, 1.0)
    changed = False
    for t0, s0, t, s in zip(teacher0, student0, lit.model.teacher.parameters(), lit.model.student.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)
        changed |= not torch.equal(s, s0)
    assert changed
    assert {"train/loss_step", "train/momentum", "val/loss"} <= set(trainer.logged_metrics)
    assert lit.model.center.abs().sum() > 0
    assert lit(x[:2]).shape == (2, cfg.embed_dim)
    path = tmp_path / "dino.ckpt"
    trainer.save_checkpoint(path)
    loaded = LitDINO.load_from_checkpoint(path)
    for (k, a), b in zip(lit.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_presets() -> None:
    for name in ("ci", "cpu", "gpu"):
        cfg = DINOConfig.preset(name)
        assert cfg.image_size % cfg.patch_size == 0 and cfg.local_size % cfg.patch_size == 0
        assert cfg.teacher_temp < cfg.student_temp and 0 < cfg.momentum_teacher < 1
    cpu = DINOConfig.preset("cpu")
    assert (cpu.patch_size, cpu.embed_dim, cpu.depth, cpu.num_heads, cpu.stem) == (8, 64, 4, 4, "conv")
    with pytest.raises(ValueError, match="profile"):
        DINOConfig.preset("tpu")


@pytest.mark.slow
def test_results_ci_reports_every_key_with_baselines() -> None:
    from minivfm.results import runner

    out = runner("dino")("ci")
    keys = {"knn_acc", "knn_acc_random", "knn_acc_supervised", "attn_miou", "attn_miou_random",
            "attn_miou_supervised", "seconds", "baselines"}  # fmt: skip
    assert keys <= set(out), out
    assert out["baselines"] == {"knn_acc": out["knn_acc_random"], "attn_miou": out["attn_miou_random"]}
    for key in keys - {"seconds", "baselines"}:  # ci trains a few steps: no quality claim
        assert 0 <= out[key] <= 1, (key, out[key])
    assert math.isfinite(out["seconds"]) and out["seconds"] > 0
