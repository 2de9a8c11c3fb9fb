"""Checks for lesson 07 (CLIP): the contrastive loss, the sigmoid loss, zero-shot scores from prompts.

Each check runs the student's function on fixed, seeded inputs, compares it with
:mod:`minivfm.models.clip`, prints one deterministic line when it matches, and raises
``AssertionError`` with a hint when it does not. When the value is wrong, the checks compare it with
the values of common mistakes (one direction only, no temperature, a mean over every pair, no
re-normalisation) and name the one that fits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minivfm.course.checks import assert_close, assert_tensor, call_plain, passed
from minivfm.models.clip import clip_loss, ensemble_prompts, siglip_loss

__all__ = ["check_contrastive_loss", "check_sigmoid_loss", "check_zeroshot_scores"]


def _unit(*shape: int, seed: int) -> Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _pairs(B: int, M: int, E: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images ``(B, E)`` and texts ``(B + M, E)``, the matching ones a little correlated (a realistic loss)."""
    img = _unit(B, E, seed=seed)
    txt = F.normalize(torch.cat([img + 0.8 * _unit(B, E, seed=seed + 1), _unit(M, E, seed=seed + 2)]), dim=-1)
    return img, txt


def _scalar(name: str, value, inputs: tuple[Tensor, ...]) -> Tensor:
    value = assert_tensor(name, value)
    if value.ndim != 0:
        raise AssertionError(f"{name}: expected a scalar (a 0-d tensor), got shape {tuple(value.shape)}. Hint: average")
    if any(t.requires_grad for t in inputs) and value.grad_fn is None:
        raise AssertionError(
            f"{name}: the loss has no gradient to the embeddings. Hint: compute it with torch operations "
            "(no .item(), .detach(), .numpy() or Python floats in between)"
        )
    return value.detach()


def _diagnose(name: str, value: Tensor, expected: Tensor, mistakes: dict[str, Tensor], args: str) -> None:
    """Raise with the hint of the mistake whose value ``value`` matches, or a plain mismatch."""
    if torch.allclose(value, expected, atol=1e-5, rtol=1e-4):
        return
    for hint, wrong in mistakes.items():
        if torch.allclose(value, wrong, atol=1e-5, rtol=1e-4):
            raise AssertionError(
                f"{name}: got {value.item():.5f}, expected {expected.item():.5f} ({args}). Hint: {hint}"
            )
    raise AssertionError(f"{name}: got {value.item():.5f}, expected {expected.item():.5f} ({args})")


# -- the contrastive loss -----------------------------------------------------------------------------


def _contrastive_mistakes(img: Tensor, txt: Tensor, scale: float) -> dict[str, Tensor]:
    B = len(img)
    t = torch.arange(B)
    logits = scale * img @ txt.T
    i2t, t2i = F.cross_entropy(logits, t), F.cross_entropy(logits[:, :B].T, t)
    plain = img @ txt.T
    mistakes = {
        "that is the image-to-text cross-entropy only; CLIP's loss is symmetric: average it with the "
        "text-to-image one, F.cross_entropy(logits[:, :B].T, targets)": i2t,
        "that is the text-to-image cross-entropy only; average it with the image-to-text one, "
        "F.cross_entropy(logits, targets)": t2i,
        "that is the sum of the two directions; CLIP averages them: (loss_i2t + loss_t2i) / 2": i2t + t2i,
        "the logits must be multiplied by logit_scale (it is exp(t), the inverse temperature, already "
        "exponentiated): logits = logit_scale * image_emb @ text_emb.T": (
            F.cross_entropy(plain, t) + F.cross_entropy(plain[:, :B].T, t)
        )
        / 2,
        "logit_scale is already exp(t); multiply by it, do not exponentiate it again": (
            F.cross_entropy(torch.exp(torch.tensor(scale)) * plain, t)
            + F.cross_entropy(torch.exp(torch.tensor(scale)) * plain[:, :B].T, t)
        )
        / 2,
        "logit_scale multiplies the cosine similarities (it is 1 / temperature); do not divide by it": (
            F.cross_entropy(plain / scale, t) + F.cross_entropy(plain[:, :B].T / scale, t)
        )
        / 2,
        "F.cross_entropy averages over the batch by default; do not sum (reduction='sum')": (
            F.cross_entropy(logits, t, reduction="sum") + F.cross_entropy(logits[:, :B].T, t, reduction="sum")
        )
        / 2,
    }
    if len(txt) > B:
        full = F.cross_entropy(scale * txt @ img.T, torch.arange(len(txt)).clamp(max=B - 1))
        mistakes["the extra texts are negatives for the images only: the image-to-text direction scores each "
                 "image against all B + M texts, the text-to-image one only the first B texts (logits[:, :B])"] = (
            i2t + full
        ) / 2  # fmt: skip
        mistakes["with M extra texts, the image-to-text cross-entropy uses all B + M columns of the logits; "
                 "only the text-to-image direction keeps the first B"] = (
            F.cross_entropy(logits[:, :B], t) + t2i
        ) / 2  # fmt: skip
    return mistakes


def check_contrastive_loss(fn: Callable) -> None:
    """``fn(image_emb (B, E), text_emb (B + M, E), logit_scale) -> scalar``, as
    :func:`minivfm.models.clip.clip_loss`."""
    for B, M, E, scale, seed in ((6, 0, 8, 10.0, 0), (5, 3, 8, 14.3, 10), (1, 0, 4, 7.0, 20), (8, 8, 16, 50.0, 30)):
        img, txt = _pairs(B, M, E, seed)
        args = f"B = {B} images, {B + M} texts" + (f" (the last {M} hard negatives)" if M else "") + f", scale {scale}"
        img_g, txt_g = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        try:
            value = call_plain("contrastive_loss", fn, img_g, txt_g, scale)
        except (RuntimeError, ValueError, IndexError) as err:
            hint = (
                "with M extra texts the logits are (B, B + M): the targets are arange(B), and the text-to-image "
                "direction uses logits[:, :B].T"
                if M
                else "logits = logit_scale * image_emb @ text_emb.T is (B, B) and the targets are torch.arange(B)"
            )
            raise AssertionError(
                f"contrastive_loss: raised {type(err).__name__}: {err} ({args}). Hint: {hint}"
            ) from err
        value = _scalar("contrastive_loss", value, (img_g, txt_g))
        _diagnose("contrastive_loss", value, clip_loss(img, txt, scale), _contrastive_mistakes(img, txt, scale), args)
    # at its known point: identical embeddings everywhere give log(B)
    same = _unit(1, 8, seed=40).expand(4, 8)
    value = _scalar("contrastive_loss", call_plain("contrastive_loss", fn, same, same, 20.0), ())
    assert_close("contrastive_loss (4 identical pairs: expected log 4)", value, torch.tensor(4.0).log())
    passed("contrastive_loss", "symmetric InfoNCE matches the reference, with and without hard negatives")


# -- the sigmoid loss ---------------------------------------------------------------------------------


def _sigmoid_mistakes(img: Tensor, txt: Tensor, scale: float, bias: float) -> dict[str, Tensor]:
    B, BM = len(img), len(txt)
    logits = scale * img @ txt.T + bias
    z = 2 * torch.eye(B, BM) - 1
    terms = -F.logsigmoid(z * logits)
    plain = img @ txt.T
    return {
        "the loss is summed over all pairs and divided by B (the batch size), not averaged over the "
        "B x (B + M) pairs": terms.mean(),
        "the loss is summed over the pairs and divided by B, not left as a sum": terms.sum(),
        "the labels z must be +1 on the diagonal and -1 elsewhere (2 * torch.eye(B, B + M) - 1): with 0 the "
        "off-diagonal terms are all log 2": -F.logsigmoid(torch.eye(B, BM) * logits).sum() / B,
        "the bias b is added to every logit: logits = logit_scale * image_emb @ text_emb.T + logit_bias": (
            -F.logsigmoid(z * (scale * plain)).sum() / B
        ),
        "the bias is added, not subtracted": -F.logsigmoid(z * (scale * plain - bias)).sum() / B,
        "the logits must be multiplied by logit_scale (already exp(t))": -F.logsigmoid(z * (plain + bias)).sum() / B,
        "the sign: a matching pair (z = +1) should have a large positive logit, so the loss is "
        "-log sigmoid(z * logits)": -F.logsigmoid(-z * logits).sum() / B,
        "only the positives: every pair of the matrix counts, with z = -1 off the diagonal": (
            -F.logsigmoid(logits.diagonal()).sum() / B
        ),
    }


def check_sigmoid_loss(fn: Callable) -> None:
    """``fn(image_emb (B, E), text_emb (B + M, E), logit_scale, logit_bias) -> scalar``, as
    :func:`minivfm.models.clip.siglip_loss`."""
    for B, M, E, scale, bias, seed in ((6, 0, 8, 10.0, -10.0, 0), (5, 3, 8, 7.0, -2.5, 10), (8, 8, 16, 3.0, 1.0, 30)):
        img, txt = _pairs(B, M, E, seed)
        args = f"B = {B} images, {B + M} texts, scale {scale}, bias {bias}"
        img_g, txt_g = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        try:
            value = call_plain("sigmoid_loss", fn, img_g, txt_g, scale, bias)
        except (RuntimeError, ValueError, IndexError) as err:
            raise AssertionError(
                f"sigmoid_loss: raised {type(err).__name__}: {err} ({args}). Hint: the logits are (B, B + M); "
                "build the labels with torch.eye(B, B + M)"
            ) from err
        value = _scalar("sigmoid_loss", value, (img_g, txt_g))
        expected = siglip_loss(img, txt, scale, bias)
        _diagnose("sigmoid_loss", value, expected, _sigmoid_mistakes(img, txt, scale, bias), args)
    passed("sigmoid_loss", "matches the reference, with and without hard negatives")


# -- zero-shot scores ---------------------------------------------------------------------------------


def check_zeroshot_scores(fn: Callable) -> None:
    """``fn(image_emb (N, E), text_emb (K, T, E)) -> (N, K)`` cosine similarities to the ensembled class
    embeddings, as ``image_emb @ ensemble_prompts(text_emb).T``."""
    N, K, T, E = 7, 4, 3, 8
    gen = torch.Generator().manual_seed(0)
    image_emb = _unit(N, E, seed=50)
    scales = 0.5 + 2 * torch.rand(K, T, 1, generator=gen)  # templates of different norms: normalise each
    text_emb = (torch.randn(K, T, E, generator=gen) + 1.5 * torch.randn(K, 1, E, generator=gen)) * scales
    value = call_plain("zeroshot_scores", fn, image_emb.clone(), text_emb.clone())
    value = assert_tensor("zeroshot_scores", value)
    if tuple(value.shape) == (K, N) and K != N:
        raise AssertionError(f"zeroshot_scores: got shape ({K}, {N}), expected ({N}, {K}): one row per image")
    assert_tensor(f"zeroshot_scores (N = {N} images, K = {K} classes, T = {T} templates)", value, (N, K))
    value = value.detach().float()
    expected = image_emb @ ensemble_prompts(text_emb).T
    if torch.allclose(value, expected, atol=1e-5):
        passed("zeroshot_scores", f"(N, K) = ({N}, {K}), the ensembled prompts match the reference")
        return
    unit = F.normalize(text_emb, dim=-1)
    mistakes = {
        "normalise the mean again: the average of unit vectors is shorter than 1, and by a different amount "
        "for each class (averaging the similarities over the templates gives the same wrong numbers)": (
            image_emb @ unit.mean(1).T
        ),
        "normalise each template's embedding before averaging, so that every template gets the same weight": (
            image_emb @ F.normalize(text_emb.mean(1), dim=-1).T
        ),
        "use every template: average over the T dimension (dim=1) of text_emb": image_emb @ unit[:, 0].T,
    }
    for hint, wrong in mistakes.items():
        if torch.allclose(value, wrong, atol=1e-5):
            raise AssertionError(f"zeroshot_scores: the scores differ from the reference. Hint: {hint}")
    assert_close("zeroshot_scores", value, expected)
