"""The grader: ``minivfm grade SUBMISSION.ipynb [MORE ...]``.

For each submission:

1. find the reference: ``solutions/<same file name>`` (or ``--reference``);
2. merge: a copy of the reference in which each exercise cell's source is
   replaced by the submission's exercise cell with the same
   ``metadata.minivfm.id`` (the stub when the submission has none). Nothing
   else comes from the submission: check cells, stored outputs, metadata and
   kernel are the reference's;
3. run the merged notebook under nbval in a temporary folder, in one pytest
   subprocess with one kernel from the current environment, a per-cell
   timeout, ``MINIVFM_PROFILE=ci`` (``--profile``), the sanitize patterns and
   the plugin :mod:`minivfm.course.nbval_plugin`, which works around nbval's
   runner and records each cell's result;
4. report each check cell: passed when it ran without error and its output
   matched the reference's stored output under nbval.

Exit status: 0 when every check of every notebook passed, 1 when some check
failed, 2 when a submission could not be graded at all (not JSON, not a
notebook, no reference found).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbformat import NotebookNode

from minivfm.course.build import VOLATILE_CELL_METADATA, find_repo_root
from minivfm.course.notebook import (
    SANITIZE_CFG,
    NotebookError,
    cell_id,
    cell_info,
    cell_role,
    read_notebook,
    stub_source,
    validate_cells,
    write_notebook,
)

DEFAULT_TIMEOUT = 300.0
DEFAULT_PROFILE = "ci"
PLUGIN = "minivfm.course.nbval_plugin"


class GradeError(NotebookError):
    """The submission cannot be graded (unreadable, or no reference)."""


@dataclass
class CheckResult:
    name: str
    passed: bool
    points: float  # what the check is worth; it earns them when passed
    message: str = ""


@dataclass
class GradeResult:
    notebook: str
    score: float = 0
    max_score: float = 0
    checks: list[CheckResult] = field(default_factory=list)
    reference: str | None = None
    seconds: float = 0.0
    error: str | None = None  # set when the submission could not be graded

    @property
    def all_passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """``{"notebook", "score", "max_score", "checks": [{"name", "passed", "points", "message"}], ...}``."""
        data = {
            "notebook": self.notebook,
            "score": self.score,
            "max_score": self.max_score,
            "checks": [asdict(c) for c in self.checks],
            "reference": self.reference,
            "seconds": round(self.seconds, 2),
        }
        if self.error is not None:
            data["error"] = self.error
        return data


# ------------------------------------------------------------------ reference


def find_reference(submission: str | Path, solutions: str | Path) -> Path:
    """The reference notebook for ``submission``: ``solutions/<file name>``.

    When no solution has that exact name, a unique solution with the same
    ``NN_`` lesson number is used (``04_vit-alice.ipynb`` -> ``04_vit.ipynb``).

    Raises:
        GradeError: no reference, or the number is ambiguous.
    """
    submission, solutions = Path(submission), Path(solutions)
    exact = solutions / submission.name
    if exact.is_file():
        return exact
    prefix = submission.name.split("_", 1)[0]
    candidates = []
    if prefix.isdigit() and "_" in submission.name:
        candidates = sorted(solutions.glob(f"{prefix}_*.ipynb"))
    if len(candidates) == 1:
        return candidates[0]
    known = ", ".join(p.name for p in sorted(solutions.glob("*.ipynb"))) or "none"
    raise GradeError(
        f"{submission}: no reference named {submission.name!r} in {solutions} (solutions there: {known}); "
        "rename the submission or pass --reference"
    )


# ---------------------------------------------------------------------- merge


def merge_submission(reference: NotebookNode, submission: NotebookNode, name: str = "<reference>") -> NotebookNode:
    """The reference with the submission's exercise cells put in (neither input is modified).

    Exercise cells are matched by ``metadata.minivfm.id``; when the submission
    has several with one id, the last one wins (as when its notebook runs top
    to bottom); when it has none, the reference's stub is used. Exercise cells
    get no stored outputs, so nbval only requires them to run; check cells
    keep the reference's outputs, which nbval compares.
    """
    validate_cells(reference, name)
    answers: dict[str, str] = {}
    for cell in submission.cells:
        if cell.get("cell_type") == "code" and cell_role(cell) == "exercise" and cell_id(cell):
            answers[cell_id(cell)] = cell.get("source", "")
    merged = copy.deepcopy(reference)
    for i, cell in enumerate(merged.cells):
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            continue
        if cell_role(cell) == "exercise":
            answer = answers.get(cell_id(cell))
            cell.source = answer if answer is not None else stub_source(cell.source, f"{name}: cell {i}")
            cell.outputs = []
            cell.execution_count = None
        elif cell.outputs and cell.execution_count is None:
            cell.execution_count = 1  # nbval refuses stored outputs on a cell with no count
    return merged


def check_cells(nb: NotebookNode) -> list[tuple[int, dict[str, Any], str]]:
    """``(code cell number, metadata.minivfm, unique name)`` of every check cell, in order."""
    found, seen = [], {}
    code_num = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell_role(cell) == "check":
            base = cell_id(cell) or f"cell {code_num}"
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}#{seen[base]}"
            found.append((code_num, cell_info(cell), name))
        code_num += 1
    return found


# ------------------------------------------------------------------------ run


def kernel_env(profile: str | None = DEFAULT_PROFILE) -> dict[str, str]:
    """Environment of the pytest subprocess (and so of the kernel)."""
    env = dict(os.environ)
    if profile:
        env["MINIVFM_PROFILE"] = profile
    env.pop("MPLBACKEND", None)  # ipykernel's inline backend, as in Jupyter
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # load only nbval and our plugin
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


def run_nbval(
    notebook: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    profile: str | None = DEFAULT_PROFILE,
    sanitize: Path | None = None,
    verbose: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """Run ``notebook`` under nbval in its folder; return the per-cell records and pytest's output.

    The records are those of :mod:`minivfm.course.nbval_plugin`. pytest runs
    in a subprocess (its own session, killed as a group if it overruns
    ``timeout`` times the number of cells, plus a minute).
    """
    folder = notebook.parent
    results = folder / "_minivfm_results.jsonl"
    results.unlink(missing_ok=True)
    if sanitize is None:
        sanitize = folder / "_minivfm_sanitize.cfg"
        sanitize.write_text(SANITIZE_CFG, encoding="utf-8")
    ini = folder / "_minivfm_pytest.ini"
    ini.write_text("[pytest]\n", encoding="utf-8")
    cmd = [
        sys.executable, "-m", "minivfm.course._pytest", str(notebook),
        "-c", str(ini), "--rootdir", str(folder),
        "-p", "nbval.plugin", "-p", PLUGIN, "-p", "no:cacheprovider",
        "--nbval", "--nbval-current-env",
        "--nbval-cell-timeout", f"{timeout:g}",
        "--nbval-sanitize-with", str(sanitize),
        "--minivfm-results", str(results),
        "-q", "--color=no", "-o", "console_output_style=classic",
    ]  # fmt: skip
    n_cells = sum(cell.cell_type == "code" for cell in read_notebook(notebook).cells)
    limit = timeout * (n_cells + 1) + 60
    proc = subprocess.Popen(
        cmd,
        cwd=folder,
        env=kernel_env(profile),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[minivfm grade: pytest stopped after {limit:g} s]"
    if verbose:
        print(output, file=sys.stderr)
    records = []
    if results.is_file():
        for line in results.read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records, output


# ---------------------------------------------------------------------- grade


def _total(values: list[float]) -> float:
    total = sum(values)
    return int(total) if all(isinstance(v, int) for v in values) else total


def grade_notebook(
    submission: str | Path,
    reference: str | Path | None = None,
    *,
    solutions: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    profile: str | None = DEFAULT_PROFILE,
    verbose: bool = False,
) -> GradeResult:
    """Grade one submitted notebook against its reference.

    Arguments:
        submission: the student's notebook (read, never modified).
        reference: the reference notebook, or a folder to look it up in by
            file name; default: ``solutions/`` of the repository.
        solutions: the folder to look the reference up in when ``reference``
            is not given.
        timeout: per-cell timeout in seconds.
        profile: ``MINIVFM_PROFILE`` for the kernel (``None`` keeps the environment's).
        verbose: print pytest's output to stderr.

    Returns:
        the result; its ``error`` is set (and it has no checks) when the
        submission cannot be read or has no reference.
    """
    start = time.perf_counter()
    submission = Path(submission)
    result = GradeResult(notebook=str(submission))
    try:
        if reference is None or Path(reference).is_dir():
            folder = Path(reference) if reference is not None else Path(solutions or find_repo_root() / "solutions")
            reference = find_reference(submission, folder)
        reference = Path(reference)
        result.reference = str(reference)
        student = read_notebook(submission)
        try:
            ref_nb = read_notebook(reference)
            merged = merge_submission(ref_nb, student, str(reference))
        except NotebookError as err:
            raise GradeError(f"reference {reference}: {err}") from err
    except NotebookError as err:
        result.error = str(err)
        if result.reference is not None:  # still say what the notebook was worth
            try:
                ref_checks = check_cells(read_notebook(result.reference))
                result.max_score = _total([info.get("points", 1) for _, info, _ in ref_checks])
            except NotebookError:
                pass
        result.seconds = time.perf_counter() - start
        return result

    checks = check_cells(merged)
    exercise_cells = {}
    code_num = 0
    for cell in merged.cells:
        if cell.cell_type == "code":
            if cell_role(cell) == "exercise":
                exercise_cells[code_num] = cell_id(cell)
            code_num += 1

    with tempfile.TemporaryDirectory(prefix="minivfm-grade-") as tmp:
        path = Path(tmp) / reference.name
        write_notebook(merged, path)
        records, output = run_nbval(path, timeout=timeout, profile=profile, verbose=verbose)

    by_cell = {r["cell"]: r for r in records}
    exercise_errors = {
        exercise_cells[num]: r["message"]
        for num, r in by_cell.items()
        if num in exercise_cells and r["outcome"] == "failed"
    }
    if not records:
        tail = " | ".join(line for line in output.strip().splitlines()[-3:])
        not_run = f"not run: the notebook did not start under nbval ({tail})"
    else:
        not_run = "not run: grading stopped before this cell"
    for num, info, name in checks:
        points = info.get("points", 1)
        record = by_cell.get(num)
        if record is None:
            check = CheckResult(name, False, points, not_run)
        else:
            passed = record["outcome"] == "passed"
            message = "" if passed else (record["message"] or record["outcome"])
            exercise_error = exercise_errors.get(info.get("id"))
            if not passed and exercise_error:
                message += f" (the exercise cell {info.get('id')!r} failed: {exercise_error})"
            check = CheckResult(name, passed, points, message)
        result.checks.append(check)
    result.max_score = _total([c.points for c in result.checks])
    result.score = _total([c.points for c in result.checks if c.passed])
    result.seconds = time.perf_counter() - start
    return result


def expand_submissions(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the ``*.ipynb`` inside them (recursively, sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(
                p for p in sorted(path.rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts and p.is_file()
            )
        else:
            found.append(path)
    return found


# --------------------------------------------------------------------- report


def _fmt(value: float) -> str:
    return f"{value:g}"


def format_report(results: list[GradeResult]) -> str:
    """The text report: one block per notebook, a table of checks, then a summary line."""
    lines: list[str] = []
    for result in results:
        ref = f"  (reference {result.reference})" if result.reference else ""
        if result.error is not None:
            lines += [f"{result.notebook}{ref}", f"  not graded: {result.error}", ""]
            continue
        lines.append(f"{result.notebook}{ref}")
        width = max([len(c.name) for c in result.checks] + [5])
        scores = [f"{_fmt(c.points if c.passed else 0)}/{_fmt(c.points)}" for c in result.checks]
        score_width = max([len(s) for s in scores] + [3])
        for c, score in zip(result.checks, scores):
            mark = "✓" if c.passed else "✗"
            row = f"  {mark} {c.name:<{width}}  {score:>{score_width}}"
            lines.append((row + (f"  {c.message}" if c.message else "")).rstrip())
        if not result.checks:
            lines.append("  (the reference has no check cells)")
        lines.append(f"  score {_fmt(result.score)}/{_fmt(result.max_score)}  ({result.seconds:.1f} s)")
        lines.append("")
    if len(results) > 1:
        graded = [r for r in results if r.error is None]
        full = sum(r.all_passed for r in graded)
        lines.append(
            f"{len(results)} notebooks: {full} with every check passed, {len(graded) - full} with failed "
            f"checks, {len(results) - len(graded)} not graded"
        )
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """``minivfm grade SUBMISSION.ipynb|FOLDER [MORE ...] [--json FILE] [--timeout S] [--reference REF]``."""
    parser = argparse.ArgumentParser(
        prog="minivfm grade",
        description="Grade submitted notebooks against the reference solutions under nbval. "
        "Exit status: 0 every check passed, 1 some check failed, 2 a submission could not be graded.",
    )
    parser.add_argument("submissions", nargs="+", help="notebooks, or folders of notebooks")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"per-cell timeout in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--reference",
        metavar="REF",
        help="the reference notebook, or a folder of references (default: solutions/ of the repository)",
    )
    parser.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        choices=["ci", "cpu", "gpu", "env"],
        help="MINIVFM_PROFILE for the kernel (default ci; 'env' keeps the environment's)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output to stderr")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")

    submissions = expand_submissions(args.submissions)
    results: list[GradeResult] = []
    for path in args.submissions:
        if Path(path).is_dir() and not any(Path(path).rglob("*.ipynb")):
            results.append(GradeResult(notebook=str(path), error=f"{path}: no .ipynb files in this folder"))
    profile = None if args.profile == "env" else args.profile
    for submission in submissions:
        results.append(
            grade_notebook(submission, args.reference, timeout=args.timeout, profile=profile, verbose=args.verbose)
        )

    report = format_report(results)
    if args.json == "-":
        print(report, file=sys.stderr, end="")
    else:
        print(report, end="")
    if args.json:
        single = len(args.submissions) == 1 and not Path(args.submissions[0]).is_dir() and len(results) == 1
        data = results[0].to_dict() if single else [r.to_dict() for r in results]
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text, encoding="utf-8")
    for r in results:
        if r.error is not None:
            print(f"error: {r.error}", file=sys.stderr)
    if any(r.error is not None for r in results):
        return 2
    return 0 if all(r.all_passed for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
