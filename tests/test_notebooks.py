"""Notebook tests: every solution under nbval, the grading round trip, lessons in sync.

Parametrised over the notebooks in ``solutions/`` at collection time, so a
lesson added later is covered without touching this file. All run under
``MINIVFM_PROFILE=ci``. Select them with ``-m notebooks``; the ones that run
notebooks are also ``slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minivfm.course import build, grade
from minivfm.course.notebook import cell_id, cell_role, read_notebook, write_notebook

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS_DIR = ROOT / "solutions"
LESSONS_DIR = ROOT / "lessons"
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"
SOLUTIONS = build.solution_notebooks(SOLUTIONS_DIR)

pytestmark = pytest.mark.notebooks


def each_solution():
    if not SOLUTIONS:
        return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=f"no notebooks in {SOLUTIONS_DIR} yet"))]
    return [pytest.param(path, id=path.stem) for path in SOLUTIONS]


def failures(result: grade.GradeResult) -> str:
    return "\n".join(f"{c.name}: {c.message}" for c in result.checks if not c.passed) or "(none)"


@pytest.mark.slow
@pytest.mark.parametrize("solution", each_solution())
def test_solution_passes_nbval(solution: Path):
    """What a student runs to self-check: plain nbval, the current environment, our sanitize file."""
    cmd = [
        sys.executable, "-m", "pytest", str(solution.relative_to(ROOT)),
        "--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE.relative_to(ROOT)),
        "-p", "no:cacheprovider", "-q", "--color=no",
    ]  # fmt: skip
    env = {**os.environ, "MINIVFM_PROFILE": "ci"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("solution", each_solution())
def test_grading_the_solution_gives_full_marks(solution: Path):
    result = grade.grade_notebook(solution, solution, profile="ci")
    assert result.error is None, result.error
    assert result.checks, f"{solution.name} has no check cells"
    assert result.score == result.max_score, f"failed checks:\n{failures(result)}"


@pytest.mark.slow
@pytest.mark.parametrize("solution", each_solution())
def test_grading_the_untouched_lesson_fails_each_exercise(solution: Path, tmp_path: Path):
    lesson = tmp_path / solution.name
    write_notebook(build.build_lesson(read_notebook(solution), str(solution)), lesson)
    reference = read_notebook(solution)
    exercise_ids = {cell_id(c) for c in reference.cells if cell_role(c) == "exercise"}
    check_names = [name for _, _, name in grade.check_cells(reference)]

    result = grade.grade_notebook(lesson, solution, profile="ci")
    assert result.error is None, result.error
    assert [c.name for c in result.checks] == check_names  # every check is reported
    for check in result.checks:
        if check.name.split("#")[0] in exercise_ids:
            assert not check.passed, f"check {check.name!r} passes on the stub: it does not test its exercise"
            assert check.message
    assert result.score == sum(c.points for c in result.checks if c.passed)


def test_lessons_are_up_to_date(capsys):
    status = build.main(["--check", "--source", str(SOLUTIONS_DIR), "--dest", str(LESSONS_DIR)])
    assert status == 0, f"run: minivfm course build\n{capsys.readouterr().err}"
