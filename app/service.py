"""THE model service: the only place in the app that touches the model.

Load once; then requests in, text out: `stream(request)` yields the answer piece by piece,
`generate(request)` returns it whole, `cancel(request_id)` stops a request wherever it is
(waiting, prefilling or decoding; what was generated so far stays with the request).
Handlers build a `GenerationRequest` and never see tensors.

Behind this interface concurrent requests are served together: the continuous-batching
engine (`sphinx_model.serving`) decodes every running request in one batch, lets a new one
join at the next step, reuses each image's visual tokens and each conversation's known
prefix. It runs on a thread of this process (`ServingLimits.engine_mode="thread"`, the
library default and ZeroGPU's), or in a process of its own (`"process"`, the app's default:
`sphinx_model.serving.engine_process`), where no Python of the web server holds up a decode step;
then this process holds no model, only the processor.

The service adds what protects it: a per-user cap on requests waiting or running, a global
bound on those waiting, and a per-request time limit; each ends in a one-line ServiceError
for the user, never a hang.

Images travel as a list per request, one per image part of the conversation, in order (a
new image may come at any turn; text-only turns keep the earlier ones); `_model_images` is
the one place that turns that list into what the model core takes.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
import queue
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import sphinx_model.released  # noqa: F401  (registers released:NAME with the loader)
from sphinx_model.config import CONFIG_FILE, get_preset, list_presets
from sphinx_model.conversation import Conversation, SchemaError
from sphinx_model.image_processing import ImageError
from sphinx_model.loading import (
    CheckpointError,
    from_pretrained,
    load_model,
    resolve_checkpoint,
)
from sphinx_model.processor import PromptTooLongError, SphinxProcessor
from sphinx_model.serving import MIB, ContinuousBatcher, EngineConfig, Job, Signal
from sphinx_model.serving.engine_process import EngineProcess, EngineProcessError, seeded
from sphinx_model.serving.generation import GenerationSettings, Generator
from sphinx_model.tiling import Canvas

from .zerogpu import gpu

log = logging.getLogger(__name__)
HUB_URL = "https://huggingface.co/"
ENGINE_MODES = ("thread", "process")
_EARLY_CANCELS = 1024    # cancels remembered for requests that have not started yet


class ServiceError(RuntimeError):
    """A request the model cannot serve; the message is meant for the user (one line)."""


class TooManyImages(ServiceError):
    """More images in a conversation than the model takes."""


@dataclass(frozen=True)
class ModelInfo:
    """What the UI shows and the store records about the loaded model."""

    model_id: str              # the spec it was loaded from (folder, hub id or preset)
    version: str               # hub commit, content hash of a folder, or the preset's seed
    name: str                  # the config's name
    card_url: str | None       # the hub page, or None for local folders (see card_path)
    card_path: Path | None     # a local model card (README.md beside the weights)
    random_weights: bool       # answers are noise (random-init preset)
    max_images: int            # images per conversation the model takes
    anchor: str
    max_length: int


@dataclass(frozen=True)
class ServingLimits:
    """How many requests the service takes at once, and for how long (see app/settings.py)."""

    max_batch: int = 8           # requests decoding together (the engine's batch)
    max_waiting: int = 32        # requests waiting for a place in the batch; more: "busy"
    per_user: int = 4            # requests one user may have waiting or running
    timeout_s: float = 300.0     # the longest one request may take, waiting included
    image_cache_mb: int = 256    # visual tokens of recent images
    prefix_cache_mb: int = 512   # KV caches of recent conversation prefixes
    stream_interval_s: float = 0.05  # after the first piece, at most one streamed update per interval
    engine_mode: str = "thread"  # "process": the engine in its own process (see engine_process.py)
    engine_threads: int = 0      # the engine process's intra-op threads on CPU (0: all cores but one)

    def __post_init__(self) -> None:
        if self.engine_mode not in ENGINE_MODES:
            raise ValueError(f"engine_mode must be one of {', '.join(ENGINE_MODES)}, got {self.engine_mode!r}")

    def engine(self) -> EngineConfig:
        return EngineConfig(max_batch=self.max_batch, image_cache_bytes=self.image_cache_mb * MIB,
                            prefix_cache_bytes=self.prefix_cache_mb * MIB)


@dataclass
class GenerationRequest:
    """One answer to produce. Timing fields are filled in by the service as it runs."""

    conversation: Conversation
    images: Sequence[Any] = ()            # one per image part, in order (paths / PIL images)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    user: str | None = None               # the owner key; the per-user cap counts by it
    started_at: float | None = None       # time.perf_counter() when it went to the model's queue
    first_piece_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False               # cancel() was called for it
    text: str = ""                        # what has been generated so far

    @property
    def latency_ms(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at) * 1000.0


class ModelService:
    """Load once, then stream / generate / cancel requests; concurrent ones decode together."""

    def __init__(self, model: Any, processor: SphinxProcessor, info: ModelInfo,
                 limits: ServingLimits | None = None, engine: EngineProcess | None = None):
        """`model` is served by an engine thread in this process; or, with `engine` (and no
        model here), by that engine process."""
        self.processor = processor
        self.info = info
        self.limits = limits or ServingLimits()
        if engine is None:
            self.generator: Generator | None = Generator(model, processor)
            self.engine: ContinuousBatcher | EngineProcess = ContinuousBatcher(
                self.generator, self.limits.engine(), wrap=gpu)
        else:
            self.generator, self.engine = None, engine
        self._running: dict[str, tuple[GenerationRequest, Signal]] = {}
        self._early: OrderedDict[str, None] = OrderedDict()
        self._registry_lock = threading.Lock()
        self._admitted: Counter[str] = Counter()   # requests per user, waiting or running
        self._in_service = 0

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, device: str | None = None, dtype: str | None = None,
             seed: int = 0, quantize: str | None = None, limits: ServingLimits | None = None) -> ModelService:
        """A checkpoint folder, a hub repo id or a preset name; ServiceError if it cannot load."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        limits = limits or ServingLimits()
        in_process = limits.engine_mode == "thread"
        if not in_process and multiprocessing.current_process().daemon:
            log.warning("the model's engine runs in this process: a daemonic process may not start one")
            in_process = True
        try:
            if spec in list_presets() and not Path(spec).exists():
                config = get_preset(spec)
                random = config.llm.name_or_path is None
                version = f"random-init seed {seed}" if random else "preset"
                load = functools.partial(seeded, seed, load_model, spec, device=device, dtype=dtype, quantize=quantize)
                card_url = card_path = None
            else:
                folder = resolve_checkpoint(spec)
                is_hub = not Path(spec).exists() and not spec.startswith("released:")
                card = folder / "README.md"
                version = _folder_version(folder, is_hub)
                card_url, card_path, random = HUB_URL + spec if is_hub else None, card if card.is_file() else None, False
                load = functools.partial(from_pretrained, folder, device=device, dtype=dtype, quantize=quantize)
            if in_process:
                model, processor = load()
                engine = None
            else:
                model, engine = None, EngineProcess(load, limits.engine(), threads=limits.engine_threads or None)
                processor = engine.processor
            info = _info(spec, version, processor, card_url=card_url, card_path=card_path, random=random)
        except (CheckpointError, EngineProcessError, KeyError, ValueError, OSError) as e:
            raise ServiceError(f"cannot load model {spec!r}: {e}") from e
        return cls(model, processor, info, limits, engine)

    def close(self) -> None:
        """Stop the engine's thread (requests still running get an error)."""
        self.engine.close()

    def wait_idle(self, timeout: float) -> bool:
        """Whether, within `timeout` s, no request is in the service and the batch is empty."""
        end = time.perf_counter() + timeout
        while self._in_service or not self.engine.idle:
            if time.perf_counter() > end:
                return False
            time.sleep(0.01)
        return True

    # --- geometry (for mapping boxes back to pixels) -------------------------------------
    def geometry(self, width: int, height: int) -> Canvas:
        return self.processor.geometry(width, height)

    @property
    def max_pixels(self) -> int:
        return self.processor.config.max_pixels

    # --- requests --------------------------------------------------------------------
    def cancel(self, request_id: str) -> None:
        """Stop a request: now if it runs, at its start if it has not started yet."""
        with self._registry_lock:
            running = self._running.get(request_id)
            if running is not None:
                request, event = running
                request.cancelled = True
                event.set()
                return
            self._early[request_id] = None
            while len(self._early) > _EARLY_CANCELS:
                self._early.popitem(last=False)

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """The answer, piece by piece; closing the iterator cancels the request."""
        with self._registered(request) as event:
            if request.cancelled:
                return
            images = self._model_images(request.conversation, request.images)
            try:
                job = self.engine.prepare(request.conversation, images, request.settings, cancel=event)
            except Exception as e:  # noqa: BLE001 - mapped to a message, or raised as it is
                _raise_for_user(e)
            with self._admission(request):
                request.started_at = time.perf_counter()
                try:
                    self.engine.submit(job)
                    for piece in self._pieces(job, request.started_at + self.limits.timeout_s):
                        if request.first_piece_at is None:
                            request.first_piece_at = time.perf_counter()
                        request.text += piece
                        yield piece
                except GeneratorExit:   # the consumer went away (a client cancelled): that is a stop too
                    request.cancelled = True
                    raise
                finally:
                    event.set()         # a no-op for a finished job; stops one left behind
                    request.finished_at = time.perf_counter()
                    request.cancelled = request.cancelled or job.reason == "cancelled"

    def _pieces(self, job: Job, deadline: float) -> Iterator[str]:
        """The job's pieces until it ends; a ServiceError when it fails or runs past `deadline`.

        The first piece goes out at once (time to first token is untouched); after that at most
        one piece per `stream_interval_s`, holding what comes meanwhile, and the last one as soon
        as the job ends. Every piece that goes out costs the app a Gradio update, a message and a
        client wake-up, whatever its length; at 20 updates a second a reader sees the same stream
        and a server with eight users streaming spends its CPU on the model instead. A consumer
        that falls behind gets longer pieces too, never a backlog of tokens."""
        interval = self.limits.stream_interval_s
        pending: tuple[str, Any] | None = None
        sent: float | None = None
        while True:
            kind, value = pending or self._next_event(job, deadline)
            pending = None
            if kind == "piece":
                hold = sent + interval if sent is not None else 0.0
                while pending is None:
                    wait = min(hold, deadline) - time.perf_counter()
                    try:
                        more = job.events.get(timeout=wait) if wait > 0 else job.events.get_nowait()
                    except queue.Empty:
                        break
                    if more[0] == "piece":
                        value += more[1]
                    else:
                        pending = more
                sent = time.perf_counter()
                yield value
            elif kind == "error":
                _raise_for_user(value)
            else:
                return

    def _next_event(self, job: Job, deadline: float) -> tuple[str, Any]:
        try:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise queue.Empty
            return job.events.get(timeout=left)
        except queue.Empty:
            job.cancel.set()
            raise ServiceError(f"the answer took longer than {self.limits.timeout_s:g} s and was "
                               "stopped; the model is busy, try again in a moment") from None

    @contextmanager
    def _admission(self, request: GenerationRequest) -> Iterator[None]:
        """The global bound on waiting requests and the per-user cap; ServiceError when over."""
        lim = self.limits
        with self._registry_lock:
            if self._in_service >= lim.max_batch + lim.max_waiting:
                raise ServiceError(f"the model is busy ({self._in_service - lim.max_batch} requests are "
                                   "waiting); try again in a moment")
            if request.user is not None and self._admitted[request.user] >= lim.per_user:
                raise ServiceError(f"you already have {lim.per_user} request{'s' * (lim.per_user != 1)} "
                                   "waiting or running; wait for one to finish or stop it")
            self._in_service += 1
            if request.user is not None:
                self._admitted[request.user] += 1
        try:
            yield
        finally:
            with self._registry_lock:
                self._in_service -= 1
                if request.user is not None:
                    self._admitted[request.user] -= 1
                    if not self._admitted[request.user]:
                        del self._admitted[request.user]

    def check(self, request: GenerationRequest) -> None:
        """Raise ServiceError now if the request cannot run (too long, too many images), so the
        user hears it before waiting in the queue. Tokenises only; the model does not run."""
        images = self._model_images(request.conversation, request.images)
        try:   # the processed images are kept: the request that follows does not process them again
            self.processor.encode(request.conversation, self.engine.process_images(images)[0],
                                  add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - mapped to a message, or raised as it is
            _raise_for_user(e)

    def generate(self, request: GenerationRequest) -> str:
        """The whole answer (what was generated before a cancel, if cancelled)."""
        for _ in self.stream(request):
            pass
        return request.text

    @contextmanager
    def _registered(self, request: GenerationRequest) -> Iterator[Signal]:
        event = Signal()                      # set() also reaches an engine process at once
        with self._registry_lock:
            if request.id in self._running:
                raise ServiceError("this request is already running")
            if request.id in self._early:
                del self._early[request.id]
                request.cancelled = True
            self._running[request.id] = (request, event)
        try:
            yield event
        finally:
            with self._registry_lock:
                self._running.pop(request.id, None)

    def _model_images(self, conversation: Conversation, images: Sequence[Any]) -> list[Any] | None:
        """The one place that shapes images for the model core: one per image part of the
        conversation, in order (the first sits after BOS, later ones at their own turns)."""
        n = len(images)
        if n != len(conversation.image_refs):
            raise ServiceError(f"the conversation has {len(conversation.image_refs)} image parts "
                               f"but {n} images were given")
        if n > self.info.max_images:
            raise TooManyImages(
                f"this model takes {self.info.max_images} image{'s' if self.info.max_images > 1 else ''} "
                f"per conversation; start a new chat to ask about another image")
        return list(images) if images else None


def _raise_for_user(e: BaseException) -> None:
    err = _service_error(e)
    if err is e:
        raise e
    raise err from e


def _service_error(e: BaseException) -> BaseException:
    """Model-side failures as one line for the user (the service keeps serving); anything that
    is not a model failure comes back unchanged, to be raised as it is."""
    if isinstance(e, ServiceError):
        return e
    if isinstance(e, PromptTooLongError):
        return ServiceError(f"the conversation is too long for this model ({e}); "
                            "clear the chat or shorten the prompt")
    if isinstance(e, (ImageError, SchemaError)):
        return ServiceError(str(e))
    if isinstance(e, torch.OutOfMemoryError):
        return ServiceError("the model ran out of memory; try a smaller image, fewer new tokens "
                            "or a shorter conversation")
    if isinstance(e, ValueError):   # e.g. too many images for the model core
        return ServiceError(str(e))
    if isinstance(e, RuntimeError):
        return ServiceError(f"the model failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return e


def _info(spec: str, version: str, processor: SphinxProcessor, *, card_url: str | None,
          card_path: Path | None, random: bool) -> ModelInfo:
    cfg = processor.config
    return ModelInfo(model_id=spec, version=version, name=cfg.name, card_url=card_url,
                     card_path=card_path, random_weights=random,
                     max_images=processor.max_images, anchor=cfg.anchor,
                     max_length=cfg.max_length)


_SAMPLES, _SAMPLE_BYTES = 16, 64 * 1024   # chunks of each weight file read for the version


def _folder_version(folder: Path, is_hub: bool) -> str:
    """The hub commit of a snapshot; else a hash of the config and of each weight file's name,
    size and 16 evenly spaced 64 KiB chunks. The chunks tell two trainings of one architecture
    apart (same config, same file sizes: a retrained demo model) without reading gigabytes."""
    if is_hub and folder.parent.name == "snapshots":
        return folder.name[:12]
    h = hashlib.sha256((folder / CONFIG_FILE).read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for k in range(_SAMPLES):
                fh.seek(max(0, (size - _SAMPLE_BYTES) * k // (_SAMPLES - 1)))
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:12]
