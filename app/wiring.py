"""Event plumbing shared by the layout: the concurrency group of model work (as wide as the
service's batch), the event options, and how errors reach the user (`soft` for UI events,
`guard` for API endpoints)."""
from __future__ import annotations

import contextlib
import functools
import html
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from .documents import DocumentError
from .handlers.common import USER_ERRORS, AppContext

log = logging.getLogger("app")
MODEL = "model"                 # the one concurrency group of model work
PRIVATE = {"api_visibility": "private"}
CHEAP = {"queue": False, "api_visibility": "private", "show_progress": "minimal"}


def model_group(ctx: AppContext) -> dict[str, Any]:
    """Model work: one concurrency group that lets in as many events as the service decodes
    together (its batch); the rest wait in Gradio's queue and see their position. Gradio keeps
    the lowest limit given to a group, so every model event takes it from here."""
    return {"concurrency_id": MODEL, "concurrency_limit": ctx.service.limits.max_batch}


def queued(ctx: AppContext) -> dict[str, Any]:
    """UI model events. "minimal" progress: the queue position and timer show in a corner, and
    an error or a cancel never leaves an "Error" overlay that blocks the component (the
    message is a toast)."""
    return {**model_group(ctx), "api_visibility": "private", "show_progress": "minimal"}


def _message(e: BaseException) -> str:
    """One line, HTML-escaped: Gradio renders toast messages as HTML, and a message may quote
    a file name or text the user chose."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return html.escape(line, quote=False)


@contextlib.contextmanager
def _as_gr_error(name: str) -> Iterator[None]:
    """User errors become a one-line gr.Error; anything else is logged, then reported in one line."""
    try:
        yield
    except gr.Error:
        raise
    except (*USER_ERRORS, DocumentError) as e:
        raise gr.Error(_message(e), print_exception=False) from e
    except Exception as e:  # noqa: BLE001
        log.exception("unexpected error in %s", name)
        raise gr.Error(f"unexpected error: {_message(e)}", print_exception=False) from e


def guard(fn: Callable) -> Callable:
    """For API endpoints: user errors become a gr.Error (the client raises it, one line);
    anything else is logged and reported in one line too, and the app keeps serving."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any):
            with _as_gr_error(fn.__name__):
                yield from fn(*args, **kwargs)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        with _as_gr_error(fn.__name__):
            return fn(*args, **kwargs)
    return wrapper


def soft(n_outputs: int, status: int) -> Callable[[Callable], Callable]:
    """For UI events: a user error becomes a message in the event's status line (output
    `status` of `n_outputs`) and a toast, while every other output keeps its value. Raising
    into Gradio instead would leave "Error" overlays over the outputs (the chatbot among them)."""
    def decorate(fn: Callable) -> Callable:
        def failed(e: BaseException) -> tuple[Any, ...]:
            if isinstance(e, (*USER_ERRORS, DocumentError)):
                text = _message(e)
            else:
                log.exception("unexpected error in %s", fn.__name__)
                text = f"unexpected error: {_message(e)}"
            gr.Warning(text)
            out: list[Any] = [gr.skip()] * n_outputs
            out[status] = f"⚠ {text}"
            return tuple(out) if n_outputs > 1 else out[0]

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - reported, the app keeps serving
                    yield failed(e)
            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                return failed(e)
        return wrapper
    return decorate
