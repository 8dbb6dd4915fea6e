"""A request inside the serving engine, and the callers' side that makes one.

    EngineConfig   the batch's width and the caches' byte bounds
    Job            one request: its prompt ids, images, settings, budget, cancel and events
    JobMaker       process images (a canvas cache keyed by content) and tokenise in the
                   caller's thread, check the prompt fits, make the Job; the in-process engine
                   (batcher.py) and the engine process (engine_process.py) are both one
    Signal         a cancel that calls back when set (to reach another process at once)
"""
from __future__ import annotations

import abc
import hashlib
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..conversation import Conversation
from ..processor import ProcessedImage, SphinxProcessor
from .caches import LRUBytes, image_key, position_keys, source_key, tensor_bytes, vision_fingerprint
from .generation import GenerationSettings, token_budget

MIB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8                          # rows decoding together
    image_cache_bytes: int = 256 * MIB          # visual tokens kept, and as much for processed canvases (0: no image cache)
    prefix_cache_bytes: int = 512 * MIB         # prefix KV kept (0: no prefix reuse)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.image_cache_bytes < 0 or self.prefix_cache_bytes < 0:
            raise ValueError("max_batch must be >= 1 and cache sizes >= 0")


class Signal(threading.Event):
    """A threading.Event that also calls back when set: a cancel that has to reach another
    process (`engine_process.EngineProcess`) is sent the moment it is set, not polled."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def on_set(self, callback: Callable[[], None]) -> None:
        """Call `callback` when set (now, if it is set already; at most twice in a race)."""
        self._callbacks.append(callback)
        if self.is_set():
            callback()

    def set(self) -> None:
        super().set()
        for callback in list(self._callbacks):
            callback()


class Job:
    """One request inside the engine. Its `events` queue gets ("piece", text) ..., then one
    ("end", reason) with reason eos / stop / length / cancelled, or one ("error", exception)."""

    def __init__(self, ids: list[int], images: list[ProcessedImage], image_keys: list[str],
                 keys: tuple, settings: GenerationSettings, budget: int, cancel: threading.Event | None,
                 seed: int | None = None):
        self.ids, self.images, self.image_keys, self.keys = ids, images, image_keys, keys  # keys: per position
        self.settings, self.budget = settings, budget
        if seed is None and settings.temperature > 0:   # drawn here, in the caller: it travels with the job
            seed = random.getrandbits(63)
        self.seed = seed                      # of the sampling generator
        self.cancel = cancel or Signal()
        self.events: queue.Queue = queue.Queue()
        self.tokens: dict[str, torch.Tensor] = {}   # visual tokens found for its images before it waits
        self.generated: list[int] = []
        self.emitted = 0
        self.done = False
        self.reason: str | None = None
        self.penalty = LogitsProcessorList()
        self.warpers = LogitsProcessorList()
        self.rng: torch.Generator | None = None
        self.position_shift: int | None = None      # rotary positions behind cache indices (the batcher's)

    @property
    def sampling(self) -> bool:
        return self.settings.temperature > 0

    @property
    def cached(self) -> int:
        """Positions its KV cache holds: the prompt and all but its last token (the next step's
        input, at this position), or all but the prompt's last position before its first step."""
        return len(self.ids) + len(self.generated) - 1

    def held(self) -> tuple:
        """The keys of those positions (prompt keys, then token ids)."""
        return (self.keys + tuple(self.generated))[:self.cached]

    def arm(self, device: torch.device) -> None:
        """Build its logits processors and seeded generator on the engine's device (done where it
        decodes: they need not travel to another process)."""
        s = self.settings
        if s.repetition_penalty != 1.0 and not self.penalty:
            self.penalty.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        if self.sampling and self.rng is None:
            self.warpers.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k > 0:
                self.warpers.append(TopKLogitsWarper(s.top_k))
            if s.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(s.top_p))
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(self.seed)

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done, self.reason = True, reason
            self.events.put(("end", reason))

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done, self.reason = True, "error"
            self.events.put(("error", error))


class JobMaker(abc.ABC):
    """The callers' side of an engine, without the model: process images (a canvas cache keyed
    by content) and tokenise in the caller's thread, check the prompt fits, make the `Job`.
    Both the in-process engine and the engine process (engine_process.py) are one."""

    def __init__(self, processor: SphinxProcessor, context_length: int, config: EngineConfig):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.context_length = context_length
        self.config = config
        self.canvases: LRUBytes[ProcessedImage] = LRUBytes(config.image_cache_bytes)   # key -> processed image
        self._canvas_lock = threading.Lock()                       # `prepare` runs in the callers' threads
        self.fingerprint = vision_fingerprint(processor.config)

    def prepare(self, conversation: Conversation, images: Sequence[Any] | None,
                settings: GenerationSettings, cancel: threading.Event | None = None) -> Job:
        """Tokenise and check in the caller's thread; raises PromptTooLongError / ImageError / ValueError."""
        processed, keys = self.process_images(images)
        enc = self.processor.encode(conversation, processed, add_generation_prompt=True)
        budget = token_budget(self.context_length, len(enc.input_ids), settings)
        counts = [self.processor.num_visual_tokens(im) for im in enc.images]
        return Job(enc.input_ids, enc.images, keys, position_keys(enc.input_ids, keys, counts),
                   settings, budget, cancel, settings.seed)

    @abc.abstractmethod
    def submit(self, *jobs: Job) -> None:
        """Queue jobs for the model (this process's scheduler thread, or the engine process)."""

    def read(self, job: Job, timeout: float | None = None) -> Iterator[str]:
        """The job's pieces; raises its error; queue.Empty if nothing comes for `timeout` s."""
        while True:
            kind, value = job.events.get(timeout=timeout)
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def stream(self, job: Job) -> Iterator[str]:
        """Submit, then the pieces; closing the iterator early cancels the job."""
        self.submit(job)
        try:
            yield from self.read(job)
        finally:
            job.cancel.set()

    def process_images(self, images: Sequence[Any] | None) -> tuple[list[ProcessedImage], list[str]]:
        """Processed images and their cache keys; an image seen before (same content) is not
        processed again."""
        processed, keys = [], []
        for image in images or []:
            source = source_key(image) if self.config.image_cache_bytes else None
            if source is None:
                proc = image if isinstance(image, ProcessedImage) else self.processor.process_image(image)
                processed.append(proc)
                keys.append(image_key(proc, self.fingerprint))
                continue
            key = hashlib.sha256(f"{source}:{self.fingerprint}:{self.processor.config.max_pixels}".encode()).hexdigest()
            with self._canvas_lock:
                proc = self.canvases.get(key)
            if proc is None:
                proc = self.processor.process_image(image)
                with self._canvas_lock:
                    self.canvases.put(key, proc, tensor_bytes(proc.pixels))
            processed.append(proc)
            keys.append(key)
        return processed, keys
