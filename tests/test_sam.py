"""Tests for minivfm.models.sam: prompt encoding, the two-way mask decoder, the losses, the predictor,
composition with the MAE encoder, training."""

from __future__ import annotations

import math

import pytest
import torch

from minivfm.metrics import mask_iou
from minivfm.models.sam import (
    SAM,
    LitSAM,
    PositionEmbeddingRandom,
    SAMConfig,
    SamPredictor,
    best_mask,
    box_baseline,
    build_sam,
    dice_loss,
    embed_boxes,
    embed_points,
    fourier_features,
    hypernetwork_masks,
    instance_masks,
    interior_points,
    mask_boxes,
    mask_iou_targets,
    sam_loss,
    sample_prompts,
    select_masks,
    sigmoid_focal_loss,
)

CFG = SAMConfig.preset("ci")  # patch 8 on 32x32: a 4x4 grid, decoder width 32
S, C = CFG.image_size, CFG.decoder_dim


def tiny_sam(seed: int = 0) -> SAM:
    torch.manual_seed(seed)
    return build_sam(CFG)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def disc(cx: float, cy: float, r: float, size: int = S) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= r**2


# -- Fourier features and the prompt encoder ----------------------------------------------------------


def test_fourier_features_formula_shape_and_range() -> None:
    G = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    coords = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(1))
    out = fourier_features(coords, G)
    assert out.shape == (3, 4, 10)
    x, y = coords[1, 2]
    for j in range(5):  # by hand for one point: 2 pi ((2x - 1) G_0j + (2y - 1) G_1j)
        a = 2 * math.pi * ((2 * x - 1) * G[0, j] + (2 * y - 1) * G[1, j])
        assert out[1, 2, j].item() == pytest.approx(math.sin(a), abs=1e-5)
        assert out[1, 2, 5 + j].item() == pytest.approx(math.cos(a), abs=1e-5)
    torch.testing.assert_close(out[..., :5] ** 2 + out[..., 5:] ** 2, torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="coords"):
        fourier_features(torch.zeros(3, 3), G)


def test_position_embedding_random_is_fixed_by_the_seed_and_not_trained() -> None:
    torch.manual_seed(0)
    a = PositionEmbeddingRandom(8)
    torch.manual_seed(0)
    b = PositionEmbeddingRandom(8)
    torch.testing.assert_close(a((4, 4)), b((4, 4)), atol=0, rtol=0)
    assert a((4, 4)).shape == (16, 4, 4) and list(a.parameters()) == []
    assert "positional_encoding_gaussian_matrix" in a.state_dict()
    # the dense encoding is the features of the cell centres: cell (row 1, col 2) of 4x4 is (2.5/4, 1.5/4)
    expected = fourier_features(torch.tensor([2.5 / 4, 1.5 / 4]), a.positional_encoding_gaussian_matrix)
    torch.testing.assert_close(a((4, 4))[:, 1, 2], expected)


def test_embed_points_and_boxes_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    G, emb, nap = torch.randn(2, 4, generator=g), torch.randn(2, 8, generator=g), torch.randn(8, generator=g)
    points = torch.tensor([[[3.0, 7.0], [10.0, 2.0], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0, -1]])
    out = embed_points(points, labels, G, emb, nap, 32)
    torch.testing.assert_close(out[0, 0], fourier_features(torch.tensor([3.5, 7.5]) / 32, G) + emb[1])
    torch.testing.assert_close(out[0, 1], fourier_features(torch.tensor([10.5, 2.5]) / 32, G) + emb[0])
    torch.testing.assert_close(out[0, 2], nap)  # padding: the "not a point" embedding alone
    boxes = torch.tensor([[2.0, 4.0, 12.0, 20.0]])
    corners = embed_boxes(boxes, G, emb, 32)
    assert corners.shape == (1, 2, 8)
    torch.testing.assert_close(corners[0, 0], fourier_features(torch.tensor([2.0, 4.0]) / 32, G) + emb[0])
    torch.testing.assert_close(corners[0, 1], fourier_features(torch.tensor([12.0, 20.0]) / 32, G) + emb[1])


def test_prompt_encoder_shapes_for_points_boxes_masks_and_none() -> None:
    pe = tiny_sam().prompt_encoder
    M, h = 3, CFG.image_size // CFG.patch_size
    pts, lab = torch.rand(M, 2, 2) * S, torch.ones(M, 2, dtype=torch.long)
    boxes = torch.tensor([[1.0, 2.0, 9.0, 10.0]]).repeat(M, 1)
    sparse, dense = pe(pts, lab, None, None)
    assert sparse.shape == (M, 3, C) and dense.shape == (M, C, h, h)  # a padding point appended
    torch.testing.assert_close(sparse[:, 2], pe.not_a_point_embed.expand(M, -1))
    torch.testing.assert_close(dense, pe.no_mask_embed[None, :, None, None].expand(M, -1, h, h))
    sparse, _ = pe(pts, lab, boxes, None)
    assert sparse.shape == (M, 4, C)  # two points, two corners, no padding
    sparse, _ = pe(None, None, boxes, None)
    assert sparse.shape == (M, 2, C)
    assert pe.mask_input_size == (4 * h, 4 * h)
    sparse, dense = pe(None, None, None, torch.randn(M, 1, 4 * h, 4 * h))
    assert sparse.shape == (M, 0, C) and dense.shape == (M, C, h, h)
    assert not torch.allclose(dense, pe.no_mask_embed[None, :, None, None].expand(M, -1, h, h))
    sparse, dense = pe(None, None, None, None, num_prompts=2)
    assert sparse.shape == (2, 0, C) and dense.shape == (2, C, h, h)


def test_padding_point_ignores_its_coordinates() -> None:
    pe = tiny_sam().prompt_encoder
    lab = torch.tensor([[1, -1]])
    a, _ = pe(torch.tensor([[[4.0, 4.0], [0.0, 0.0]]]), lab, None, None)
    b, _ = pe(torch.tensor([[[4.0, 4.0], [30.0, 12.0]]]), lab, None, None)
    torch.testing.assert_close(a, b)
    c, _ = pe(torch.tensor([[[4.0, 4.0], [30.0, 12.0]]]), torch.tensor([[1, 0]]), None, None)
    assert not torch.allclose(b[:, 1], c[:, 1])


# -- the decoder ----------------------------------------------------------------------------------------


def test_hypernetwork_masks_select_and_best() -> None:
    hyper = torch.randn(2, 4, 5)
    up = torch.randn(2, 5, 6, 7)
    masks = hypernetwork_masks(hyper, up)
    assert masks.shape == (2, 4, 6, 7)
    torch.testing.assert_close(masks[1, 2, 3, 4], (hyper[1, 2] * up[1, :, 3, 4]).sum())
    iou = torch.tensor([[0.1, 0.5, 0.9, 0.2], [0.3, 0.8, 0.1, 0.4]])
    m3, i3 = select_masks(masks, iou, True)
    m1, i1 = select_masks(masks, iou, False)
    assert m3.shape == (2, 3, 6, 7) and torch.equal(i3, iou[:, 1:]) and torch.equal(m1, masks[:, :1])
    chosen, idx = best_mask(m3, i3)
    assert idx.tolist() == [1, 0] and torch.equal(chosen[0], m3[0, 1]) and torch.equal(chosen[1], m3[1, 0])


@pytest.mark.parametrize("multimask", [True, False])
def test_sam_forward_shapes(multimask: bool) -> None:
    sam = tiny_sam()
    x = images(2)
    idx = torch.tensor([0, 0, 1])
    pts, lab = torch.tensor([[[5.0, 5.0]], [[20.0, 20.0]], [[9.0, 3.0]]]), torch.ones(3, 1, dtype=torch.long)
    logits, iou = sam(x, idx, points=pts, labels=lab, multimask_output=multimask)
    T = 3 if multimask else 1
    assert logits.shape == (3, T, S, S) and iou.shape == (3, T)
    # prompts are independent: the first prompt alone gives the same masks
    alone, _ = sam(x, idx[:1], points=pts[:1], labels=lab[:1], multimask_output=multimask)
    torch.testing.assert_close(alone, logits[:1], atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter() -> None:
    sam = tiny_sam()
    x = images(2)
    masks = torch.stack([disc(10, 10, 5), disc(20, 22, 4)])
    idx = torch.tensor([0, 1])
    pts = torch.tensor([[[10.0, 10.0], [2.0, 2.0]], [[20.0, 22.0], [0.0, 0.0]]])
    lab = torch.tensor([[1, 0], [1, -1]])
    boxes = mask_boxes(masks)
    low = sam.prompt_encoder.mask_input_size
    a = sam(x, idx, points=pts, labels=lab, multimask_output=True)  # outputs 1..3, the no-mask embedding
    b = sam(x, idx, boxes=boxes, mask_input=torch.randn(2, 1, *low), multimask_output=False)  # output 0, a mask
    # sam_loss trains only the best of the three outputs; the sum reaches all of them
    loss = sam_loss(*a, masks)[0] + sam_loss(*b, masks)[0] + a[0].mean() + a[1].mean()
    loss.backward()
    no_grad = [n for n, p in sam.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [], no_grad


def test_mae_encoder_loads_strictly_and_runs_in_sam() -> None:
    from minivfm.models.mae import LitMAE, MAEConfig

    mae_cfg = MAEConfig.preset("ci")
    assert SAMConfig.preset("ci").encoder_kwargs() == mae_cfg.encoder_kwargs()
    torch.manual_seed(1)
    mae = LitMAE.from_config(mae_cfg).model
    sam = tiny_sam()
    sam.load_mae_encoder(mae.encoder_state_dict())
    for k, v in mae.encoder_state_dict().items():
        torch.testing.assert_close(sam.image_encoder.vit.state_dict()[k], v, atol=0, rtol=0)
    state = mae.encoder_state_dict()
    state.pop("norm.weight")
    with pytest.raises(RuntimeError, match="norm.weight"):
        sam.load_mae_encoder(state)


def test_lit_sam_loads_an_mae_checkpoint(tmp_path) -> None:
    from minivfm.models.mae import LitMAE, MAEConfig

    torch.manual_seed(2)
    mae = LitMAE.from_config(MAEConfig.preset("ci"))
    path = tmp_path / "mae.ckpt"
    torch.save({"state_dict": mae.state_dict()}, path)
    lit = LitSAM(profile="ci", mae_checkpoint=str(path))
    torch.testing.assert_close(lit.model.image_encoder.vit.pos_embed, mae.model.encoder.pos_embed)
    torch.testing.assert_close(lit.model.image_encoder.vit.blocks[0].attn.qkv.weight,
                               mae.model.encoder.blocks[0].attn.qkv.weight)  # fmt: skip


# -- losses and targets -----------------------------------------------------------------------------------


def test_focal_and_dice_against_hand_formulas() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])  # one 2x2 mask
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = torch.sigmoid(logits)
    by_hand = []
    for z, t in zip(p.flatten().tolist(), target.flatten().tolist()):
        pt = z if t == 1 else 1 - z
        alpha = 0.25 if t == 1 else 0.75
        by_hand.append(-alpha * (1 - pt) ** 2 * math.log(pt))
    assert sigmoid_focal_loss(logits, target).item() == pytest.approx(sum(by_hand) / 4, rel=1e-5)
    inter, total = (p * target).sum().item(), p.sum().item() + target.sum().item()
    assert dice_loss(logits, target).item() == pytest.approx(1 - (2 * inter + 1) / (total + 1), rel=1e-5)
    # perfect masks: both near zero
    big = (target * 2 - 1) * 20
    assert sigmoid_focal_loss(big, target).item() < 1e-6 and dice_loss(big, target).item() < 1e-6


def test_sam_loss_takes_the_best_of_the_outputs_and_iou_targets() -> None:
    target = torch.stack([disc(10, 10, 5), disc(20, 20, 6)]).float()
    good = (target * 2 - 1) * 10
    bad = -good
    logits = torch.stack([bad, good, bad], dim=1)  # (2, 3, H, W): the middle mask is right
    iou_true = mask_iou_targets(logits, target)
    torch.testing.assert_close(iou_true, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    loss, parts = sam_loss(logits, iou_true, target)
    assert parts["iou"].item() == 0 and loss.item() < 1e-3  # the wrong outputs do not count
    single, _ = sam_loss(logits[:, :1], iou_true[:, :1], target)
    assert single.item() > 1.0
    # the IoU target is mask_iou of the thresholded logits
    mixed = torch.randn(2, 3, S, S)
    expected = torch.stack([mask_iou(mixed[:, t] > 0, target) for t in range(3)], 1)
    torch.testing.assert_close(mask_iou_targets(mixed, target), expected)


# -- prompts ------------------------------------------------------------------------------------------------


def test_interior_points_and_boxes() -> None:
    masks = torch.stack([disc(10, 12, 5), disc(24, 6, 2.5), torch.zeros(S, S, dtype=torch.bool)])
    masks[2, 3:5, 20:29] = True  # a thin bar
    pts = interior_points(masks)
    for m, (x, y) in zip(masks, pts.long().tolist()):
        assert m[y, x], (x, y)
    assert pts[0].tolist() == [9.0, 11.0] or pts[0].tolist() == [10.0, 12.0] or (pts[0] - 9.5).abs().max() <= 1
    torch.testing.assert_close(mask_boxes(masks[2:]), torch.tensor([[20.0, 3.0, 29.0, 5.0]]))
    with pytest.raises(ValueError, match="at least one pixel"):
        interior_points(torch.zeros(1, 4, 4, dtype=torch.bool))


def test_sample_prompts_inside_outside_and_boxes() -> None:
    masks = torch.stack([disc(10, 10, 5), disc(22, 20, 4)])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pr = sample_prompts(masks, "points", g)
        pts, lab = pr["points"].long(), pr["labels"]
        assert pts.shape[:2] == lab.shape and (lab[:, 0] == 1).all()
        for m in range(2):
            for (x, y), label in zip(pts[m].tolist(), lab[m].tolist()):
                if label == 1:
                    assert masks[m, y, x]
                elif label == 0:
                    assert not masks[m, y, x]
    boxes = sample_prompts(masks, "box", g)["boxes"]
    assert (boxes - mask_boxes(masks)).abs().max() <= 2
    one = sample_prompts(masks, "point", g)
    assert one["points"].shape == (2, 1, 2)
    with pytest.raises(ValueError, match="kind"):
        sample_prompts(masks, "scribble", g)


def test_instance_masks_and_box_baseline() -> None:
    ids = torch.zeros(2, S, S, dtype=torch.long)
    ids[0, 2:6, 3:9] = 1
    ids[0, 20:25, 20:22] = 2
    ids[1, 10:12, 10:12] = 1
    masks, idx = instance_masks(ids)
    assert masks.shape == (3, S, S) and idx.tolist() == [0, 0, 1]
    torch.testing.assert_close(box_baseline(masks), torch.ones(3))  # rectangles: the box is the mask
    tri = torch.zeros(1, S, S, dtype=torch.bool)
    for r in range(8):
        tri[0, r, : r + 1] = True
    assert box_baseline(tri).item() == pytest.approx(36 / 64)


# -- the predictor and errors --------------------------------------------------------------------------------


def test_predictor_encodes_once_and_agrees_with_forward() -> None:
    sam = tiny_sam().eval()
    calls = []
    sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    predictor = SamPredictor(sam)
    x = images(1)[0]
    predictor.set_image(x)
    out_point = predictor.predict(points=[[6, 7]], point_labels=[1])
    out_box = predictor.predict(box=[2.0, 3.0, 14.0, 15.0], multimask_output=False)
    out_both = predictor.predict(points=[[6, 7], [20, 20]], point_labels=[1, 0], box=[2, 3, 14, 15])
    assert len(calls) == 1  # three prompts, one encoding
    masks, scores, low = out_point
    assert masks.shape == (3, S, S) and masks.dtype == torch.bool and scores.shape == (3,)
    assert low.shape == (3, *sam.prompt_encoder.mask_input_size)
    assert out_box[0].shape == (1, S, S) and out_both[0].shape == (3, S, S)
    # a previous low-res output goes back in as mask_input
    again = predictor.predict(points=[[6, 7]], point_labels=[1], mask_input=low[:1], multimask_output=False)
    assert again[0].shape == (1, S, S) and len(calls) == 1
    with torch.no_grad():  # the same prompt through a direct forward (which encodes again)
        logits, iou = sam(x[None], points=torch.tensor([[[6.0, 7.0]]]), labels=torch.tensor([[1]]))
    torch.testing.assert_close(scores, iou[0])
    assert torch.equal(masks, logits[0] > 0) and len(calls) == 2


def test_bad_input_errors() -> None:
    sam = tiny_sam()
    predictor = SamPredictor(sam)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(points=[[1, 1]], point_labels=[1])
    with pytest.raises(ValueError, match="image"):
        predictor.set_image(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="image"):
        predictor.set_image(torch.zeros(2, 3, S, S))
    predictor.set_image(images(1)[0])
    with pytest.raises(ValueError, match="box"):
        predictor.predict(box=[1, 2, 3])
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(points=[[1, 1], [2, 2]], point_labels=[1])
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(points=[[1, 1]])
    with pytest.raises(ValueError, match="points"):
        predictor.predict(points=[1, 1], point_labels=[1])
    with pytest.raises(ValueError, match="mask_input"):
        predictor.predict(points=[[1, 1]], point_labels=[1], mask_input=torch.zeros(1, 8, 8))
    x = images(2)
    with pytest.raises(ValueError, match="boxes"):
        sam(x, boxes=torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="disagree"):
        sam(x, torch.tensor([0, 1]), boxes=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="point_labels"):
        sam(x, points=torch.zeros(2, 1, 2), labels=torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match="no prompt"):
        sam.prompt_encoder(None, None, None, None)


# -- Lightning, config and results --------------------------------------------------------------------------


def test_lit_sam_fills_from_the_preset(monkeypatch) -> None:
    monkeypatch.setenv("MINIVFM_PROFILE", "ci")
    lit = LitSAM()
    assert "profile" not in lit.hparams and lit.hparams.max_steps == CFG.max_steps
    assert all(v is not None for v in lit.hparams.values()), dict(lit.hparams)
    assert LitSAM.from_config(CFG, decoder_dim=16).model.prompt_encoder.embed_dim == 16
    for name in ("ci", "cpu", "gpu"):
        cfg = SAMConfig.preset(name)
        assert cfg.image_size % cfg.patch_size == 0 and cfg.decoder_dim % cfg.decoder_heads == 0


@pytest.mark.slow
def test_lit_sam_trains_and_scores_fixed_prompts(tmp_path) -> None:
    import lightning as L

    from minivfm.data import Shapes

    batch = Shapes(96, seed=0).get_batch(range(96))
    data = torch.utils.data.StackDataset(image=batch["image"], mask=batch["mask"])
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    lit = LitSAM(profile="ci")
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    before = lit.model.mask_decoder.mask_tokens.detach().clone()
    trainer.fit(lit, loader, loader)
    assert not torch.equal(before, lit.model.mask_decoder.mask_tokens)
    metrics = trainer.logged_metrics
    assert {"train/loss_epoch", "val/miou_point", "val/miou_box"} <= set(metrics), set(metrics)
    assert 0 <= metrics["val/miou_box"] <= 1


@pytest.mark.slow
def test_results_ci_reports_every_key_with_baselines() -> None:
    from minivfm.results import runner

    out = runner("sam")("ci")
    keys = {"miou_point", "miou_point_oracle", "miou_box", "miou_point_scratch", "seconds", "baselines"}
    assert keys <= set(out), out
    assert {"miou_point", "miou_point_oracle", "miou_box"} <= set(out["baselines"])
    assert 0 <= out["miou_point"] <= out["miou_point_oracle"] <= 1  # ci trains 150 steps: no quality claim
    assert 0.3 < out["baselines"]["miou_box"] < 1 and out["seconds"] > 0


@pytest.mark.slow
def test_minivfm_fit_runs_configs_sam_yaml_from_an_mae_checkpoint(tmp_path) -> None:
    """``minivfm fit --config configs/sam.yaml`` end to end under ci, its encoder from an MAE checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from minivfm.models.mae import LitMAE

    root = Path(__file__).resolve().parents[1]
    mae = LitMAE(profile="ci")
    ckpt = tmp_path / "mae.ckpt"
    torch.save({"state_dict": mae.state_dict()}, ckpt)
    env = {**os.environ, "MINIVFM_PROFILE": "ci", "WANDB_MODE": "disabled"}
    args = ["fit", "--config", str(root / "configs/sam.yaml"), "--trainer.max_steps", "6",
            "--data.init_args.num_train", "128", "--data.init_args.num_val", "32", "--data.init_args.num_test", "32",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.mae_checkpoint", str(ckpt)]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "minivfm", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/miou_point = " in out.stdout and "test/miou_box = " in out.stdout, out.stdout[-2000:]
    version = next(tmp_path.glob("sam/version_0"))
    assert list(version.glob("checkpoints/*.ckpt")) and (version / "curves.png").exists()


def test_viz_prompt_masks_draws_points_and_boxes(tmp_path) -> None:
    from minivfm import viz

    x = images(2)
    masks = torch.stack([disc(10, 10, 5), disc(20, 20, 4)])
    fig = viz.prompt_masks(x, masks, points=[torch.tensor([[10.0, 10.0], [3.0, 3.0]]), torch.zeros(0, 2)],
                           point_labels=[torch.tensor([1, 0]), torch.zeros(0)],
                           boxes=torch.tensor([[float("nan")] * 4, [15.0, 15.0, 25.0, 25.0]]),
                           titles=["a point", "a box"], path=tmp_path / "p.png")  # fmt: skip
    assert (tmp_path / "p.png").exists()
    ax0, ax1 = fig.axes[:2]
    assert len(ax0.lines) == 2 and len(ax0.patches) == 0  # a star and a cross, no box
    assert len(ax1.lines) == 0 and len(ax1.patches) == 1
    with pytest.raises(ValueError, match="masks"):
        viz.prompt_masks(x, masks[:1])
    with pytest.raises(ValueError, match="titles"):
        viz.prompt_masks(x, masks, titles=["one"])
