"""The lesson builder: ``minivfm course build [--check]`` writes ``lessons/`` from ``solutions/``.

For every ``solutions/NN_topic.ipynb`` the lesson ``lessons/NN_topic.ipynb`` is
the same notebook with

- every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region of an exercise
  cell replaced by ``# YOUR CODE HERE`` and ``raise NotImplementedError()``;
- outputs and execution counts cleared in every code cell, check cells
  included: a student opening a lesson sees no ✓ lines before writing any
  code. The expected outputs stay in ``solutions/``, where the grader takes
  check cells and their outputs from; a student who runs nbval on a lesson
  still sees each failing check, which raises ``AssertionError`` (nbval runs a
  cell with no execution count without comparing its outputs);
- all metadata kept (the grader maps cells by ``metadata.minivfm``), except
  volatile per-cell timing metadata (``execution``, ``ExecuteTime``).

The output is deterministic: the same solutions give the same bytes.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nbformat import NotebookNode

from minivfm.course.notebook import (
    NotebookError,
    cell_role,
    read_notebook,
    stub_source,
    validate_cells,
    writes_notebook,
)

VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")


def find_repo_root(start: str | Path | None = None) -> Path:
    """The nearest folder, from ``start`` (default: cwd) upwards, that has ``solutions/``.

    Falls back to the checkout this package lives in, then to ``start`` itself.
    """
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "solutions").is_dir():
            return folder
    package_root = Path(__file__).resolve().parents[2]
    if (package_root / "solutions").is_dir():
        return package_root
    return start


def solution_notebooks(folder: str | Path) -> list[Path]:
    """The ``*.ipynb`` files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.ipynb") if p.is_file())


def build_lesson(solution: NotebookNode, name: str = "<notebook>") -> NotebookNode:
    """Return the lesson made from a solution notebook (the input is not modified).

    Raises:
        NotebookError: the solution breaks the cell contract (see
            :func:`minivfm.course.notebook.validate_cells`).
    """
    validate_cells(solution, name)
    lesson = copy.deepcopy(solution)
    for i, cell in enumerate(lesson.cells):
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            continue
        if cell_role(cell) == "exercise":
            cell.source = stub_source(cell.source, f"{name}: cell {i}")
        cell.outputs = []  # check cells too: no ✓ before the student has written anything
        cell.execution_count = None
    return lesson


@dataclass
class BuildReport:
    """What a build wrote (or, with ``check``, would write)."""

    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)  # out of date (check mode)
    missing: list[Path] = field(default_factory=list)  # not there yet (check mode)
    orphans: list[Path] = field(default_factory=list)  # lessons without a solution

    @property
    def up_to_date(self) -> bool:
        return not (self.stale or self.missing or self.orphans)


def build_lessons(
    source: str | Path = "solutions", dest: str | Path = "lessons", *, check: bool = False
) -> BuildReport:
    """Build every lesson in ``dest`` from the solutions in ``source``.

    With ``check=True`` nothing is written; the report lists the lessons that
    are stale or missing. Lessons in ``dest`` without a solution are listed as
    orphans in both modes and never deleted.
    """
    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        raise NotebookError(f"source={str(source)!r} is not a folder of solution notebooks")
    report = BuildReport()
    solutions = solution_notebooks(source)
    for path in solutions:
        lesson = build_lesson(read_notebook(path), str(path))
        data = writes_notebook(lesson).encode("utf-8")
        target = dest / path.name
        current = target.read_bytes() if target.is_file() else None
        if current == data:
            report.unchanged.append(target)
        elif check:
            (report.stale if current is not None else report.missing).append(target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            report.written.append(target)
    names = {p.name for p in solutions}
    report.orphans = [p for p in solution_notebooks(dest) if p.name not in names]
    return report


def main(argv: list[str] | None = None) -> int:
    """``minivfm course build [--check] [--source DIR] [--dest DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="minivfm course build",
        description="Write lessons/ from solutions/: solution regions stubbed, all outputs cleared.",
    )
    parser.add_argument(
        "--source", type=Path, default=None, help="solution notebooks (default: solutions/ in the repo root)"
    )
    parser.add_argument("--dest", type=Path, default=None, help="lesson notebooks (default: lessons/)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 and list the lessons that are out of date",
    )
    args = parser.parse_args(argv)
    root = find_repo_root()
    source = args.source if args.source is not None else root / "solutions"
    dest = args.dest if args.dest is not None else root / "lessons"
    try:
        report = build_lessons(source, dest, check=args.check)
    except NotebookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def show(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    for path in report.written:
        print(f"wrote {show(path)}")
    for path in report.orphans:
        print(f"{show(path)}: no solution with this name; delete it or add the solution", file=sys.stderr)
    if args.check:
        for path in report.stale:
            print(f"{show(path)}: out of date", file=sys.stderr)
        for path in report.missing:
            print(f"{show(path)}: missing", file=sys.stderr)
        if not report.up_to_date:
            print("lessons are out of date; run: minivfm course build", file=sys.stderr)
            return 1
        print(f"{len(report.unchanged)} lesson(s) up to date in {show(dest)}")
        return 0
    total = len(report.written) + len(report.unchanged)
    print(f"{total} lesson(s) in {show(dest)} ({len(report.written)} written, {len(report.unchanged)} unchanged)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
