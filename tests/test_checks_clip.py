"""Lesson 07's checks (minivfm.course.checks.clip): they pass the library's functions, fail the untouched
stubs, and fail common wrong implementations with a hint that names the mistake."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minivfm.course.checks import clip as checks
from minivfm.models.clip import clip_loss, ensemble_prompts, siglip_loss


def _zeroshot_scores(image_emb, text_emb):
    return image_emb @ ensemble_prompts(text_emb).T


def test_checks_pass_the_library(capsys):
    checks.check_contrastive_loss(clip_loss)
    checks.check_sigmoid_loss(siglip_loss)
    checks.check_zeroshot_scores(_zeroshot_scores)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("✓ ") for line in lines), lines


def test_checks_pass_other_correct_implementations(capsys):
    def loss_bce(img, txt, scale, bias):  # BCE with 0/1 targets is the same loss
        logits = scale * img @ txt.T + bias
        target = torch.eye(*logits.shape)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(img)

    def loss_logsoftmax(img, txt, scale):
        B = len(img)
        logits = scale * img @ txt.T
        i2t = -logits.log_softmax(1).diagonal().mean()
        t2i = -logits[:, :B].log_softmax(0).diagonal().mean()
        return 0.5 * (i2t + t2i)

    def scores_loop(image_emb, text_emb):
        cols = []
        for k in range(len(text_emb)):
            e = torch.stack([t / t.norm() for t in text_emb[k]]).sum(0)
            cols.append(image_emb @ (e / e.norm()))
        return torch.stack(cols, dim=1)

    checks.check_contrastive_loss(loss_logsoftmax)
    checks.check_sigmoid_loss(loss_bce)
    checks.check_zeroshot_scores(scores_loop)
    assert capsys.readouterr().out.count("✓") == 3


def _stub(*args, **kwargs):
    raise NotImplementedError()


@pytest.mark.parametrize("check", ["check_contrastive_loss", "check_sigmoid_loss", "check_zeroshot_scores"])
def test_checks_fail_the_stub(check):
    with pytest.raises(AssertionError, match="not implemented yet; fill in the exercise cell above"):
        getattr(checks, check)(_stub)


# -- wrong contrastive losses ---------------------------------------------------------------------------


def _i2t_only(img, txt, scale):
    logits = scale * img @ txt.T
    return F.cross_entropy(logits, torch.arange(len(img)))


def _t2i_only(img, txt, scale):
    B = len(img)
    return F.cross_entropy((scale * img @ txt.T)[:, :B].T, torch.arange(B))


def _sum_both(img, txt, scale):
    return 2 * clip_loss(img, txt, scale)


def _no_scale(img, txt, scale):
    return clip_loss(img, txt, 1.0)


def _exp_scale(img, txt, scale):
    return clip_loss(img, txt, torch.exp(torch.tensor(scale)))


def _divide_scale(img, txt, scale):
    return clip_loss(img, txt, 1 / scale)


def _reduction_sum(img, txt, scale):
    return clip_loss(img, txt, scale) * len(img)


def _square_only(img, txt, scale):  # the plain (B, B) loss, which cannot take extra texts
    logits = scale * img @ txt.T
    t = torch.arange(len(logits))
    return (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2


def _i2t_drops_negatives(img, txt, scale):
    B = len(img)
    return clip_loss(img, txt[:B], scale)


def _detached(img, txt, scale):
    return torch.tensor(clip_loss(img, txt, scale).item())


def _not_scalar(img, txt, scale):
    logits = scale * img @ txt.T
    return F.cross_entropy(logits, torch.arange(len(img)), reduction="none")


@pytest.mark.parametrize(
    "fn, match",
    [
        (_i2t_only, "image-to-text cross-entropy only"),
        (_t2i_only, "text-to-image cross-entropy only"),
        (_sum_both, "CLIP averages them"),
        (_no_scale, "multiplied by logit_scale"),
        (_exp_scale, "do not exponentiate it again"),
        (_divide_scale, "do not divide by it"),
        (_reduction_sum, "do not sum"),
        (_square_only, "raised .*Hint: with M extra texts the logits are \\(B, B \\+ M\\)"),
        (_i2t_drops_negatives, "uses all B \\+ M columns"),
        (_detached, "no gradient"),
        (_not_scalar, "expected a scalar"),
    ],
)
def test_contrastive_check_names_the_mistake(fn, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_contrastive_loss(fn)


# -- wrong sigmoid losses -------------------------------------------------------------------------------


def _sig_parts(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias
    z = 2 * torch.eye(*logits.shape) - 1
    return logits, z


def _sig_mean(img, txt, scale, bias):
    logits, z = _sig_parts(img, txt, scale, bias)
    return -F.logsigmoid(z * logits).mean()


def _sig_zero_labels(img, txt, scale, bias):
    logits, _ = _sig_parts(img, txt, scale, bias)
    return -F.logsigmoid(torch.eye(*logits.shape) * logits).sum() / len(img)


def _sig_no_bias(img, txt, scale, bias):
    return siglip_loss(img, txt, scale, 0.0)


def _sig_minus_bias(img, txt, scale, bias):
    return siglip_loss(img, txt, scale, -bias)


def _sig_sign(img, txt, scale, bias):
    logits, z = _sig_parts(img, txt, scale, bias)
    return -F.logsigmoid(-z * logits).sum() / len(img)


def _sig_positives_only(img, txt, scale, bias):
    logits, _ = _sig_parts(img, txt, scale, bias)
    return -F.logsigmoid(logits.diagonal()).sum() / len(img)


def _sig_square_eye(img, txt, scale, bias):  # torch.eye(B) cannot take the extra texts
    logits = scale * img @ txt.T + bias
    z = 2 * torch.eye(len(img)) - 1
    return -F.logsigmoid(z * logits).sum() / len(img)


@pytest.mark.parametrize(
    "fn, match",
    [
        (_sig_mean, "divided by B \\(the batch size\\), not averaged"),
        (_sig_zero_labels, "-1 elsewhere"),
        (_sig_no_bias, "the bias b is added to every logit"),
        (_sig_minus_bias, "added, not subtracted"),
        (_sig_sign, "the sign"),
        (_sig_positives_only, "only the positives"),
        (_sig_square_eye, "raised .*torch.eye\\(B, B \\+ M\\)"),
    ],
)
def test_sigmoid_check_names_the_mistake(fn, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_sigmoid_loss(fn)


# -- wrong zero-shot scores -----------------------------------------------------------------------------


def _zs_no_renorm(image_emb, text_emb):
    return image_emb @ F.normalize(text_emb, dim=-1).mean(1).T


def _zs_no_prenorm(image_emb, text_emb):
    return image_emb @ F.normalize(text_emb.mean(1), dim=-1).T


def _zs_mean_of_similarities(image_emb, text_emb):
    return torch.einsum("ne,kte->nkt", image_emb, F.normalize(text_emb, dim=-1)).mean(-1)


def _zs_first_template(image_emb, text_emb):
    return image_emb @ F.normalize(text_emb[:, 0], dim=-1).T


def _zs_transposed(image_emb, text_emb):
    return _zeroshot_scores(image_emb, text_emb).T


@pytest.mark.parametrize(
    "fn, match",
    [
        (_zs_no_renorm, "normalise the mean again"),
        (_zs_no_prenorm, "before averaging"),
        (_zs_mean_of_similarities, "averaging the similarities over the templates"),
        (_zs_first_template, "use every template"),
        (_zs_transposed, "one row per image"),
    ],
)
def test_zeroshot_check_names_the_mistake(fn, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_zeroshot_scores(fn)
