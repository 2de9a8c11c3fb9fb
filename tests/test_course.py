"""Tests of the course machinery: the lesson builder and the grader.

They use the tiny fixture lesson ``tests/fixtures/solutions/00_fixture.ipynb``:
two exercises (``add``, 2 points; ``scale``, 1 point) and a check that needs
no exercise (``warmup``, 1 point, which also writes a varying line to stderr
and prints a memory address). Grading tests start one pytest + kernel each.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest

from minivfm.course import build, grade
from minivfm.course.notebook import (
    SANITIZE_CFG,
    NotebookError,
    cell_id,
    cell_info,
    cell_role,
    read_notebook,
    reads_notebook,
    stub_source,
    validate_cells,
    write_notebook,
    writes_notebook,
)

HERE = Path(__file__).parent
ROOT = HERE.parent
SOLUTIONS = HERE / "fixtures" / "solutions"
FIXTURE = SOLUTIONS / "00_fixture.ipynb"
FULL = {"add": 2, "scale": 1, "warmup": 1}


def exercises(nb):
    return {cell_id(c): c for c in nb.cells if cell_role(c) == "exercise"}


def checks(nb):
    return [c for c in nb.cells if cell_role(c) == "check"]


def submission(tmp_path: Path, name: str = "00_fixture.ipynb", folder: str = "student", **sources: str) -> Path:
    """A copy of the fixture solution with some exercise sources replaced."""
    nb = read_notebook(FIXTURE)
    for key, source in sources.items():
        exercises(nb)[key].source = source
    path = tmp_path / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_notebook(nb, path)
    return path


def run_grade(capsys, *args: str) -> tuple[int, str, str]:
    status = grade.main([*map(str, args), "--reference", str(SOLUTIONS)])
    out, err = capsys.readouterr()
    return status, out, err


def by_name(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["checks"]}


# ------------------------------------------------------------------- stubs


def test_stub_source_replaces_every_region_at_its_indentation():
    source = (
        "def f(x):\n"
        "    y = 1\n"
        "    ### BEGIN SOLUTION\n"
        "    y = x + 1\n"
        "    ### END SOLUTION\n"
        "    for i in range(3):\n"
        "        ### BEGIN SOLUTION\n"
        "        y *= 2\n"
        "        ### END SOLUTION\n"
        "    return y"
    )
    assert stub_source(source) == (
        "def f(x):\n"
        "    y = 1\n"
        "    # YOUR CODE HERE\n"
        "    raise NotImplementedError()\n"
        "    for i in range(3):\n"
        "        # YOUR CODE HERE\n"
        "        raise NotImplementedError()\n"
        "    return y"
    )
    # a region that ends the cell (no final newline) leaves no trailing newline
    assert stub_source("### BEGIN SOLUTION\nx = 1\n### END SOLUTION") == (
        "# YOUR CODE HERE\nraise NotImplementedError()"
    )
    assert stub_source("x = 1\n") == "x = 1\n"


@pytest.mark.parametrize(
    "source, problem",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
        ("x = 1\n### END SOLUTION\n", "without"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside another"),
    ],
)
def test_stub_source_rejects_unbalanced_markers(source, problem):
    with pytest.raises(NotebookError, match=problem):
        stub_source(source, "nb: cell 3")


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda nb: exercises(nb)["add"].metadata["minivfm"].update(role="exrcise"), "role='exrcise'"),
        (lambda nb: exercises(nb)["add"].metadata["minivfm"].pop("id"), "id must be"),
        (lambda nb: checks(nb)[0].metadata["minivfm"].update(points=-1), "points=-1"),
        (lambda nb: setattr(exercises(nb)["add"], "source", "def add(a, b):\n    return a + b"), "no '### BEGIN"),
        (lambda nb: exercises(nb)["add"].metadata.pop("minivfm"), "not an exercise cell"),
        (lambda nb: exercises(nb)["scale"].metadata["minivfm"].update(id="add"), "used twice"),
        (lambda nb: setattr(checks(nb)[0], "source", "# NBVAL_SKIP\n" + checks(nb)[0].source), "NBVAL_SKIP"),
        (lambda nb: checks(nb)[1].metadata.update(tags=["raises-exception"]), "'raises-exception'"),
    ],
)
def test_validate_cells_names_the_broken_cell(edit, problem):
    nb = read_notebook(FIXTURE)
    validate_cells(nb, "fixture")  # the fixture itself is valid
    edit(nb)
    with pytest.raises(NotebookError, match=re.escape(problem)) as err:
        validate_cells(nb, "fixture")
    assert "fixture: cell " in str(err.value)


# ------------------------------------------------------------------- build


def test_build_stubs_exercises_and_clears_every_output(tmp_path):
    assert build.main(["--source", str(SOLUTIONS), "--dest", str(tmp_path / "lessons")]) == 0
    solution, lesson = read_notebook(FIXTURE), read_notebook(tmp_path / "lessons" / FIXTURE.name)
    assert len(lesson.cells) == len(solution.cells)
    for sol, les in zip(solution.cells, lesson.cells):
        assert les.metadata == sol.metadata  # metadata kept: the grader maps cells with it
        assert les.get("id") == sol.get("id")
        if les.cell_type != "code":
            assert les.source == sol.source
            continue
        role = cell_role(les)
        if role == "exercise":
            assert "### BEGIN SOLUTION" not in les.source and "# YOUR CODE HERE" in les.source
            assert "raise NotImplementedError()" in les.source
        else:
            assert les.source == sol.source
        if role == "check":
            assert sol.outputs  # the fixture's check cells have outputs to leak
        # no ✓ lines before the student writes code: check cells are cleared too
        assert les.outputs == [] and les.execution_count is None
    add = exercises(lesson)["add"].source
    assert add == 'def add(a, b):\n    """Return a + b."""\n    # YOUR CODE HERE\n    raise NotImplementedError()'
    assert lesson.metadata == solution.metadata
    # the solution regions do not leak anywhere into the lesson file
    text = (tmp_path / "lessons" / FIXTURE.name).read_text(encoding="utf-8")
    assert "return a + b" not in text and "out.append(k * x)" not in text


def test_generated_lessons_have_no_outputs_in_check_cells():
    """Every lesson built from the real solutions: a student opening it sees no ✓ before writing code."""
    solutions = build.solution_notebooks(ROOT / "solutions")
    assert solutions, "no solutions/ to build from"
    for path in solutions:
        solution = read_notebook(path)
        lesson = build.build_lesson(solution, str(path))
        for sol, les in zip(solution.cells, lesson.cells):
            if cell_role(les) != "check":
                continue
            assert sol.outputs, f"{path.name}: check cell {cell_info(sol)} has no stored outputs to grade against"
            assert les.outputs == [], f"{path.name}: check cell {cell_info(les)} keeps stored outputs"
            assert les.execution_count is None, f"{path.name}: check cell {cell_info(les)} keeps a count"


def test_grading_takes_check_outputs_from_the_reference_not_the_lesson():
    """The lesson has no expected outputs, the merged notebook has the reference's."""
    solution = read_notebook(FIXTURE)
    lesson = build.build_lesson(solution)
    merged = grade.merge_submission(solution, lesson)
    for ref, les, out in zip(solution.cells, lesson.cells, merged.cells):
        if cell_role(ref) == "check":
            assert ref.outputs and les.outputs == []
            assert out.outputs == ref.outputs and out.execution_count is not None


def test_build_is_deterministic_and_idempotent(tmp_path, capsys):
    dest = tmp_path / "lessons"
    report = build.build_lessons(SOLUTIONS, dest)
    assert [p.name for p in report.written] == [FIXTURE.name]
    first = (dest / FIXTURE.name).read_bytes()
    report = build.build_lessons(SOLUTIONS, dest)
    assert report.written == [] and [p.name for p in report.unchanged] == [FIXTURE.name]
    assert (dest / FIXTURE.name).read_bytes() == first
    # the same bytes from a fresh build, and the same as nbformat's own v4 writer
    assert writes_notebook(build.build_lesson(read_notebook(FIXTURE))).encode() == first
    assert first.endswith(b"}\n") and b'"nbformat": 4' in first
    assert build.main(["--check", "--source", str(SOLUTIONS), "--dest", str(dest)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_build_check_detects_drift_and_lists_files(tmp_path, capsys):
    src, dest = tmp_path / "solutions", tmp_path / "lessons"
    src.mkdir()
    (src / FIXTURE.name).write_bytes(FIXTURE.read_bytes())
    (src / "01_other.ipynb").write_bytes(FIXTURE.read_bytes())
    args = ["--source", str(src), "--dest", str(dest)]
    assert build.main(args) == 0
    capsys.readouterr()

    # the solution changes: its lesson is stale
    nb = read_notebook(src / FIXTURE.name)
    checks(nb)[0].source += "\n# one more line"
    write_notebook(nb, src / FIXTURE.name)
    before = (dest / FIXTURE.name).read_bytes()
    assert build.main([*args, "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{FIXTURE.name}: out of date" in err and "01_other" not in err
    assert (dest / FIXTURE.name).read_bytes() == before  # --check writes nothing

    # a lesson is missing, another has no solution
    (dest / "01_other.ipynb").unlink()
    (dest / "99_orphan.ipynb").write_bytes(before)
    assert build.main([*args, "--check"]) == 1
    err = capsys.readouterr().err
    assert "01_other.ipynb: missing" in err and "99_orphan.ipynb: no solution" in err

    # building fixes the drift (the orphan is reported, never deleted)
    assert build.main(args) == 0
    (dest / "99_orphan.ipynb").unlink()
    capsys.readouterr()
    assert build.main([*args, "--check"]) == 0


def test_build_refuses_a_broken_solution(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    nb = read_notebook(FIXTURE)
    exercises(nb)["add"].source = "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n"
    write_notebook(nb, tmp_path / "solutions" / "00_fixture.ipynb")
    assert build.main(["--source", str(tmp_path / "solutions"), "--dest", str(tmp_path / "lessons")]) == 2
    assert "never closed" in capsys.readouterr().err
    assert not (tmp_path / "lessons").exists()


# ------------------------------------------------------------------- merge


def test_merge_takes_only_exercise_sources_from_the_submission():
    reference = read_notebook(FIXTURE)
    student = copy.deepcopy(reference)
    exercises(student)["add"].source = "def add(a, b):\n    return a - b"
    del student.cells[4]  # the scale exercise cell: missing means the stub
    for cell in checks(student):
        cell.source = 'print("✓ everything passes")'
        cell.outputs = []
        cell.metadata["minivfm"]["points"] = 100
    student.metadata["kernelspec"] = {"name": "evil", "display_name": "evil", "language": "python"}
    student.cells.append(copy.deepcopy(exercises(student)["add"]))
    student.cells[-1].source = "def add(a, b):\n    return 0  # the last copy wins"
    student.cells.append(reads_notebook(writes_notebook(student)).cells[1])  # an extra, untagged cell

    merged = grade.merge_submission(reference, student)
    assert len(merged.cells) == len(reference.cells)
    assert merged.metadata == reference.metadata
    for ref, new in zip(reference.cells, merged.cells):
        assert new.metadata == ref.metadata
        if cell_role(ref) != "exercise":
            assert new.source == ref.source and new.get("outputs") == ref.get("outputs")
    assert exercises(merged)["add"].source == "def add(a, b):\n    return 0  # the last copy wins"
    assert exercises(merged)["scale"].source == stub_source(exercises(reference)["scale"].source)
    for cell in exercises(merged).values():
        assert cell.outputs == [] and cell.execution_count is None
    assert reference == read_notebook(FIXTURE)  # inputs untouched


def test_find_reference_by_name_or_lesson_number(tmp_path):
    assert grade.find_reference(tmp_path / "00_fixture.ipynb", SOLUTIONS) == FIXTURE
    assert grade.find_reference(tmp_path / "00_fixture-alice.ipynb", SOLUTIONS) == FIXTURE
    with pytest.raises(NotebookError, match="no reference named '07_clip.ipynb'"):
        grade.find_reference(tmp_path / "07_clip.ipynb", SOLUTIONS)


# -------------------------------------------------------------- sanitizing


def test_sanitize_file_is_the_graders():
    assert (HERE / "nbval_sanitize.cfg").read_text(encoding="utf-8") == SANITIZE_CFG


def test_sanitize_patterns_hide_what_varies_and_keep_check_lines():
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns(SANITIZE_CFG)
    assert len(patterns) >= 8

    def clean(text: str) -> str:
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    varying = [
        ("<function add at 0x7f3a2c1b8d30>", "<function add at 0x55d0c0ffee00>"),
        ("saved to /tmp/tmpab12/run/x.png", "saved to /home/alice/minivfm/solutions/x.png"),
        ("trained in 12.5 s", "trained in 3.02 s"),
        ("took 350ms", "took 41ms"),
        ("Epoch 0:  50%|█████     | 5/10 [00:01<00:01,  4.50it/s, v_num=0]", "Epoch 0: 100%|██████████| 10/10"),
        ("<Figure size 640x480 with 1 Axes>", "<Figure size 800x600 with 2 Axes>"),
        ("at 2026-11-24 22:38:42.123", "at 2027-01-02T03:04:05"),
    ]
    for a, b in varying:
        assert clean(a) == clean(b), (a, b, clean(a), clean(b))
    stable = [
        "✓ patchify: shape (8, 64, 48), values match",
        "✓ add: add(2, 3) == 5",
        "✓ elbo: 3 samples, 10 steps, values match (max abs error 1e-06)",
        "accuracy 0.93 on 512 images; ratio 3/4",
    ]
    for line in stable:
        assert clean(line) == line
    assert clean("value 0.5 s") != clean("value 0.5 m")


# ------------------------------------------------------------ unreadable


@pytest.mark.parametrize(
    "content, problem",
    [
        ("this is not json {", "not valid JSON"),
        ("[1, 2, 3]", "not a notebook"),
        ('{"metadata": {}}', "not a notebook"),
        ('{"cells": [{"source": "x"}], "nbformat": 4}', "is not a notebook cell"),
    ],
)
def test_unreadable_submission_exits_2(tmp_path, capsys, content, problem):
    path = tmp_path / "00_fixture.ipynb"
    path.write_text(content, encoding="utf-8")
    status, out, err = run_grade(capsys, path, "--json", tmp_path / "r.json")
    assert status == 2
    assert problem in err and "not graded" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["notebook"] == str(path) and data["checks"] == [] and problem in data["error"]


def test_submission_without_reference_exits_2(tmp_path, capsys):
    path = submission(tmp_path, name="42_unknown.ipynb")
    status, _, err = run_grade(capsys, path)
    assert status == 2 and "no reference named '42_unknown.ipynb'" in err


# ------------------------------------------------------------------ grading


def test_grade_solution_gives_full_marks_and_json_schema(tmp_path, capsys):
    json_path = tmp_path / "result.json"
    before = FIXTURE.read_bytes()
    status, out, _ = run_grade(capsys, FIXTURE, "--json", json_path)
    assert status == 0, out
    assert FIXTURE.read_bytes() == before  # never modified
    result = json.loads(json_path.read_text(encoding="utf-8"))
    assert set(result) >= {"notebook", "score", "max_score", "checks"}
    assert result["notebook"] == str(FIXTURE)
    assert (result["score"], result["max_score"]) == (4, 4)
    assert [c["name"] for c in result["checks"]] == list(FULL)
    for c in result["checks"]:
        assert set(c) == {"name", "passed", "points", "message"}
        assert c["passed"] is True and c["points"] == FULL[c["name"]] and c["message"] == ""
    assert "score 4/4" in out and "✓ add" in out


def test_grade_untouched_lesson_fails_its_exercises_and_counts_the_rest(tmp_path, capsys):
    build.build_lessons(SOLUTIONS, tmp_path / "lessons")
    lesson = tmp_path / "lessons" / FIXTURE.name
    status, out, _ = run_grade(capsys, lesson, "--json", "-")
    assert status == 1
    result = json.loads(out)
    checks_ = by_name(result)
    assert (result["score"], result["max_score"]) == (1, 4)
    assert not checks_["add"]["passed"] and not checks_["scale"]["passed"]
    assert checks_["add"]["message"].startswith("NotImplementedError")
    assert checks_["warmup"]["passed"]


def test_grade_tampered_submission_uses_the_reference(tmp_path, capsys):
    nb = read_notebook(FIXTURE)
    exercises(nb)["add"].source = "def add(a, b):\n    return a * b"  # wrong: 2 * 3 = 6
    for cell in checks(nb):
        cell.source = 'print("✓ add: add(2, 3) == 5")'  # the assert removed
        cell.outputs = [{"output_type": "stream", "name": "stdout", "text": "anything\n"}]
        cell.metadata["minivfm"]["points"] = 100
        cell.metadata["tags"] = ["nbval-skip"]
    nb.metadata["kernelspec"] = {"name": "no-such-kernel", "display_name": "x", "language": "python"}
    path = tmp_path / "student" / FIXTURE.name
    path.parent.mkdir()
    write_notebook(nb, path)
    before = path.read_bytes()
    status, out, _ = run_grade(capsys, path, "--json", "-")
    assert status == 1
    result = json.loads(out)
    checks_ = by_name(result)
    assert (result["score"], result["max_score"]) == (2, 4)
    assert not checks_["add"]["passed"]
    assert "add(2, 3) should be 5, got 6" in checks_["add"]["message"]
    assert checks_["scale"]["passed"] and checks_["warmup"]["passed"]
    assert path.read_bytes() == before


def test_grade_exercise_that_raises_in_a_never_executed_notebook(tmp_path, capsys):
    nb = read_notebook(FIXTURE)
    exercises(nb)["add"].source = 'raise ValueError("boom")\ndef add(a, b):\n    return a + b'
    for cell in nb.cells:  # never run: no outputs, no execution counts
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    path = tmp_path / FIXTURE.name
    write_notebook(nb, path)
    status, out, _ = run_grade(capsys, path, "--json", "-")
    assert status == 1
    checks_ = by_name(json.loads(out))
    assert not checks_["add"]["passed"]
    assert "NameError" in checks_["add"]["message"] and "ValueError: boom" in checks_["add"]["message"]
    assert checks_["scale"]["passed"] and checks_["warmup"]["passed"]


def test_grade_exercise_that_hangs_times_out_and_the_rest_still_counts(tmp_path, capsys):
    path = submission(tmp_path, add="def add(a, b):\n    while True:\n        pass")
    start = time.perf_counter()
    status, out, _ = run_grade(capsys, path, "--timeout", "3", "--json", "-")
    elapsed = time.perf_counter() - start
    assert status == 1
    checks_ = by_name(json.loads(out))
    assert not checks_["add"]["passed"] and "timed out after 3 s" in checks_["add"]["message"]
    assert checks_["scale"]["passed"] and checks_["warmup"]["passed"]
    assert elapsed < 60  # one timeout, not one per later cell nor nbval's 2000 s default


@pytest.mark.slow
@pytest.mark.parametrize(
    "source, message",
    [
        # the interrupt is swallowed: nbval stops the kernel; we restart it and replay
        (
            "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except BaseException:\n        pass",
            "timed out after 3 s (the cell ignored the interrupt",
        ),
        ("import os\nos._exit(1)", "the kernel died"),  # the kernel process dies
    ],
    ids=["ignores-the-interrupt", "kernel-exits"],
)
def test_grade_survives_a_dead_kernel(tmp_path, capsys, source, message):
    path = submission(tmp_path, add=source)
    status, out, _ = run_grade(capsys, path, "--timeout", "3", "--json", "-")
    assert status == 1
    checks_ = by_name(json.loads(out))
    assert not checks_["add"]["passed"] and message in checks_["add"]["message"]
    assert checks_["scale"]["passed"] and checks_["warmup"]["passed"]


def test_grade_folder_of_submissions_reports_a_list(tmp_path, capsys):
    good = submission(tmp_path, folder="class/alice")
    bad = tmp_path / "class" / "bob" / FIXTURE.name
    bad.parent.mkdir(parents=True)
    bad.write_text("{ not json", encoding="utf-8")
    (tmp_path / "class" / "alice" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "class" / "alice" / ".ipynb_checkpoints" / "00_fixture-checkpoint.ipynb").write_text("{")
    status, out, err = run_grade(capsys, tmp_path / "class", "--json", tmp_path / "all.json")
    assert status == 2  # one submission could not be read; the other is still graded
    results = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))
    assert [r["notebook"] for r in results] == [str(good), str(bad)]
    assert (results[0]["score"], results[0]["max_score"]) == (4, 4)
    assert results[1]["checks"] == [] and "not valid JSON" in results[1]["error"]
    assert (results[1]["score"], results[1]["max_score"]) == (0, 4)
    assert "2 notebooks: 1 with every check passed" in out


@pytest.mark.slow
def test_grade_sets_the_profile_and_reports_output_mismatches(tmp_path, capsys):
    # warmup prints MINIVFM_PROFILE; the reference stored "profile ci"
    status, out, _ = run_grade(capsys, FIXTURE, "--profile", "cpu", "--json", "-")
    assert status == 1
    checks_ = by_name(json.loads(out))
    assert checks_["add"]["passed"] and checks_["scale"]["passed"]
    message = checks_["warmup"]["message"]
    assert message.startswith("output differs from the reference")
    assert "profile ci" in message and "profile cpu" in message
    assert "0xADDRESS" in message  # shown sanitized, as compared


def test_check_names_are_unique_and_points_default_to_one():
    nb = read_notebook(FIXTURE)
    extra = copy.deepcopy(checks(nb)[0])
    del extra.metadata["minivfm"]["points"]
    nb.cells.append(extra)
    found = grade.check_cells(nb)
    assert [name for _, _, name in found] == ["add", "scale", "warmup", "add#2"]
    assert [num for num, _, _ in found] == [2, 4, 5, 7]  # numbers among code cells, as nbval counts
    assert grade.kernel_env("ci")["MINIVFM_PROFILE"] == "ci"
