"""A small pytest plugin that makes nbval fit for grading; load it with ``-p minivfm.course.nbval_plugin``.

It changes nothing in how nbval runs or compares a cell; it works around the
parts of nbval's runner (``nbval/plugin.py``, ``IPyNbCell.runtest``) that get
in the way of grading, and it records every cell's result:

1. **The fixed 5-second wait for output** (nbval issues #136, #151, #231).
   After a cell's ``execute_reply`` arrives, nbval reads the iopub messages
   (outputs, then ``idle``) with a hard-coded ``output_timeout = 5`` seconds
   per message; on a busy machine that wait runs out, nbval kills the kernel
   and every later cell fails. We set each cell's ``output_timeout`` to
   ``--minivfm-output-timeout`` (default 120 s) before it runs. That wait is
   only spent when the kernel is really silent, so a long value costs nothing.
   After a *timeout*, though, nbval interrupts the kernel and uses the same
   wait to see whether the interrupt worked; there we switch it back to
   ``--minivfm-interrupt-timeout`` (default 10 s), so a hung cell costs the
   cell timeout plus at most that.
2. **One timeout fails everything after it.** nbval marks every cell after a
   timed-out one ``xfail`` ("Previous cell timed out"), and a kernel it could
   not interrupt is stopped, so every later cell fails with "Kernel dead on
   test start". We clear the ``timed_out`` flag before each cell, and when
   the kernel is dead (not interruptible, crashed, or the code called
   ``exit()``) we start a new one and replay, without checking, every earlier
   cell that did not time out; then the cell runs as usual. So an exercise
   that hangs costs its own checks, not the others.
3. **A dead kernel is noticed at once.** nbval waits for the ``execute_reply``
   for the whole cell timeout even when the kernel process has died; we poll
   the process every second while waiting.
4. **stderr is not compared.** Warnings and progress bars go to stderr and
   differ between machines and library versions; stderr streams are dropped
   from both the stored and the new outputs before nbval compares them
   (stdout and rich outputs are compared as nbval does, after sanitizing).
5. **Results.** With ``--minivfm-results FILE`` one JSON line per code cell is
   appended: its number among the code cells, its ``metadata.minivfm``, the
   outcome (``passed``/``failed``/``skipped``), a one-line message (the
   exception ``Name: value``, "timed out after N s", or what differs from the
   stored output), and the duration.
"""

from __future__ import annotations

import json
import time
from queue import Empty
from typing import Any

import pytest

try:  # nbval is an optional dependency of minivfm (extra "course")
    from nbval.kernel import CURRENT_ENV_KERNEL_NAME, RunningKernel
    from nbval.plugin import IPyNbCell, coalesce_streams
except ImportError:  # pragma: no cover
    IPyNbCell = None  # type: ignore[assignment,misc]

MAX_MESSAGE = 600


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minivfm", "minivfm grading on top of nbval")
    group.addoption("--minivfm-results", default=None, help="append one JSON line per notebook cell here")
    group.addoption(
        "--minivfm-output-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for a finished cell's outputs (nbval hard-codes 5)",
    )
    group.addoption(
        "--minivfm-interrupt-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for a timed-out cell to stop after the interrupt",
    )


def _is_cell(item: pytest.Item) -> bool:
    return IPyNbCell is not None and isinstance(item, IPyNbCell)


def _drop_stderr(outputs: list[Any]) -> list[Any]:
    return [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]


class _FileState:
    """Per-notebook bookkeeping, kept on the nbval ``IPyNbFile``."""

    def __init__(self) -> None:
        self.ran: list[Any] = []  # cells run so far, in order
        self.timed_out: set[int] = set()  # cell numbers that timed out
        self.kernel_died: set[int] = set()  # cell numbers during which the kernel died
        self.restarts = 0


def _state(nbfile: Any) -> _FileState:
    state = getattr(nbfile, "_minivfm_state", None)
    if state is None:
        state = nbfile._minivfm_state = _FileState()
    return state


def _patch_kernel(kernel: Any, config: pytest.Config) -> None:
    """Instance patches: watch the process while waiting; short output wait after an interrupt."""
    if getattr(kernel, "_minivfm_patched", False):
        return
    kernel._minivfm_patched = True
    kernel._minivfm_current = None
    kernel._minivfm_died = False
    original_await_reply = kernel.await_reply
    original_interrupt = kernel.interrupt

    def await_reply(msg_id: str, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                return original_await_reply(msg_id, timeout=step)
            except Empty:
                if not kernel.is_alive():
                    kernel._minivfm_died = True
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def interrupt() -> None:
        item = kernel._minivfm_current
        alive = kernel.is_alive()
        if item is not None:  # how long nbval waits for the interrupted cell to go idle
            item.output_timeout = config.getoption("minivfm_interrupt_timeout") if alive else 0.5
        if alive:
            original_interrupt()

    kernel.await_reply = await_reply
    kernel.interrupt = interrupt


def _kernel_name(config: pytest.Config, nbfile: Any) -> str:
    if config.option.nbval_current_env:
        return CURRENT_ENV_KERNEL_NAME
    if config.option.nbval_kernel_name:
        return config.option.nbval_kernel_name
    return nbfile.nb.metadata.get("kernelspec", {}).get("name", "python")


def _restart_and_replay(item: Any) -> None:
    """Start a fresh kernel for ``item``'s notebook and replay the cells that ran before it."""
    nbfile, config = item.parent, item.config
    state = _state(nbfile)
    old = nbfile.kernel
    if old is not None and hasattr(old, "km"):
        try:
            old.stop()
        except Exception:
            pass
    state.restarts += 1
    nbfile.kernel = RunningKernel(
        _kernel_name(config, nbfile),
        cwd=str(nbfile.fspath.dirname),
        startup_timeout=config.option.nbval_kernel_startup_timeout,
    )
    kernel = nbfile.kernel
    _patch_kernel(kernel, config)  # notices at once if a replayed cell kills it again
    timeout = config.option.nbval_cell_timeout
    for earlier in state.ran:
        if earlier.cell_num in state.timed_out or earlier.cell_num in state.kernel_died:
            continue
        if earlier.options.get("skip"):
            continue
        msg_id = kernel.execute_cell_input(earlier.cell.source, allow_stdin=False)
        try:
            kernel.await_reply(msg_id, timeout=timeout)
            kernel.await_idle(msg_id, config.getoption("minivfm_output_timeout"))
        except Empty:
            # the replay itself hangs: give up; later cells report a dead kernel
            kernel.stop()
            return


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not _is_cell(item):
        return
    nbfile = item.parent
    nbfile.timed_out = False  # workaround 2: no xfail cascade after a timeout
    kernel = nbfile.kernel
    if kernel is not None and not kernel.is_alive():
        state = _state(nbfile)
        if state.ran:  # the kernel died at the end of (or after) the last cell: do not replay that one
            state.kernel_died.add(state.ran[-1].cell_num)
        _restart_and_replay(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if not _is_cell(item):
        yield
        return
    nbfile = item.parent
    item.output_timeout = item.config.getoption("minivfm_output_timeout")  # workaround 1
    if not getattr(item, "_minivfm_compare", False):
        item._minivfm_compare = True
        original = item.compare_outputs

        def compare_outputs(test, ref, skip_compare=None):  # workaround 4
            return original(_drop_stderr(test), _drop_stderr(ref), skip_compare)

        item.compare_outputs = compare_outputs
    kernel = nbfile.kernel
    if kernel is not None:
        _patch_kernel(kernel, item.config)
        kernel._minivfm_current = item
        kernel._minivfm_died = False
    yield
    state = _state(nbfile)
    state.ran.append(item)
    if kernel is not None and kernel._minivfm_died:
        state.kernel_died.add(item.cell_num)
    elif nbfile.timed_out:
        state.timed_out.add(item.cell_num)


def _outputs_text(item: Any, outputs: list[Any]) -> str:
    parts = []
    for out in _drop_stderr(coalesce_streams(list(outputs))):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            data = out["data"]
            text = data.get("text/plain") or ", ".join(sorted(data))
            parts.append(text if isinstance(text, str) else "".join(text))
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    return item.sanitize("".join(parts)).strip()


def _short(text: str, limit: int = MAX_MESSAGE) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(item: Any, call: pytest.CallInfo, state: _FileState) -> str:
    excinfo = call.excinfo
    if excinfo is None:
        return ""
    timeout = item.config.option.nbval_cell_timeout
    if item.cell_num in state.kernel_died:
        return "the kernel died while running this cell (a crash, exit() or out of memory)"
    if item.cell_num in state.timed_out:
        if item.parent.kernel is not None and item.parent.kernel.is_alive():
            return f"timed out after {timeout:g} s (the cell was interrupted)"
        return f"timed out after {timeout:g} s (the cell ignored the interrupt; the kernel was restarted)"
    for out in item.test_outputs or []:
        if out.get("output_type") == "error":
            evalue = out.get("evalue") or ""
            return _short(f"{out.get('ename')}: {evalue}" if evalue else str(out.get("ename")))
    text = str(excinfo.value)
    if text == "Cell outputs differ":
        expected = _outputs_text(item, item.cell.outputs)
        got = _outputs_text(item, item.test_outputs or [])
        return _short(f"output differs from the reference: expected {expected!r}, got {got!r}")
    return _short(f"{excinfo.typename}: {text}" if text else excinfo.typename)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if not _is_cell(item):
        return
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and not report.passed):
        path = item.config.getoption("minivfm_results")
        if not path:
            return
        state = _state(item.parent)
        if report.when == "setup":
            message = "not run: " + _short(str(call.excinfo.value) if call.excinfo else "setup failed")
        else:
            message = _message(item, call, state)
        record = {
            "cell": item.cell_num,
            "minivfm": dict(item.cell.metadata.get("minivfm", {}) or {}),
            "outcome": report.outcome,
            "message": message,
            "duration": round(report.duration, 3),
            "kernel_restarts": state.restarts,
        }
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
