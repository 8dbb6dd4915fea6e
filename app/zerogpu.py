"""ZeroGPU: model functions run under `spaces.GPU` when the `spaces` package imports.

On a ZeroGPU Space a GPU is attached only while a function decorated with `spaces.GPU` runs;
everywhere else (`spaces` missing, or off a Space, where the package is a no-op) the
function is returned unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
GPU_SECONDS = 120  # the longest a single model call may hold the Space's GPU


def gpu(fn: F) -> F:
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(duration=GPU_SECONDS)(fn)
