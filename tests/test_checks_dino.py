"""Lesson 06's checks (minivfm.course.checks.dino): they pass the library's functions, fail the untouched
stubs, and fail common wrong implementations with a hint that names the mistake."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minivfm.course.checks import dino as checks
from minivfm.models.dino import dino_loss, ema_update, update_center


def _teacher_probs(teacher_out, center, teacher_temp):
    return F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach()


def _loop_loss(student_out, teacher_out, center, student_temp, teacher_temp, n_global=2, probs=_teacher_probs,
               skip_same=True, local=True, reduce="mean"):  # fmt: skip
    """DINO's loop, and the variants of it that the wrong implementations below make."""
    B = len(teacher_out) // n_global
    q = probs(teacher_out, center, teacher_temp).chunk(n_global)
    log_p = F.log_softmax(student_out / student_temp, dim=-1).chunk(len(student_out) // B)
    if not local:
        log_p = log_p[:n_global]
    terms = [
        -(qg * lp).sum(-1).mean() for g, qg in enumerate(q) for v, lp in enumerate(log_p) if v != g or not skip_same
    ]
    return torch.stack(terms).sum() if reduce == "sum" else torch.stack(terms).mean()


def test_checks_pass_the_library(capsys):
    checks.check_ema_update(ema_update)
    checks.check_teacher_probs(_teacher_probs)
    checks.check_update_center(update_center)
    checks.check_dino_loss(dino_loss)
    checks.check_dino_loss(_loop_loss)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("✓ ") for line in lines), lines


def _stub(*args, **kwargs):
    raise NotImplementedError()


@pytest.mark.parametrize("check", ["check_ema_update", "check_teacher_probs", "check_update_center", "check_dino_loss"])
def test_checks_fail_the_stub(check):
    with pytest.raises(AssertionError, match="not implemented yet; fill in the exercise cell above"):
        getattr(checks, check)(_stub)


# -- wrong ema_update -------------------------------------------------------------------------------------


@torch.no_grad()
def _ema_swapped(teacher, student, momentum):
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(1 - momentum).add_(ps, alpha=momentum)


@torch.no_grad()
def _ema_updates_the_student(teacher, student, momentum):
    ema_update(student, teacher, momentum)


def _ema_no_grad_missing(teacher, student, momentum):  # the teacher joins the student's graph
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps, alpha=1 - momentum)


@torch.no_grad()
def _ema_returns_new_tensors(teacher, student, momentum):
    return [momentum * pt + (1 - momentum) * ps for pt, ps in zip(teacher.parameters(), student.parameters())]


@torch.no_grad()
def _ema_copies_the_student(teacher, student, momentum):
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.copy_(ps)


# -- wrong teacher_probs ----------------------------------------------------------------------------------


def _probs_no_center(teacher_out, center, teacher_temp):
    return F.softmax(teacher_out / teacher_temp, dim=-1).detach()


def _probs_center_added(teacher_out, center, teacher_temp):
    return F.softmax((teacher_out + center) / teacher_temp, dim=-1).detach()


def _probs_times_temp(teacher_out, center, teacher_temp):
    return F.softmax((teacher_out - center) * teacher_temp, dim=-1).detach()


def _probs_dim0(teacher_out, center, teacher_temp):
    return F.softmax((teacher_out - center) / teacher_temp, dim=0).detach()


def _probs_not_detached(teacher_out, center, teacher_temp):
    return F.softmax((teacher_out - center) / teacher_temp, dim=-1)


def _probs_log(teacher_out, center, teacher_temp):
    return F.log_softmax((teacher_out - center) / teacher_temp, dim=-1).detach()


# -- wrong update_center ----------------------------------------------------------------------------------


def _center_swapped(center, teacher_out, momentum):
    return (1 - momentum) * center + momentum * teacher_out.detach().mean(0, keepdim=True)


def _center_sum(center, teacher_out, momentum):
    return momentum * center + (1 - momentum) * teacher_out.detach().sum(0, keepdim=True)


def _center_flat(center, teacher_out, momentum):
    return momentum * center[0] + (1 - momentum) * teacher_out.detach().mean(0)


def _center_not_detached(center, teacher_out, momentum):
    return momentum * center + (1 - momentum) * teacher_out.mean(0, keepdim=True)


def _center_batch_mean_only(center, teacher_out, momentum):
    return teacher_out.detach().mean(0, keepdim=True)


# -- wrong dino_loss --------------------------------------------------------------------------------------


def _loss_same_view_pairs(s, t, c, ts, tt, n_global=2):
    return _loop_loss(s, t, c, ts, tt, n_global, skip_same=False)


def _loss_teacher_temp_for_student(s, t, c, ts, tt, n_global=2):
    return _loop_loss(s, t, c, tt, tt, n_global)


def _loss_temps_swapped(s, t, c, ts, tt, n_global=2):
    return _loop_loss(s, t, c, tt, ts, n_global)


def _loss_no_center(s, t, c, ts, tt, n_global=2):
    return _loop_loss(s, t, c, ts, tt, n_global, probs=_probs_no_center)


def _loss_not_detached(s, t, c, ts, tt, n_global=2):
    return _loop_loss(s, t, c, ts, tt, n_global, probs=_probs_not_detached)


def _loss_global_views_only(s, t, c, ts, tt, n_global=2):
    return _loop_loss(s, t, c, ts, tt, n_global, local=False)


def _loss_summed_over_pairs(s, t, c, ts, tt, n_global=2):
    return _loop_loss(s, t, c, ts, tt, n_global, reduce="sum")


def _loss_by_image(s, t, c, ts, tt, n_global=2):  # rows read as (B, V, K): the views of an image interleaved
    B = len(t) // n_global
    V, K = len(s) // B, s.shape[1]
    q = _teacher_probs(t, c, tt).reshape(B, n_global, K)
    log_p = F.log_softmax(s / ts, dim=-1).reshape(B, V, K)
    terms = [-(q[:, g] * log_p[:, v]).sum(-1).mean() for g in range(n_global) for v in range(V) if v != g]
    return torch.stack(terms).mean()


def _loss_per_image(s, t, c, ts, tt, n_global=2):
    B = len(t) // n_global
    q = _teacher_probs(t, c, tt).chunk(n_global)
    log_p = F.log_softmax(s / ts, dim=-1).chunk(len(s) // B)
    return torch.stack([-(qg * lp).sum(-1) for g, qg in enumerate(q) for v, lp in enumerate(log_p) if v != g]).mean(0)


def _loss_detached_student(s, t, c, ts, tt, n_global=2):
    return _loop_loss(s.detach(), t, c, ts, tt, n_global)


WRONG_IMPLEMENTATIONS = [  # (check, a wrong implementation, what its failure message must say)
    ("check_ema_update", _ema_swapped, r"you swapped the weights: the teacher keeps momentum"),
    ("check_ema_update", _ema_updates_the_student, r"the student's weights changed"),
    ("check_ema_update", _ema_no_grad_missing, r"no gradient flows to the teacher: do the update under torch.no_grad"),
    ("check_ema_update", _ema_returns_new_tensors, r"you returned new tensors and left the teacher's parameters"),
    ("check_ema_update", _ema_copies_the_student, r"the teacher became a copy of the student"),
    ("check_teacher_probs", _probs_no_center, r"the centre was not subtracted"),
    ("check_teacher_probs", _probs_center_added, r"you added the centre; subtract it"),
    ("check_teacher_probs", _probs_times_temp, r"you multiplied by the temperature"),
    ("check_teacher_probs", _probs_dim0, r"the softmax runs over the batch \(dim=0\)"),
    ("check_teacher_probs", _probs_not_detached, r"return the probabilities .detach\(\)ed"),
    ("check_teacher_probs", _probs_log, r"you returned log-probabilities"),
    ("check_update_center", _center_swapped, r"you swapped the weights: the centre keeps momentum"),
    ("check_update_center", _center_sum, r"you summed the teacher's outputs over the batch"),
    ("check_update_center", _center_flat, r"expected shape \(1, 10\).*keepdim=True"),
    ("check_update_center", _center_not_detached, r"use teacher_out.detach\(\)"),
    ("check_update_center", _center_batch_mean_only, r"the centre is not a running average"),
    ("check_dino_loss", _loss_same_view_pairs, r"you counted the pairs of a view with itself"),
    ("check_dino_loss", _loss_teacher_temp_for_student, r"the student's outputs were divided by teacher_temp"),
    ("check_dino_loss", _loss_temps_swapped, r"you swapped the temperatures"),
    ("check_dino_loss", _loss_no_center, r"the centre was not subtracted from the teacher's outputs"),
    ("check_dino_loss", _loss_not_detached, r"a gradient reaches teacher_out"),
    ("check_dino_loss", _loss_global_views_only, r"only the student's global views count"),
    ("check_dino_loss", _loss_summed_over_pairs, r"you summed over the pairs; average over them"),
    ("check_dino_loss", _loss_by_image, r"split them with .chunk\(num_views\)"),
    ("check_dino_loss", _loss_per_image, r"expected a scalar, got shape \(3\)"),
    ("check_dino_loss", _loss_detached_student, r"no gradient reaches student_out"),
]


@pytest.mark.parametrize(
    "check, wrong, message", WRONG_IMPLEMENTATIONS, ids=[w.__name__[1:] for _, w, _ in WRONG_IMPLEMENTATIONS]
)
def test_checks_fail_wrong_implementations_with_a_hint(check, wrong, message):
    with pytest.raises(AssertionError, match=message):
        getattr(checks, check)(wrong)
