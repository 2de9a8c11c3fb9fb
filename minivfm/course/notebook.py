"""Notebook helpers shared by the lesson builder and the grader.

Cells are identified by their metadata, never by their text::

    "metadata": {"minivfm": {"role": "exercise", "id": "patchify"}}
    "metadata": {"minivfm": {"role": "check", "id": "patchify", "points": 2}}

An exercise cell holds its solution between ``### BEGIN SOLUTION`` and
``### END SOLUTION``; :func:`stub_source` replaces each region with
``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the marker's
indentation.

Notebooks are read with plain ``json`` (nbformat would invent random cell ids
for a v4.5 notebook that lacks them) and written with nbformat's v4 JSON
writer, so the same input always gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode
from nbformat.v4.nbjson import JSONWriter

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
STUB_LINES = ("# YOUR CODE HERE", "raise NotImplementedError()")
ROLES = ("exercise", "check")
# nbval markers that would make a check cell never fail (skipped, or an error expected)
UNGRADABLE_MARKERS = ("NBVAL_SKIP", "NBVAL_RAISES_EXCEPTION")
UNGRADABLE_TAGS = ("nbval-skip", "nbval-raises-exception", "raises-exception")

# Sanitize patterns for nbval, in its ``--nbval-sanitize-with`` file format (a
# ``regex:`` line directly followed by its ``replace:`` line). nbval applies
# them, in order, to every text output of both the stored reference and the
# fresh run. ``tests/nbval_sanitize.cfg`` holds the same text (a test keeps
# them equal); the grader writes this copy into its temporary folder.
SANITIZE_CFG = r"""# nbval sanitize patterns for minivfm notebooks (see docs/grading.md).
# Keep in sync with minivfm/course/notebook.py:SANITIZE_CFG (a test checks it).

# progress bars (tqdm, Lightning): "Epoch 0:  50%|█████     | 5/10 [00:01<00:01, 4.5it/s]"
regex: [^\n]*\d+%\|[^\n]*
replace: <PROGRESS>
regex: [^\n]*\d+(?:\.\d+)?(?:it/s|s/it)\b[^\n]*
replace: <PROGRESS>

# matplotlib figure reprs: "<Figure size 640x480 with 1 Axes>"
regex: <Figure size [^>]*>
replace: <Figure>

# memory addresses: "<function add at 0x7f3a2c1b8d30>"
regex: 0x[0-9a-fA-F]+
replace: 0xADDRESS

# dates and clock times: "2026-11-24 22:38:42.123", "22:38:42"
regex: \d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?
replace: <DATETIME>
regex: \b\d{1,2}:\d{2}:\d{2}(?:\.\d+)?\b
replace: <TIME>

# durations: "1.23 s", "350ms", "12.5 µs", "2 min", "0.8 seconds"
regex: \b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\s?(?:ns|us|µs|ms|s|sec|secs|seconds|min|mins|minutes)\b
replace: <DURATION>

# absolute paths (POSIX and Windows): "/tmp/tmpab12/solutions/04_vit.ipynb", "C:\Users\me\x.py"
regex: (?<![\w/.])/(?:[\w.\-+@~]+/)+[\w.\-+@~]*
replace: <PATH>
regex: \b[A-Za-z]:\\(?:[\w.\-+@~ ]+\\)*[\w.\-+@~]*
replace: <PATH>
"""


class NotebookError(ValueError):
    """A notebook that cannot be read or that breaks the cell contract."""


# ---------------------------------------------------------------------- I/O


def read_notebook(path: str | Path) -> NotebookNode:
    """Read a notebook as nbformat v4 without inventing anything.

    Raises:
        NotebookError: the file is not UTF-8 JSON, or not a Jupyter notebook.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise NotebookError(f"{path}: cannot read the file ({err})") from err
    return reads_notebook(text, name=str(path))


def reads_notebook(text: str, name: str = "<notebook>") -> NotebookNode:
    """Parse notebook JSON (any nbformat version nbformat can convert) to v4."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise NotebookError(f"{name}: not a notebook (not valid JSON: {err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("cells", data.get("worksheets")), list):
        raise NotebookError(f"{name}: not a notebook (a JSON object with a 'cells' list was expected)")
    if data.get("nbformat") != 4:
        try:  # old formats: let nbformat convert them
            return nbformat.reads(text, as_version=4)
        except Exception as err:
            raise NotebookError(f"{name}: not a readable notebook ({err})") from err
    data.setdefault("metadata", {})
    data.setdefault("nbformat_minor", 0)
    for i, cell in enumerate(data["cells"]):
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
            raise NotebookError(f"{name}: cell {i} is not a notebook cell")
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(str(s) for s in source)
        if not isinstance(source, str):
            raise NotebookError(f"{name}: cell {i} has a source that is not text")
        cell["source"] = source
        if not isinstance(cell.get("metadata"), dict):
            cell["metadata"] = {}
        if cell["cell_type"] == "code":
            if not isinstance(cell.get("outputs"), list):
                cell["outputs"] = []
            cell.setdefault("execution_count", None)
            for out in cell["outputs"]:
                if isinstance(out, dict) and isinstance(out.get("text"), list):
                    out["text"] = "".join(out["text"])
                if isinstance(out, dict) and isinstance(out.get("data"), dict):
                    for key, value in out["data"].items():
                        if isinstance(value, list) and not key.endswith("json"):
                            out["data"][key] = "".join(value)
    return nbformat.from_dict(data)


def writes_notebook(nb: NotebookNode) -> str:
    """Serialise exactly as nbformat v4 does (sorted keys, indent 1), plus a final newline."""
    return JSONWriter().writes(nbformat.from_dict(nb)) + "\n"


def write_notebook(nb: NotebookNode, path: str | Path) -> None:
    Path(path).write_bytes(writes_notebook(nb).encode("utf-8"))


# ------------------------------------------------------------ cell contract


def cell_info(cell: dict[str, Any]) -> dict[str, Any]:
    """The cell's ``metadata.minivfm`` dict (empty when it has none)."""
    info = cell.get("metadata", {}).get("minivfm")
    return info if isinstance(info, dict) else {}


def cell_role(cell: dict[str, Any]) -> str | None:
    """``"exercise"``, ``"check"`` or ``None`` (a code cell of no particular role)."""
    if cell.get("cell_type") != "code":
        return None
    role = cell_info(cell).get("role")
    return role if role in ROLES else None


def cell_id(cell: dict[str, Any]) -> str | None:
    value = cell_info(cell).get("id")
    return value if isinstance(value, str) and value else None


def grading_marker(cell: dict[str, Any]) -> str | None:
    """The nbval marker (comment or tag) that would stop a check from counting, if any."""
    for line in cell.get("source", "").splitlines():
        line = line.strip()
        if line.startswith("#") and line.lstrip("#").strip() in UNGRADABLE_MARKERS:
            return line.lstrip("#").strip()
    tags = cell.get("metadata", {}).get("tags", [])
    for tag in tags if isinstance(tags, list) else []:
        if tag in UNGRADABLE_TAGS:
            return f"tag {tag!r}"
    return None


def has_solution_region(source: str) -> bool:
    return any(line.strip() == BEGIN_SOLUTION for line in source.splitlines())


def validate_cells(nb: NotebookNode, name: str = "<notebook>") -> None:
    """Check the cell contract of a solution notebook.

    Raises:
        NotebookError: naming the cell, when a ``minivfm`` role is unknown, an
            id is missing or an exercise id repeats, check points are not a
            non-negative number, a check is marked ``NBVAL_SKIP`` or
            ``NBVAL_RAISES_EXCEPTION``, an exercise has no solution region, or
            a solution region sits in a cell that is not an exercise.
    """
    seen_exercises: set[str] = set()
    for i, cell in enumerate(nb.cells):
        where = f"{name}: cell {i}"
        info = cell_info(cell)
        if info:
            role = info.get("role")
            if role not in ROLES:
                raise NotebookError(f"{where}: metadata.minivfm.role={role!r}; expected one of {ROLES}")
            if cell.cell_type != "code":
                raise NotebookError(f"{where}: a {role} cell must be a code cell, not {cell.cell_type}")
            if cell_id(cell) is None:
                raise NotebookError(f"{where}: metadata.minivfm.id must be a non-empty string")
            if role == "exercise":
                if cell_id(cell) in seen_exercises:
                    raise NotebookError(f"{where}: exercise id {cell_id(cell)!r} is used twice")
                seen_exercises.add(cell_id(cell))
                if not has_solution_region(cell.source):
                    raise NotebookError(
                        f"{where}: exercise {cell_id(cell)!r} has no '{BEGIN_SOLUTION}' region "
                        "(the lesson would show the whole solution)"
                    )
            if role == "check":
                marker = grading_marker(cell)
                if marker:
                    raise NotebookError(
                        f"{where}: check {cell_id(cell)!r} is marked {marker}; a check must run and fail"
                    )
                points = info.get("points", 1)
                if isinstance(points, bool) or not isinstance(points, (int, float)) or points < 0:
                    raise NotebookError(f"{where}: metadata.minivfm.points={points!r}; expected a number >= 0")
        elif has_solution_region(cell.get("source", "")):
            raise NotebookError(
                f"{where}: has a '{BEGIN_SOLUTION}' region but is not an exercise cell "
                '(add "metadata": {"minivfm": {"role": "exercise", "id": ...}})'
            )


# -------------------------------------------------------------------- stubs


def stub_source(source: str, name: str = "<cell>") -> str:
    """Replace every solution region with the stub, keeping the marker's indentation.

    >>> print(stub_source("def f(x):\\n    ### BEGIN SOLUTION\\n    return x\\n    ### END SOLUTION\\n"))
    def f(x):
        # YOUR CODE HERE
        raise NotImplementedError()
    <BLANKLINE>

    Raises:
        NotebookError: a region is not closed, or an end marker has no begin.
    """
    out: list[str] = []
    inside = False
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped == BEGIN_SOLUTION:
            if inside:
                raise NotebookError(f"{name}: '{BEGIN_SOLUTION}' inside another solution region")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            newline = "\n" if line.endswith("\n") else ""
            out.append(f"{indent}{STUB_LINES[0]}\n{indent}{STUB_LINES[1]}{newline}")
        elif stripped == END_SOLUTION:
            if not inside:
                raise NotebookError(f"{name}: '{END_SOLUTION}' without '{BEGIN_SOLUTION}'")
            inside = False
            if not line.endswith("\n") and out and out[-1].endswith("\n"):
                out[-1] = out[-1][:-1]  # the region ended the cell: so does the stub
        elif not inside:
            out.append(line)
    if inside:
        raise NotebookError(f"{name}: '{BEGIN_SOLUTION}' is never closed by '{END_SOLUTION}'")
    return "".join(out)
