"""Checks for lesson 06 (DINO): the EMA teacher, centering and sharpening, the centre's update, the
multi-crop loss.

Each check runs the student's function on fixed, seeded inputs, compares it with
:mod:`minivfm.models.dino`, prints one deterministic line when it matches, and raises
``AssertionError`` with a hint when it does not. Before the values, the checks compare the answer
with what each common mistake computes (the weights swapped, the centre not subtracted, the
temperatures swapped, the same-view pairs counted...) and test the gradients (none may reach the
teacher), so a wrong function is told which mistake it made.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivfm.course.checks import assert_close, assert_tensor, call, fmt_shape, passed
from minivfm.models.dino import dino_loss, update_center

__all__ = ["check_ema_update", "check_teacher_probs", "check_update_center", "check_dino_loss"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(a, b: Tensor, atol: float = 1e-5) -> bool:
    return isinstance(a, Tensor) and a.shape == b.shape and torch.allclose(a.detach().float(), b, atol=atol, rtol=1e-4)


def _first_match(got, wrong: dict[str, Tensor], default: str) -> str:
    """The hint of the first common mistake whose value ``got`` equals, else ``default``."""
    for message, value in wrong.items():
        if _close(got, value):
            return message
    return default


# -- ema_update -------------------------------------------------------------------------------------


def _pair(seed: int) -> tuple[nn.Module, nn.Module]:
    """A student and a teacher of the same architecture with different weights; the teacher frozen,
    as DINO's is."""
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=_generator(seed + 1)))
    teacher.requires_grad_(False)
    return teacher, student


def _params(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _ema_case(fn: Callable, momentum: float, seed: int) -> None:
    teacher, student = _pair(seed)
    t0, s0 = _params(teacher), _params(student)
    result = call("ema_update", fn, teacher, student, momentum)
    t1, s1 = list(teacher.parameters()), _params(student)
    if any(not torch.equal(a, b) for a, b in zip(s1, s0)):
        raise AssertionError(
            "ema_update: the student's weights changed. Hint: only the teacher moves, towards the student: "
            "ema_update(teacher, student, momentum) updates its first argument in place"
        )
    expected = [momentum * a + (1 - momentum) * b for a, b in zip(t0, s0)]
    got = [p.detach() for p in t1]
    if momentum not in (0.0, 1.0) and all(torch.equal(a, b) for a, b in zip(got, t0)):
        hint = "update the teacher's parameters in place (p_t.mul_(momentum).add_(p_s, alpha=1 - momentum))"
        if result is not None:
            hint = "you returned new tensors and left the teacher's parameters as they were; " + hint
        raise AssertionError(f"ema_update with momentum={momentum}: the teacher did not change. Hint: {hint}")
    hint = "theta_t <- momentum * theta_t + (1 - momentum) * theta_s, for every parameter"
    if all(_close(a, (1 - momentum) * b + momentum * c) for a, b, c in zip(got, t0, s0)):
        hint = (
            "you swapped the weights: the teacher keeps momentum (e.g. 0.996) of its own weights and takes "
            "only 1 - momentum of the student's; " + hint
        )
    elif all(_close(a, c) for a, c in zip(got, s0)):
        hint = "the teacher became a copy of the student; " + hint
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(f"ema_update with momentum={momentum} (parameter {i})", a, b, atol=1e-6, hint=hint)
    if any(p.requires_grad or p.grad_fn is not None for p in t1):
        raise AssertionError(
            "ema_update: the teacher's parameters are now part of the student's autograd graph (they require "
            "a gradient). Hint: no gradient flows to the teacher: do the update under torch.no_grad() (or "
            "with p_s.detach())"
        )


def check_ema_update(fn: Callable) -> None:
    """``fn(teacher, student, momentum) -> None``: the teacher's parameters moved in place towards the
    student's, as :func:`minivfm.models.dino.ema_update`."""
    _ema_case(fn, 0.9, seed=0)
    _ema_case(fn, 0.996, seed=1)
    _ema_case(fn, 0.0, seed=2)  # the teacher becomes the student
    _ema_case(fn, 1.0, seed=3)  # the teacher stays
    passed("ema_update", "teacher <- m teacher + (1 - m) student for m = 0.9, 0.996, 0, 1; student untouched")


# -- teacher_probs: centering and sharpening --------------------------------------------------------


def _ref_probs(teacher_out: Tensor, center: Tensor, temp: float) -> Tensor:
    return F.softmax((teacher_out - center) / temp, dim=-1)


def _probs_case(fn: Callable, N: int, K: int, temp: float, seed: int, center_shape: tuple) -> Tensor:
    g = _generator(seed)
    teacher_out = (torch.randn(N, K, generator=g) * 0.3).requires_grad_()
    center = torch.randn(*center_shape, generator=g) * 0.3
    got = call("teacher_probs", fn, teacher_out, center.clone(), temp)
    t, c = teacher_out.detach(), center.reshape(1, K)
    expected = _ref_probs(t, c, temp)
    assert_tensor("teacher_probs", got, (N, K))
    wrong = {
        "the centre was not subtracted; subtract it from the teacher's outputs, then divide by the "
        "temperature": _ref_probs(t, 0 * c, temp),
        "you added the centre; subtract it": _ref_probs(t, -c, temp),
        "you multiplied by the temperature; divide by it (a small temperature sharpens)": F.softmax(
            (t - c) * temp, dim=-1
        ),
        "the temperature is missing: divide (teacher_out - center) by teacher_temp before the softmax": F.softmax(
            t - c, dim=-1
        ),
        "the softmax runs over the batch (dim=0); take it over the K outputs of each image (dim=-1)": F.softmax(
            (t - c) / temp, dim=0
        ),
        "you returned log-probabilities; the teacher's targets are probabilities (softmax)": F.log_softmax(
            (t - c) / temp, dim=-1
        ),
        "you divided only the centre by the temperature; divide the difference: (teacher_out - center) / "
        "teacher_temp": F.softmax(t - c / temp, dim=-1),
    }
    hint = _first_match(got, wrong, "softmax((teacher_out - center) / teacher_temp, dim=-1)")
    assert_close(f"teacher_probs (teacher_out {fmt_shape((N, K))}, teacher_temp={temp})", got, expected, hint=hint)
    if got.requires_grad:
        raise AssertionError(
            "teacher_probs: the probabilities carry a gradient back to teacher_out. Hint: no gradient flows to "
            "the teacher: return the probabilities .detach()ed"
        )
    return got.detach()


def check_teacher_probs(fn: Callable) -> None:
    """``fn(teacher_out (N, K), center (1, K), teacher_temp) -> (N, K)``: softmax of the centred outputs
    over the temperature, detached (DINO's eq. 1 for the teacher)."""
    p_sharp = _probs_case(fn, 6, 10, 0.04, seed=0, center_shape=(1, 10))
    _probs_case(fn, 5, 7, 0.5, seed=1, center_shape=(1, 7))
    p_soft = _probs_case(fn, 6, 10, 1.0, seed=0, center_shape=(1, 10))
    assert p_sharp.amax(-1).mean() > p_soft.amax(-1).mean()  # sharpening: a smaller temperature, peakier
    passed("teacher_probs", "shape (6, 10), values match for teacher_temp 0.04, 0.5, 1; no gradient to the teacher")


# -- update_center ----------------------------------------------------------------------------------


def _center_case(fn: Callable, N: int, K: int, momentum: float, seed: int) -> None:
    g = _generator(seed)
    teacher_out = (torch.randn(N, K, generator=g) + 0.5).requires_grad_()
    center = torch.randn(1, K, generator=g)
    got = call("update_center", fn, center.clone(), teacher_out, momentum)
    t = teacher_out.detach()
    expected = update_center(center, t, momentum)
    if isinstance(got, Tensor) and tuple(got.shape) == (K,):
        raise AssertionError(
            f"update_center: expected shape (1, {K}), as the centre it replaces, got ({K},). Hint: "
            "teacher_out.mean(dim=0, keepdim=True)"
        )
    assert_tensor(f"update_center (center (1, {K}), teacher_out {fmt_shape((N, K))})", got, (1, K))
    batch_mean = t.mean(0, keepdim=True)
    wrong = {
        "you swapped the weights: the centre keeps momentum (0.9) of itself and takes 1 - momentum of the "
        "batch mean": momentum * batch_mean + (1 - momentum) * center,
        "you summed the teacher's outputs over the batch; take their mean": momentum * center
        + (1 - momentum) * t.sum(0, keepdim=True),
        "the centre is not a running average: keep momentum of the old centre": batch_mean,
        "the softmax is not part of the centre: average the teacher's raw outputs (the logits)": momentum * center
        + (1 - momentum) * F.softmax(t, -1).mean(0, keepdim=True),
    }
    hint = _first_match(got, wrong, "momentum * center + (1 - momentum) * teacher_out.mean(dim=0, keepdim=True)")
    assert_close(f"update_center with momentum={momentum}", got, expected, hint=hint)
    if got.requires_grad:
        raise AssertionError(
            "update_center: the new centre carries a gradient back to teacher_out. Hint: the centre is a running "
            "statistic of the teacher, no gradient flows through it: use teacher_out.detach() (or torch.no_grad())"
        )


def check_update_center(fn: Callable) -> None:
    """``fn(center (1, K), teacher_out (N, K), momentum) -> (1, K)``, as
    :func:`minivfm.models.dino.update_center` in a single process (DINO's eq. 4)."""
    _center_case(fn, 8, 10, 0.9, seed=0)
    _center_case(fn, 5, 7, 0.5, seed=1)
    passed("update_center", "shape (1, 10), values match for momentum 0.9 and 0.5; no gradient")


# -- dino_loss --------------------------------------------------------------------------------------


def _pairs_loss(s: Tensor, t: Tensor, c: Tensor, ts: float, tt: float, G: int, skip_same: bool = True) -> Tensor:
    """The loss with DINO's loop, and the variants the hints need."""
    B = len(t) // G
    q = F.softmax((t - c) / tt, dim=-1).chunk(G)
    log_p = F.log_softmax(s / ts, dim=-1).chunk(len(s) // B)
    terms = [
        -(qg * lp).sum(-1).mean() for g, qg in enumerate(q) for v, lp in enumerate(log_p) if v != g or not skip_same
    ]
    return torch.stack(terms).mean()


def _loss_case(fn: Callable, V: int, B: int, K: int, ts: float, tt: float, seed: int) -> None:
    G = 2
    g = _generator(seed)
    student = (torch.randn(V * B, K, generator=g) * 0.5).requires_grad_()
    teacher = (torch.randn(G * B, K, generator=g) * 0.5).requires_grad_()
    center = torch.randn(1, K, generator=g) * 0.2
    got = call("dino_loss", fn, student, teacher, center.clone(), ts, tt, G)
    s, t = student.detach(), teacher.detach()
    expected = dino_loss(s, t, center, ts, tt, G)
    got = assert_tensor("dino_loss", got)
    if got.ndim:
        raise AssertionError(
            f"dino_loss: expected a scalar, got shape {fmt_shape(got.shape)}. Hint: average the cross-entropy "
            "over the images of the batch and over the (teacher view, student view) pairs"
        )
    n_pairs = G * V - G
    cross_by_image = [  # the pairs matched by image rather than by view: the views of one image interleaved
        -(F.softmax((t - center) / tt, -1).reshape(B, G, K)[:, gi] * F.log_softmax(s / ts, -1).reshape(B, V, K)[:, v])
        .sum(-1)
        .mean()
        for gi in range(G)
        for v in range(V)
        if v != gi
    ]
    wrong = {
        "you counted the pairs of a view with itself (teacher view g and student view g); skip them: the "
        "student must predict the teacher's output of another view": _pairs_loss(s, t, center, ts, tt, G, False),
        "you swapped the temperatures: the student's outputs are divided by student_temp, the teacher's by "
        "teacher_temp (the smaller one)": _pairs_loss(s, t, center, tt, ts, G),
        "the student's outputs were divided by teacher_temp; divide them by student_temp": _pairs_loss(
            s, t, center, tt, tt, G
        ),
        "the teacher's outputs were divided by student_temp; divide them by teacher_temp": _pairs_loss(
            s, t, center, ts, ts, G
        ),
        "the centre was not subtracted from the teacher's outputs": _pairs_loss(s, t, 0 * center, ts, tt, G),
        "only the student's global views count in your loss; every student view counts, the local ones "
        "too": _pairs_loss(s[: G * B], t, center, ts, tt, G),
        "you summed over the pairs; average over them (divide by their number)": n_pairs
        * _pairs_loss(s, t, center, ts, tt, G),
        "you summed over the images of the batch; average over them": B * _pairs_loss(s, t, center, ts, tt, G),
        "the sign: H(p_t, p_s) = -sum p_t log p_s is positive": -_pairs_loss(s, t, center, ts, tt, G),
        "the rows are view by view (all B images of view 0, then view 1...): split them with "
        ".chunk(num_views), not by reshaping to (B, V, K)": torch.stack(cross_by_image).mean(),
    }
    hint = _first_match(
        got,
        wrong,
        "for each teacher view g and each student view v != g: the batch mean of "
        "-sum(teacher_probs(g) * log_softmax(student_v / student_temp)); then the mean over the pairs",
    )
    assert_close(f"dino_loss (V={V} views of B={B} images, K={K})", got, expected, hint=hint)
    if not got.requires_grad:
        raise AssertionError("dino_loss: no gradient reaches student_out (no .detach(), .item() or numpy on it)")
    got.backward()
    if student.grad is None or not student.grad.abs().sum():
        raise AssertionError("dino_loss: no gradient reaches student_out (no .detach(), .item() or numpy on it)")
    if teacher.grad is not None and teacher.grad.abs().sum():
        raise AssertionError(
            "dino_loss: a gradient reaches teacher_out. Hint: the teacher is trained by EMA only; detach its "
            "probabilities (your teacher_probs does)"
        )


def check_dino_loss(fn: Callable) -> None:
    """``fn(student_out (V*B, K), teacher_out (2*B, K), center, student_temp, teacher_temp, n_global=2)
    -> scalar``, as :func:`minivfm.models.dino.dino_loss`."""
    _loss_case(fn, V=4, B=3, K=8, ts=0.1, tt=0.04, seed=0)
    _loss_case(fn, V=6, B=5, K=16, ts=0.1, tt=0.07, seed=1)
    _loss_case(fn, V=2, B=4, K=8, ts=0.2, tt=0.05, seed=2)  # global views only: two pairs
    passed("dino_loss", "views (4, 6 and 2 per image), values match; gradient to the student only")
