"""ZeroGPU: model functions run under `spaces.GPU` when the `spaces` package imports.

On a ZeroGPU Space a GPU is attached only while a function decorated with `spaces.GPU` runs;
everywhere else (`spaces` missing, or off a Space, where the package is a no-op) the
function is returned unchanged.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable)
GPU_SECONDS = 120  # the longest a single model call may hold the Space's GPU


@functools.cache
def _spaces() -> Any:
    """The `spaces` module, or None; looked up once (a failed import is not cached by Python, and
    the serving engine wraps every burst of work)."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return None
    return spaces


def on_zerogpu() -> bool:
    """Whether this is a ZeroGPU Space: `spaces` imports and `SPACES_ZERO_GPU` is set (as the
    package itself decides). Model work must then run under `spaces.GPU` in this process; on
    any other Space the package is installed too, but decorates nothing."""
    flag = os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")
    return flag and _spaces() is not None


def gpu(fn: F) -> F:
    spaces = _spaces()
    if spaces is None:
        return fn
    return spaces.GPU(duration=GPU_SECONDS)(fn)
