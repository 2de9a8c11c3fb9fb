"""Tests for minivfm.models.clip: the tokenizer, the causal text encoder, the two losses against
hand-written references, the logit scale, zero-shot, retrieval, the CLIP score, Lightning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minivfm.data.shapes import VOCAB, Shapes
from minivfm.models.clip import (
    CLASS_NAMES,
    CLIP,
    HELD_OUT,
    TEMPLATES,
    CLIPConfig,
    LitCLIP,
    TextEncoder,
    Tokenizer,
    clip_loss,
    clip_score,
    drop_positions,
    ensemble_prompts,
    hard_negative,
    mentions,
    retrieval_recall,
    shapes_pairs,
    siglip_loss,
    zeroshot_classifier,
    zeroshot_predict,
)
from minivfm.models.vit import ViT

S = 16  # image size


def tiny_clip(loss: str = "clip", seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    tok = Tokenizer()
    visual = ViT(image_size=S, patch_size=8, num_classes=0, embed_dim=16, depth=1, num_heads=2, stem="conv")
    text = TextEncoder(tok.vocab_size, context_length=32, width=16, depth=2, num_heads=2)
    return CLIP(visual, text, joint_dim=8, loss=loss, tokenizer=tok)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# -- Tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_round_trip_on_shapes_captions() -> None:
    tok = Tokenizer()
    captions = Shapes(50, seed=0).get_batch(range(50))["caption"]
    ids = tok.encode(captions, context_length=32)
    assert ids.shape == (50, 32) and ids.dtype == torch.long
    assert tok.decode(ids) == captions
    assert tok.decode(ids[0]) == captions[0]
    assert (ids != tok.unk_id).all()  # every word of a caption is in the vocabulary
    assert tok.vocab_size == len(VOCAB) + 3


def test_tokenizer_layout_end_token_and_padding() -> None:
    tok = Tokenizer()
    ids = tok.encode(["A Red  circle", "a"], context_length=6)
    red, circle = tok.stoi["red"], tok.stoi["circle"]
    assert ids.tolist() == [[tok.stoi["a"], red, circle, tok.eot_id, 0, 0], [tok.stoi["a"], tok.eot_id, 0, 0, 0, 0]]
    assert tok.pad_id == 0 and tok.eot_id == tok.vocab_size - 1
    assert (ids.argmax(-1) == torch.tensor([3, 1])).all()  # the end token is the largest id: CLIP's pooling trick
    assert tok.encode("a red circle", 8).shape == (1, 8)  # one str -> one row


def test_tokenizer_unknown_words() -> None:
    tok = Tokenizer()
    ids = tok.encode("a purple hexagon", 8)[0]
    assert ids[2].item() == tok.unk_id and ids[1].item() == tok.stoi["purple"]
    assert tok.decode(ids) == "a purple <unk>"


def test_tokenizer_errors() -> None:
    tok = Tokenizer()
    with pytest.raises(ValueError, match=r"texts\[1\] has 5 words, 6 tokens .* context_length=5"):
        tok.encode(["a red circle", "a b c d e"], context_length=5)
    tok.encode("a b c d", context_length=5)  # 4 words and the end token fit exactly
    with pytest.raises(TypeError, match="texts: expected str, got int"):
        tok.encode(["a red circle", 3])
    with pytest.raises(TypeError, match="texts: expected a str or a sequence of str"):
        tok.encode(42)
    with pytest.raises(ValueError, match="context_length"):
        tok.encode("a", context_length=1)
    with pytest.raises(ValueError, match="not in"):
        tok.decode([3, 999])
    with pytest.raises(ValueError, match="vocab"):
        Tokenizer(["a", "a"])


# -- TextEncoder -------------------------------------------------------------------------------------


def test_text_encoder_is_causal_and_pools_at_the_end_token() -> None:
    torch.manual_seed(0)
    tok = Tokenizer()
    enc = TextEncoder(tok.vocab_size, context_length=16, width=16, depth=2, num_heads=2).eval()
    short = tok.encode("a red circle", 16)
    with torch.no_grad():
        out = enc(short)
        # anything after the end token (a later token where padding was) leaves the output unchanged
        changed = short.clone()
        changed[0, 5:9] = torch.tensor([tok.stoi["blue"], tok.stoi["square"], tok.stoi["and"], tok.stoi["a"]])
        assert torch.allclose(enc(changed), out, atol=1e-6)
        # ... and so does cutting the padding off
        assert torch.allclose(enc(short[:, :4]), out, atol=1e-6)
        # a change before the end token does change it
        other = short.clone()
        other[0, 1] = tok.stoi["blue"]
        assert not torch.allclose(enc(other), out, atol=1e-4)
        # it is the end token's features: position 3 of the final norm's output
        x = enc.token_embedding(short) + enc.positional_embedding
        for block in enc.blocks:
            x = block(x, is_causal=True)
        assert torch.allclose(enc.ln_final(x)[:, 3], out, atol=1e-6)


def test_text_encoder_errors() -> None:
    enc = TextEncoder(10, context_length=4, width=8, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="LongTensor"):
        enc(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="more than context_length=4"):
        enc(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        enc(torch.full((1, 4), 10))


# -- the losses --------------------------------------------------------------------------------------


def test_clip_loss_equals_cross_entropy_both_ways() -> None:
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    scale = 7.5
    logits = scale * img @ txt.T
    i2t = -sum(torch.log_softmax(logits[i], 0)[i] for i in range(6)) / 6
    t2i = -sum(torch.log_softmax(logits[:, j], 0)[j] for j in range(6)) / 6
    torch.testing.assert_close(clip_loss(img, txt, scale), (i2t + t2i) / 2)
    # not symmetric in its arguments' roles by accident: swapping image and text gives the same loss
    torch.testing.assert_close(clip_loss(txt, img, scale), (i2t + t2i) / 2)
    # a tensor scale gets a gradient
    t = torch.tensor(2.0, requires_grad=True)
    clip_loss(img, txt, t.exp()).backward()
    assert t.grad is not None and t.grad != 0


@pytest.mark.parametrize("B", [1, 4, 32])
def test_clip_loss_of_uninformative_embeddings_is_log_b(B: int) -> None:
    same = unit(1, 8).expand(B, 8)  # every image and every text alike
    torch.testing.assert_close(clip_loss(same, same, 100.0), torch.tensor(math.log(B)))
    img = unit(B, 8, seed=3)
    torch.testing.assert_close(clip_loss(img, img, 0.0), torch.tensor(math.log(B)))  # scale 0: uniform logits


def test_clip_loss_is_low_when_pairs_match() -> None:
    img = F.normalize(torch.eye(8)[:5] + 0.01, dim=-1)
    assert clip_loss(img, img, 100.0) < 1e-3 < clip_loss(img, img.roll(1, 0), 100.0)


def test_siglip_loss_equals_a_loop() -> None:
    img, txt = unit(5, 8, seed=4), unit(5, 8, seed=5)
    t, b = 10.0, -10.0
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (t * float(img[i] @ txt[j]) + b))))
    torch.testing.assert_close(siglip_loss(img, txt, t, b), torch.tensor(total / 5, dtype=torch.float32))
    # its initial value: about B * (log(1 + e^-b) for the positives ...) / B, dominated by the positives
    same = unit(1, 8).expand(4, 8)
    expected = (-F.logsigmoid(torch.tensor(t + b)) - 3 * F.logsigmoid(torch.tensor(-(t + b)))).item()
    assert siglip_loss(same, same, t, b).item() == pytest.approx(expected, rel=1e-5)


def test_losses_with_extra_hard_negative_texts() -> None:
    img, txt, neg = unit(4, 8, seed=10), unit(4, 8, seed=11), unit(3, 8, seed=12)
    scale, bias = 5.0, -2.0
    texts = torch.cat([txt, neg])  # (7, E): the 4 captions, then 3 negatives
    logits = scale * img @ texts.T  # (4, 7)
    i2t = F.cross_entropy(logits, torch.arange(4))  # image i against all 7 texts
    t2i = F.cross_entropy(logits[:, :4].T, torch.arange(4))  # caption j against the 4 images only
    torch.testing.assert_close(clip_loss(img, texts, scale), (i2t + t2i) / 2)
    assert clip_loss(img, texts, scale) > clip_loss(img, txt, scale)  # more negatives, a higher loss
    total = 0.0
    for i in range(4):
        for j in range(7):
            z = 1.0 if i == j else -1.0
            total += -F.logsigmoid(torch.tensor(z * (scale * float(img[i] @ texts[j]) + bias))).item()
    assert siglip_loss(img, texts, scale, bias).item() == pytest.approx(total / 4, rel=1e-5)


@pytest.mark.parametrize("loss", [clip_loss, lambda i, t, s: siglip_loss(i, t, s, -1.0)])
def test_loss_errors(loss) -> None:
    with pytest.raises(ValueError, match="image_emb: expected embeddings"):
        loss(torch.randn(4), torch.randn(4, 8), 1.0)
    with pytest.raises(ValueError, match="B captions first"):
        loss(torch.randn(4, 8), torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match="B captions first"):
        loss(torch.randn(4, 8), torch.randn(4, 6), 1.0)


# -- the model ---------------------------------------------------------------------------------------


def test_logit_scale_init_and_clamp() -> None:
    model = tiny_clip()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and model.logit_bias is None
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    sig = tiny_clip("siglip")
    assert sig.scale().item() == pytest.approx(10.0, rel=1e-5) and sig.logit_bias.item() == -10.0


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_shapes_and_gradients_reach_every_parameter(loss: str) -> None:
    model = tiny_clip(loss)
    images = torch.randn(4, 3, S, S)
    captions = Shapes(4, seed=1).get_batch(range(4))["caption"]
    value, img, txt = model(images, model.tokenize(captions))
    assert value.ndim == 0 and img.shape == (4, 8) and txt.shape == (4, 8)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    value.backward()
    # the text encoder's rows of tokens that never occur get no gradient: check the rest
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 or name == "text.token_embedding.weight", name
    assert model.text.token_embedding.weight.grad[model.tokenize(captions).unique()].abs().sum() > 0


def test_determinism_with_a_seed() -> None:
    images = torch.randn(3, 3, S, S)
    a, b, c = tiny_clip(seed=0), tiny_clip(seed=0), tiny_clip(seed=1)
    tokens = a.tokenize(["a red circle", "a blue square", "a green triangle at the top"])
    assert torch.equal(a(images, tokens)[0], b(images, tokens)[0])
    assert not torch.equal(a(images, tokens)[0], c(images, tokens)[0])


def test_clip_refuses_bad_arguments() -> None:
    model = tiny_clip()
    with pytest.raises(ValueError, match="loss"):
        CLIP(model.visual, model.text, 8, loss="triplet")
    with pytest.raises(ValueError, match="without a head"):
        CLIP(ViT(image_size=S, patch_size=8, num_classes=3, embed_dim=16, depth=1, num_heads=2), model.text)
    with pytest.raises(ValueError, match="one caption per image"):
        model(torch.randn(2, 3, S, S), model.tokenize(["a"]))
    value, _, text_emb = model(torch.randn(2, 3, S, S), model.tokenize(["a red circle", "a", "a blue circle"]))
    assert text_emb.shape == (3, 8) and value.ndim == 0  # a third caption: a hard negative
    with pytest.raises(ValueError, match="images are 32x32"):
        model.encode_image(torch.randn(2, 3, 32, 32))


# -- zero-shot, retrieval, CLIP score ----------------------------------------------------------------


def test_prompt_ensembling_and_zero_shot_on_hand_built_embeddings() -> None:
    # class k's templates point near axis k; images near axis k are class k
    K, T, E = 4, 3, 6
    base = torch.eye(E)[:K]  # (K, E)
    noise = 0.3 * unit(K, T, E, seed=6)
    text = base[:, None] + noise  # (K, T, E), unnormalised
    class_emb = ensemble_prompts(text)
    expected = F.normalize(F.normalize(text, dim=-1).mean(1), dim=-1)
    torch.testing.assert_close(class_emb, expected)
    torch.testing.assert_close(class_emb.norm(dim=-1), torch.ones(K))
    labels = torch.tensor([2, 0, 3, 1, 1])
    images = F.normalize(base[labels] + 0.1 * unit(5, E, seed=7), dim=-1)
    assert torch.equal(zeroshot_predict(images, class_emb), labels)
    with pytest.raises(ValueError, match=r"\(K, T, E\)"):
        ensemble_prompts(torch.randn(4, 6))
    with pytest.raises(ValueError, match="same E"):
        zeroshot_predict(images, torch.randn(K, E + 1))


def test_zeroshot_classifier_shapes_and_templates() -> None:
    model = tiny_clip()
    class_emb = zeroshot_classifier(model)
    assert class_emb.shape == (12, 8) and len(CLASS_NAMES) == 12 and CLASS_NAMES[0] == "red circle"
    assert CLASS_NAMES == Shapes(1).class_names  # label k of Shapes is CLASS_NAMES[k]
    one = zeroshot_classifier(model, ["red circle"], ["a {}"])
    torch.testing.assert_close(one[0], model.encode_text(["a red circle"])[0])
    assert all("{}" in t for t in TEMPLATES) and len(TEMPLATES) > 3
    with pytest.raises(ValueError, match="templates"):
        zeroshot_classifier(model, ["red circle"], ["a red circle"])


def test_retrieval_recall_on_hand_built_embeddings() -> None:
    img = unit(5, 8, seed=8)
    txt = img.clone()
    txt[[3, 4]] = txt[[4, 3]]  # pairs 3 and 4 swapped: 3 of 5 right both ways
    out = retrieval_recall(img, txt)
    assert out == pytest.approx({"i2t": 0.6, "t2i": 0.6, "chance": 0.2})
    # the same caption on pairs 3 and 4: the swap is no longer a mistake
    out = retrieval_recall(img, txt, ["a", "b", "c", "d", "d"])
    assert out["i2t"] == out["t2i"] == 1.0 and out["chance"] == pytest.approx((3 + 2 * 2) / 25)
    # the directions differ: one text close to every image is every image's best text, and the best
    # image of its own caption only
    txt3 = img.clone()
    txt3[0] = F.normalize(img.sum(0), dim=-1)
    sim = img @ txt3.T
    out = retrieval_recall(img, txt3)
    assert out["i2t"] == pytest.approx((sim.argmax(1) == torch.arange(5)).float().mean().item())
    assert out["t2i"] == pytest.approx((sim.argmax(0) == torch.arange(5)).float().mean().item())
    with pytest.raises(ValueError, match="captions"):
        retrieval_recall(img, txt, ["a"])


def test_clip_score_range_and_definition() -> None:
    model = tiny_clip()
    images = torch.randn(3, 3, S, S)
    captions = ["a red circle", "a large blue square at the top", "a small green triangle"]
    per_pair = clip_score(model, images, captions, reduction="none")
    assert per_pair.shape == (3,) and ((per_pair >= 0) & (per_pair <= 100)).all()
    with torch.no_grad():
        cos = (model.encode_image(images) * model.encode_text(captions)).sum(-1)
    torch.testing.assert_close(per_pair, 100 * cos.clamp_min(0))
    torch.testing.assert_close(clip_score(model, images, captions), per_pair.mean())
    with pytest.raises(ValueError, match="one per image"):
        clip_score(model, images, captions[:2])
    with pytest.raises(ValueError, match="reduction"):
        clip_score(model, images, captions, reduction="sum")
    with pytest.raises(ValueError, match=r"images: expected \(N, C, H, W\)"):
        clip_score(model, images[0], captions[0])


def test_caption_augmentations() -> None:
    caption = "a medium blue triangle at the bottom right and a small red circle in the center and a large green square"
    assert drop_positions(caption) == "a medium blue triangle and a small red circle and a large green square"
    assert drop_positions("a large red circle at the top left") == "a large red circle"
    g = torch.Generator().manual_seed(0)
    negatives = {hard_negative(caption, generator=g) for _ in range(60)}
    for neg in negatives:  # one word changed: a colour for a colour, a kind for a kind
        diff = [(a, b) for a, b in zip(caption.split(), neg.split()) if a != b]
        assert len(neg.split()) == len(caption.split()) and len(diff) == 1, neg
        a, b = diff[0]
        assert {a, b} <= set(Shapes.DEFAULT_COLORS) or {a, b} <= set(Shapes.SHAPES), diff
    assert len(negatives) == 3 * (3 + 2)  # every swap of the 3 shapes' colour (3 others) and kind (2 others)
    # never naming a held-out class: "a large blue square" may become "a large blue circle", not "... triangle"
    assert {hard_negative("a large blue square", HELD_OUT, g) for _ in range(40)} == {
        "a large red square", "a large yellow square", "a large blue circle"}  # fmt: skip
    with pytest.raises(ValueError, match="no colour or kind"):
        hard_negative("a large thing")


def test_held_out_captions_are_filtered_at_any_shape() -> None:
    assert mentions("a small blue square on the left and a large red circle at the top", ["red circle"])
    assert not mentions("a large red square and a small green circle", ["red circle", "green square"])
    pairs = shapes_pairs(300, seed=0, exclude=HELD_OUT)
    assert len(pairs["caption"]) == len(pairs["image"]) == len(pairs["label"]) == 300
    assert not any(mentions(c, HELD_OUT) for c in pairs["caption"])
    words = " ".join(pairs["caption"])
    for word in ("red", "green", "blue", "yellow", "circle", "square", "triangle"):
        assert word in words  # every colour and every kind is still seen
    full = shapes_pairs(300, seed=0)
    assert sum(mentions(c, HELD_OUT) for c in full["caption"]) > 30


# -- Lightning ---------------------------------------------------------------------------------------


def test_lit_clip_fills_from_the_preset(monkeypatch) -> None:
    monkeypatch.setenv("MINIVFM_PROFILE", "ci")
    lit = LitCLIP()
    cfg = CLIPConfig.preset("ci")
    assert all(v is not None for v in lit.hparams.values()), dict(lit.hparams)
    assert "profile" not in lit.hparams and lit.hparams.max_epochs == cfg.max_epochs
    assert lit.model.visual.embed_dim == cfg.embed_dim and lit.model.loss_name == "clip"
    assert type(lit.model.visual.patch_embed).__name__ == "ConvStem"
    assert LitCLIP.from_config(cfg, loss="siglip").model.logit_bias is not None


def test_presets() -> None:
    from minivfm.models.vit import ViTConfig

    for name in ("ci", "cpu", "gpu"):
        cfg = CLIPConfig.preset(name)
        assert cfg.image_size % cfg.patch_size == 0 and cfg.stem == "conv" and cfg.context_length >= 27
    cpu, vit = CLIPConfig.preset("cpu"), ViTConfig.preset("cpu")
    assert (cpu.patch_size, cpu.embed_dim, cpu.depth, cpu.num_heads, cpu.stem) == (
        vit.patch_size, vit.embed_dim, vit.depth, vit.num_heads, vit.stem)  # fmt: skip
    with pytest.raises(ValueError, match="profile"):
        CLIPConfig.preset("tpu")


@pytest.mark.slow
def test_lit_clip_trains_and_logs(tmp_path) -> None:
    import lightning as L

    from minivfm.models.clip import pairs_loader

    torch.manual_seed(0)
    lit = LitCLIP(profile="ci", image_size=S)
    pairs = shapes_pairs(32, image_size=S, seed=0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                        limit_val_batches=1, num_sanity_val_steps=0)  # fmt: skip
    before = [p.detach().clone() for p in lit.parameters()]
    trainer.fit(lit, pairs_loader(pairs, 16), pairs_loader(pairs, 16, shuffle=False))
    assert any(not torch.equal(a, b) for a, b in zip(before, lit.parameters()))
    assert {"train/loss_step", "train/logit_scale", "val/loss", "val/zeroshot_acc"} <= set(trainer.logged_metrics)
    assert lit(pairs["image"][:2]).shape == (2, CLIPConfig.preset("ci").joint_dim)
    path = tmp_path / "clip.ckpt"
    trainer.save_checkpoint(path)
    loaded = LitCLIP.load_from_checkpoint(path)
    for (k, a), b in zip(lit.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_results_ci_reports_every_key_with_baselines() -> None:
    from minivfm.results import runner

    out = runner("clip")("ci")
    keys = {"zeroshot_acc", "zeroshot_acc_siglip", "zeroshot_acc_one_shape", "zeroshot_heldout_acc"}
    keys |= {"zeroshot_heldout_acc_seen", "retrieval_r1_i2t", "retrieval_r1_t2i"}
    assert keys | {"seconds", "baselines"} <= set(out), out
    assert out["baselines"]["zeroshot_acc"] == pytest.approx(1 / 12)
    assert out["baselines"]["retrieval_r1_i2t"] == pytest.approx(1 / CLIPConfig.preset("ci").num_retrieval)
    for key in keys:  # ci trains a few steps: no quality claim
        assert 0 <= out[key] <= 1, (key, out[key])
    assert math.isfinite(out["seconds"]) and out["seconds"] > 0
