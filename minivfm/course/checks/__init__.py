"""Exercise checks: each lesson has a module here (``checks.vit``, ``checks.vae``...).

A check calls the student's function on fixed random inputs, compares it with
the library's reference implementation, and prints exactly one deterministic
line when it passes::

    ✓ patchify: shape (8, 64, 48), values match

When it fails it raises ``AssertionError`` with a message that helps. The
helpers below keep every lesson's checks speaking the same language.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

PASS = "✓"


def passed(name: str, detail: str = "") -> None:
    """Print the one line that a passing check prints."""
    print(f"{PASS} {name}: {detail}" if detail else f"{PASS} {name}")


def fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def call_plain(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the student's ``fn``; turn ``NotImplementedError`` into a clear failure (other errors pass:
    for checks that give their own hint)."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as err:
        raise AssertionError(f"{name}: not implemented yet; fill in the exercise cell above") from err


def call(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`call_plain`, and a shape error inside ``fn`` becomes a failure that says what to look at."""
    try:
        return call_plain(name, fn, *args, **kwargs)
    except RuntimeError as err:  # a broadcasting or matmul error: say what to look at
        text = str(err)
        if any(word in text for word in ("size of tensor", "shape", "broadcast", "dimension", "mat1 and mat2")):
            shapes = ", ".join(fmt_shape(a.shape) for a in args if isinstance(a, torch.Tensor))
            raise AssertionError(
                f"{name}: a shape error inside your function ({text.splitlines()[0]}). It was called with "
                f"tensors of shapes {shapes}: print the shape of each intermediate tensor and compare it with "
                "the shapes the exercise text gives"
            ) from err
        raise


def assert_tensor(name: str, value: Any, shape: Sequence[int] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise AssertionError(f"{name}: expected shape {fmt_shape(shape)}, got {fmt_shape(value.shape)}")
    return value


def assert_close(
    name: str,
    actual: Any,
    expected: torch.Tensor,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    hint: str = "",
) -> None:
    """Assert ``actual`` has ``expected``'s shape and values; print nothing."""
    actual = assert_tensor(name, actual, tuple(expected.shape))
    actual = actual.detach().to(expected.dtype)
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        err = (actual - expected).abs().max().item()
        msg = f"{name}: values differ from the reference (max abs error {err:.3g}, tolerance {atol:g})"
        raise AssertionError(msg + (f". Hint: {hint}" if hint else ""))


def check_close(
    name: str,
    actual: Any,
    expected: torch.Tensor,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    hint: str = "",
) -> None:
    """``assert_close`` then print ``✓ name: shape (...), values match``."""
    assert_close(name, actual, expected, atol=atol, rtol=rtol, hint=hint)
    passed(name, f"shape {fmt_shape(expected.shape)}, values match")
