"""App settings: command-line flags, each with an environment-variable twin.

A flag wins over its environment variable, which wins over the default. On a Hugging Face
Space (`SYSTEM=spaces`) Gradio's own `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` are
honoured, so the Space's proxy finds the server without extra configuration.
"""
from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from storage import StorageSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "assets" / "demo"
FALLBACK_PRESET = "sphinx-test-tiny"
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("8bit", "4bit")
ENGINES = ("process", "thread")
SECRET_FILE = "browser_secret"


class SettingsError(ValueError):
    """A flag or environment value that cannot be used (one line for the user)."""


@dataclass(frozen=True)
class AppSettings:
    model: str | None = None          # folder, hub id or preset; None: assets/demo, else the tiny preset
    db_url: str | None = None         # SQLAlchemy URL; None: SQLite in data_dir
    data_dir: Path = Path("data")     # the store (SQLite file + images) and the browser secret
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    device: str | None = None         # cpu, cuda, cuda:1 ... (None: cuda when available)
    dtype: str | None = None          # float32 / bfloat16 / float16 (None: the checkpoint's)
    quantize: str | None = None       # 8bit / 4bit: the LLM's linear layers through bitsandbytes
    queue_size: int = 32              # requests waiting for the model; more get a clear "queue full"
    max_batch: int = 8                # requests decoding together (batched serving); the app lets this many in
    user_queue: int = 4               # requests one user may have waiting or running at once
    request_timeout: int = 300        # seconds one request may take, waiting included; then a clear message
    image_cache_mb: int = 256         # visual tokens of recent images, reused by later turns and tabs (0: off)
    prefix_cache_mb: int = 512        # KV caches of recent conversation prefixes, reused next turn (0: off)
    stream_interval_ms: int = 50      # after the first piece, at most one streamed update per interval (0: every piece)
    engine: str = "process"           # the model's engine in its own process, or "thread": in the server's
    engine_threads: int = 0           # the engine process's intra-op threads on CPU (0: all cores but one)
    max_new_tokens: int = 512         # the highest the sliders allow
    task_max_new_tokens: int = 384    # answers of Grounding / Set-of-Mark / OCR (lists of boxes are long)
    max_pdf_pages: int = 30           # pages of a PDF the OCR tab will render
    max_pixels: int = 40_000_000      # uploads beyond this are refused before decoding
    seed: int = 0                     # random-init presets are built from this seed (reproducible noise)
    on_space: bool = False            # running on a Hugging Face Space (login button, OAuth owner)
    browser_secret: str | None = None  # Gradio BrowserState encryption (public in /config; owners.py signs); None: data_dir
    feedback_repo: str | None = None  # a Hub dataset repo the feedback is pushed to (app/hub_sync.py)
    feedback_every: float = 10.0      # minutes between those pushes
    admin_token: str | None = None    # opens the host's panel off a Space (SPHINX_ADMIN_TOKEN)
    space_author: str | None = None   # the Space's owner (SPACE_AUTHOR_NAME): the host on a Space

    # --- derived ----------------------------------------------------------------------
    @property
    def model_spec(self) -> str:
        """What `--model` resolves to: the flag, else the embedded demo model, else the tiny preset."""
        if self.model:
            return self.model
        if (DEMO_MODEL_DIR / "sphinx_config.json").is_file():
            return str(DEMO_MODEL_DIR)
        return FALLBACK_PRESET

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(data_dir=self.data_dir, url=self.db_url)

    def secret(self) -> str:
        """The BrowserState secret, stable across restarts so old browser ids stay readable."""
        if self.browser_secret:
            return self.browser_secret
        path = self.data_dir / SECRET_FILE
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value)
        return value

    def with_(self, **changes) -> "AppSettings":
        return replace(self, **changes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description="Serve the SPHINX-X web app.")
    p.add_argument("--model", help="checkpoint folder, hub repo id, or preset name "
                   "[SPHINX_MODEL; default: assets/demo, else sphinx-test-tiny]")
    p.add_argument("--db", dest="db_url", help="SQLAlchemy URL of the store [SPHINX_DB_URL; default: SQLite in the data dir]")
    p.add_argument("--data-dir", help="folder of the store and its images [SPHINX_DATA_DIR; default: data]")
    p.add_argument("--host", help="interface to serve on [SPHINX_HOST; default: 127.0.0.1]")
    p.add_argument("--port", help="port [SPHINX_PORT; default: 7860]")
    p.add_argument("--share", action="store_true", default=None, help="a public gradio.live link [SPHINX_SHARE]")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... [SPHINX_DEVICE; default: cuda if available]")
    p.add_argument("--dtype", help=f"one of {', '.join(DTYPES)} [SPHINX_DTYPE; default: the checkpoint's]")
    p.add_argument("--quantize", help=f"one of {', '.join(QUANTIZE)}: the LLM's linear layers with bitsandbytes "
                   "[SPHINX_QUANTIZE; default: none]")
    p.add_argument("--queue-size", help="most requests waiting for the model [SPHINX_QUEUE_SIZE; default: 32]")
    p.add_argument("--max-batch", help="requests decoding together [SPHINX_MAX_BATCH; default: 8]")
    p.add_argument("--user-queue", help="requests one user may have waiting or running [SPHINX_USER_QUEUE; default: 4]")
    p.add_argument("--request-timeout", help="seconds one request may take, waiting included "
                   "[SPHINX_REQUEST_TIMEOUT; default: 300]")
    p.add_argument("--image-cache-mb", help="MiB of cached visual tokens, 0 = off [SPHINX_IMAGE_CACHE_MB; default: 256]")
    p.add_argument("--prefix-cache-mb", help="MiB of cached conversation prefixes (KV), 0 = off "
                   "[SPHINX_PREFIX_CACHE_MB; default: 512]")
    p.add_argument("--stream-interval-ms", help="after an answer's first piece, at most one streamed update per "
                   "this many ms, 0 = every piece [SPHINX_STREAM_INTERVAL_MS; default: 50]")
    p.add_argument("--engine", help="where the model decodes: 'process' (its own process, so the web server's "
                   "Python never holds up a decode step) or 'thread' (in the server's process; what a ZeroGPU "
                   "Space always uses) [SPHINX_ENGINE; default: process]")
    p.add_argument("--engine-threads", help="intra-op threads of the engine process on CPU, 0 = all cores but one "
                   "[SPHINX_ENGINE_THREADS; default: 0]")
    p.add_argument("--max-pdf-pages", help="pages of a PDF that can be read [SPHINX_MAX_PDF_PAGES; default: 30]")
    p.add_argument("--feedback-repo", help="a Hub dataset repo (owner/name) the conversations and their feedback "
                   "are pushed to, with HF_TOKEN [SPHINX_FEEDBACK_REPO; default: none, nothing is pushed]")
    p.add_argument("--feedback-every", help="minutes between those pushes [SPHINX_FEEDBACK_EVERY; default: 10]")
    return p


_ENV = {"model": "SPHINX_MODEL", "db_url": "SPHINX_DB_URL", "data_dir": "SPHINX_DATA_DIR",
        "host": "SPHINX_HOST", "port": "SPHINX_PORT", "share": "SPHINX_SHARE", "device": "SPHINX_DEVICE",
        "dtype": "SPHINX_DTYPE", "quantize": "SPHINX_QUANTIZE", "queue_size": "SPHINX_QUEUE_SIZE", "max_pdf_pages": "SPHINX_MAX_PDF_PAGES",
        "max_batch": "SPHINX_MAX_BATCH", "user_queue": "SPHINX_USER_QUEUE", "request_timeout": "SPHINX_REQUEST_TIMEOUT",
        "image_cache_mb": "SPHINX_IMAGE_CACHE_MB", "prefix_cache_mb": "SPHINX_PREFIX_CACHE_MB",
        "stream_interval_ms": "SPHINX_STREAM_INTERVAL_MS", "engine": "SPHINX_ENGINE",
        "engine_threads": "SPHINX_ENGINE_THREADS", "feedback_repo": "SPHINX_FEEDBACK_REPO",
        "feedback_every": "SPHINX_FEEDBACK_EVERY"}


def _int(name: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be an integer, got {value!r}") from None
    if not low <= n <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, got {n}")
    return n


def _bool(name: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name} must be true or false, got {value!r}")


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> AppSettings:
    """Flags, then their environment twins, then defaults; SettingsError on bad values."""
    args = vars(_parser().parse_args(list(argv) if argv is not None else []))
    raw = {k: (args[k] if args.get(k) is not None else env.get(v)) for k, v in _ENV.items()}
    on_space = env.get("SYSTEM") == "spaces"
    host = raw["host"] or env.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = raw["port"] or env.get("GRADIO_SERVER_PORT") or "7860"
    dtype = raw["dtype"] or None
    if dtype is not None and dtype not in DTYPES:
        raise SettingsError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    quantize = raw["quantize"] or None
    if quantize is not None and quantize not in QUANTIZE:
        raise SettingsError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    engine = raw["engine"] or "process"
    if engine not in ENGINES:
        raise SettingsError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    share = raw["share"] if isinstance(raw["share"], bool) else _bool("SPHINX_SHARE", raw["share"] or "")
    return AppSettings(
        model=raw["model"] or None, db_url=raw["db_url"] or None,
        data_dir=Path(raw["data_dir"] or "data"), host=host, port=_int("--port", port, 1, 65535),
        share=share, device=raw["device"] or None, dtype=dtype, quantize=quantize,
        queue_size=_int("--queue-size", raw["queue_size"] or "32", 1, 10_000),
        max_pdf_pages=_int("--max-pdf-pages", raw["max_pdf_pages"] or "30", 1, 1000),
        max_batch=_int("--max-batch", raw["max_batch"] or "8", 1, 256),
        user_queue=_int("--user-queue", raw["user_queue"] or "4", 1, 10_000),
        request_timeout=_int("--request-timeout", raw["request_timeout"] or "300", 1, 86_400),
        image_cache_mb=_int("--image-cache-mb", raw["image_cache_mb"] or "256", 0, 1 << 20),
        prefix_cache_mb=_int("--prefix-cache-mb", raw["prefix_cache_mb"] or "512", 0, 1 << 20),
        stream_interval_ms=_int("--stream-interval-ms", raw["stream_interval_ms"] or "50", 0, 10_000),
        engine=engine, engine_threads=_int("--engine-threads", raw["engine_threads"] or "0", 0, 1024),
        on_space=on_space, browser_secret=env.get("SPHINX_BROWSER_SECRET") or None,
        feedback_repo=raw["feedback_repo"] or None,
        feedback_every=float(_int("--feedback-every", raw["feedback_every"] or "10", 1, 24 * 60)),
        admin_token=env.get("SPHINX_ADMIN_TOKEN") or None,
        space_author=(env.get("SPACE_AUTHOR_NAME") or None) if on_space else None)
