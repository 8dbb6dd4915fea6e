"""THE model service: the only place in the app that touches the model.

Load once; then requests in, text out: `stream(request)` yields the answer piece by piece,
`generate(request)` returns it whole, `cancel(request_id)` stops a request wherever it is
(waiting, prefilling or decoding: the decoding thread ends and what was generated so far
stays with the request). Handlers build a `GenerationRequest` and never see tensors, so
the serving work (batching concurrent requests, caching images and prefixes) can happen
behind this interface without touching them.

Images travel as a list per request, one per image part of the conversation, in order (a
new image may come at any turn; text-only turns keep the earlier ones); `_model_images` is
the one place that turns that list into what the model core takes.
"""
from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sphinx_model.checkpoint import CheckpointError, from_pretrained, load_model, resolve_checkpoint
from sphinx_model.config import CONFIG_FILE, get_preset, list_presets
from sphinx_model.conversation import Conversation, SchemaError
from sphinx_model.generation import GenerationSettings, Generator
from sphinx_model.image_processing import ImageError
from sphinx_model.processor import PromptTooLongError, SphinxProcessor
from sphinx_model.tiling import Canvas

from .zerogpu import gpu

HUB_URL = "https://huggingface.co/"
BUSY_TIMEOUT_S = 600.0   # a request waits at most this long for the model (the queue sits in front)
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


@dataclass
class GenerationRequest:
    """One answer to produce. Timing fields are filled in by the service as it runs."""

    conversation: Conversation
    images: Sequence[Any] = ()            # one per image part, in order (paths / PIL images)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float | None = None       # time.perf_counter() when the model began
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
    """Load once, then stream / generate / cancel requests; one request on the model at a time."""

    def __init__(self, model: Any, processor: SphinxProcessor, info: ModelInfo):
        self.generator = Generator(model, processor)
        self.processor = processor
        self.info = info
        self._lock = threading.Lock()        # the one accelerator: one request decodes at a time
        self._running: dict[str, tuple[GenerationRequest, threading.Event]] = {}
        self._early: OrderedDict[str, None] = OrderedDict()
        self._registry_lock = threading.Lock()

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, device: str | None = None, dtype: str | None = None,
             seed: int = 0, quantize: str | None = None) -> "ModelService":
        """A checkpoint folder, a hub repo id or a preset name; ServiceError if it cannot load."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            if spec in list_presets() and not Path(spec).exists():
                torch.manual_seed(seed)  # a random-init preset is the same noise on every start
                model, processor = load_model(spec, device=device, dtype=dtype, quantize=quantize)
                config = get_preset(spec)
                random = config.llm.name_or_path is None
                version = f"random-init seed {seed}" if random else "preset"
                info = _info(spec, version, processor, card_url=None, card_path=None, random=random)
            else:
                folder = resolve_checkpoint(spec)
                model, processor = from_pretrained(folder, device=device, dtype=dtype, quantize=quantize)
                is_hub = not Path(spec).exists() and not spec.startswith("released:")
                card = folder / "README.md"
                info = _info(spec, _folder_version(folder, is_hub), processor,
                             card_url=HUB_URL + spec if is_hub else None,
                             card_path=card if card.is_file() else None, random=False)
        except (CheckpointError, KeyError, ValueError, OSError) as e:
            raise ServiceError(f"cannot load model {spec!r}: {e}") from e
        return cls(model, processor, info)

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
            if not self._lock.acquire(timeout=BUSY_TIMEOUT_S):
                raise ServiceError("the model is busy; try again in a moment")
            try:
                request.started_at = time.perf_counter()
                with closing(_run_stream(self.generator, request.conversation, images,
                                         request.settings, event)) as pieces:
                    for piece in _translate_errors(pieces):
                        if request.first_piece_at is None:
                            request.first_piece_at = time.perf_counter()
                        request.text += piece
                        yield piece
            except GeneratorExit:   # the consumer went away (a client cancelled): that is a stop too
                request.cancelled = True
                raise
            finally:
                request.finished_at = time.perf_counter()
                self._lock.release()

    def check(self, request: GenerationRequest) -> None:
        """Raise ServiceError now if the request cannot run (too long, too many images), so the
        user hears it before waiting in the queue. Tokenises only; the model does not run."""
        images = self._model_images(request.conversation, request.images)
        try:
            self.processor.encode(request.conversation, images, add_generation_prompt=True)
        except PromptTooLongError as e:
            raise ServiceError(f"the conversation is too long for this model ({e}); "
                               "clear the chat or shorten the prompt") from e
        except (ImageError, SchemaError, ValueError) as e:
            raise ServiceError(str(e)) from e

    def generate(self, request: GenerationRequest) -> str:
        """The whole answer (what was generated before a cancel, if cancelled)."""
        for _ in self.stream(request):
            pass
        return request.text

    @contextmanager
    def _registered(self, request: GenerationRequest) -> Iterator[threading.Event]:
        event = threading.Event()
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


@gpu
def _run_stream(generator: Generator, conversation: Conversation, images: Any,
                settings: GenerationSettings, cancel: threading.Event) -> Iterator[str]:
    yield from generator.stream(conversation, images, settings, cancel=cancel)


def _translate_errors(pieces: Iterator[str]) -> Iterator[str]:
    """Model-side failures as one line for the user; the service keeps serving."""
    try:
        yield from pieces
    except PromptTooLongError as e:
        raise ServiceError(f"the conversation is too long for this model ({e}); "
                           "clear the chat or shorten the prompt") from e
    except (ImageError, SchemaError) as e:
        raise ServiceError(str(e)) from e
    except torch.OutOfMemoryError as e:
        raise ServiceError("the model ran out of memory; try a smaller image, fewer new tokens "
                           "or a shorter conversation") from e
    except ValueError as e:   # e.g. too many images for the model core
        raise ServiceError(str(e)) from e
    except RuntimeError as e:
        raise ServiceError(f"the model failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _info(spec: str, version: str, processor: SphinxProcessor, *, card_url: str | None,
          card_path: Path | None, random: bool) -> ModelInfo:
    cfg = processor.config
    return ModelInfo(model_id=spec, version=version, name=cfg.name, card_url=card_url,
                     card_path=card_path, random_weights=random,
                     max_images=processor.max_images, anchor=cfg.anchor,
                     max_length=cfg.max_length)


def _folder_version(folder: Path, is_hub: bool) -> str:
    """The hub commit of a snapshot; else a hash of the config and the weight files' sizes."""
    if is_hub and folder.parent.name == "snapshots":
        return folder.name[:12]
    h = hashlib.sha256((folder / CONFIG_FILE).read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]
