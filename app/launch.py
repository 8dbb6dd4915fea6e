"""Build the context (model service + store) and serve the app, in the foreground or, for
tests and benchmarks, in the background on a free port."""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from sqlalchemy.exc import SQLAlchemyError

from storage import StorageError, open_store

from .examples import EXAMPLES_DIR
from .handlers.common import AppContext
from .hub_sync import start_hub_sync
from .service import ModelService, ServingLimits
from .owners import KEY_FILE
from .served import served_root
from .settings import AppSettings
from .ui import CSS, build_demo
from .zerogpu import on_zerogpu

MAX_UPLOAD = "50mb"


def build_context(settings: AppSettings) -> AppContext:
    """Open (and migrate) the store, then load the model once; StorageError / ServiceError
    with one line when either cannot be had."""
    try:
        store = open_store(settings.storage)
    except StorageError:
        raise
    except (SQLAlchemyError, OSError, ValueError) as e:
        where = settings.storage.database_url.render_as_string(hide_password=True) if settings.db_url \
            else settings.data_dir
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"cannot open the store at {where}: {first}") from e
    try:
        service = ModelService.load(settings.model_spec, device=settings.device, dtype=settings.dtype,
                                    seed=settings.seed, quantize=settings.quantize, limits=serving_limits(settings))
    except BaseException:
        store.dispose()
        raise
    hub = start_hub_sync(store, settings.data_dir, settings.feedback_repo, settings.feedback_every)
    return AppContext(service, store, settings, hub)


def serving_limits(settings: AppSettings) -> ServingLimits:
    """The service's batch, queue, time and cache limits from the app's settings; the service's
    global bound on waiting requests is the app's queue size. On a ZeroGPU Space the engine stays
    in the server's process: a GPU is attached only to functions decorated
    there."""
    return ServingLimits(max_batch=settings.max_batch, max_waiting=settings.queue_size,
                         per_user=settings.user_queue, timeout_s=float(settings.request_timeout),
                         image_cache_mb=settings.image_cache_mb, prefix_cache_mb=settings.prefix_cache_mb,
                         stream_interval_s=settings.stream_interval_ms / 1000.0,
                         engine_mode="thread" if on_zerogpu() else settings.engine,
                         engine_threads=settings.engine_threads)


def _allowed_paths(ctx: AppContext) -> list[str]:
    """Files the browser may fetch: each owner's copies of stored pictures (opaque names, see
    served.py), examples, the model card. Never the content-addressed store itself."""
    paths = [str(served_root(ctx.store).resolve()), str(EXAMPLES_DIR)]
    if ctx.service.info.card_path is not None:
        paths.append(str(ctx.service.info.card_path.resolve()))
    return paths


def launch(demo: gr.Blocks, settings: AppSettings, *, block: bool = True, port: int | None = None,
           quiet: bool = False) -> str:
    """Serve `demo` (from `ui.build_demo`); returns the local URL (when not blocking)."""
    ctx: AppContext = demo.sphinx_context  # type: ignore[attr-defined]
    _, url, _ = demo.launch(server_name=settings.host, server_port=port or settings.port, share=settings.share,
                            prevent_thread_lock=not block, allowed_paths=_allowed_paths(ctx),
                            blocked_paths=[str(Path(ctx.store.images.root).resolve()),   # served.py: copies only
                                           str((Path(ctx.settings.data_dir) / KEY_FILE).resolve())],
                            max_file_size=MAX_UPLOAD, footer_links=["api", "gradio", "settings"],
                            run_history=False, show_error=True, quiet=quiet, css=CSS, ssr_mode=False)
    return url


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Running:
    """A server started by `serve_in_background`; `close()` stops it."""

    demo: gr.Blocks
    url: str
    context: AppContext

    def close(self) -> None:
        self.demo.close()


def serve_in_background(settings: AppSettings, context: AppContext | None = None) -> Running:
    """The app on 127.0.0.1 and a free port, without blocking (for tests and benchmarks);
    `context` defaults to loading the model and the store."""
    settings = settings.with_(host="127.0.0.1")
    demo = build_demo(settings, context if context is not None else build_context(settings))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    url = launch(demo, settings, block=False, port=free_port(), quiet=True)
    return Running(demo, url, demo.sphinx_context)  # type: ignore[attr-defined]
