"""Generation on top of transformers' `generate`: greedy/sampled, batched, streamed, stoppable.

The encoders run once per request (the image becomes `inputs_embeds`), then the LLM's own
`generate` decodes with its KV cache. Stop strings are checked on the decoded text of the
*generated* tokens only and stripped from what is returned; cancellation comes from a
`threading.Event` that another thread (a UI's stop button) may set.
"""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..conversation import Conversation
from ..modeling import SphinxForCausalLM
from ..processor import PromptTooLongError, SphinxProcessor


MAX_SEED = 2**64 - 1  # torch.manual_seed takes 0 .. 2**64 - 1


@dataclass
class GenerationSettings:
    """How to decode. Checked on construction: right types, finite numbers, sane ranges.

    `max_new_tokens` may exceed the model's context; the Generator caps it to the room the
    prompt leaves, so decoding never runs past the position limit.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.use_cache, bool):
            raise ValueError(f"use_cache must be true or false, got {self.use_cache!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0 and repetition_penalty > 0")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StopOnStrings(StoppingCriteria):
    """Per row: stop once the decoded generated text contains a stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, tuple(stops), prompt_len
        self.window = 8 + max((len(s) for s in stops), default=0)  # tokens to decode per check

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len:]
        tails = self.tokenizer.batch_decode(gen[:, -self.window:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


class StopOnEvent(StoppingCriteria):
    """Stop every row when `event` is set (cancellation from another thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives new token ids from `generate` (skipping the prompt) and hands them to a reader."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            if value.dim() > 1 or value.numel() != 1:  # generate first sends the prompt ids
                return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


# C0 control characters other than tab, newline and carriage return, and DEL: a byte-level model
# can write any byte, but a NUL or an escape in an answer is nothing a reader can see, and no
# store keeps a NUL in text (PostgreSQL refuses it). Dropped per character, so every prefix of
# the streamed text is still a prefix of the final answer.
_CONTROL_CHARS = {c: None for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}


def token_budget(context_length: int, prompt_length: int, settings: GenerationSettings) -> int:
    """`settings.max_new_tokens`, capped to the room the prompt leaves in `context_length`."""
    room = context_length - prompt_length
    if room < 1:
        raise PromptTooLongError(f"the prompt takes {prompt_length} of the model's {context_length} "
                                 "positions and leaves no room for an answer")
    return min(settings.max_new_tokens, room)


class Generator:
    """Text in, text out: `generate` for a batch, `stream` for one conversation."""

    def __init__(self, model: SphinxForCausalLM, processor: SphinxProcessor):
        self.model, self.processor = model.eval(), processor
        self.tokenizer = processor.tokenizer
        self.stops = processor.template.stop_strings

    @property
    def context_length(self) -> int:
        """Positions the model may use: the config's max_length, and the LLM's position limit."""
        limit = self.processor.config.max_length
        positions = getattr(self.model.llm.config, "max_position_embeddings", None)
        return min(limit, positions) if isinstance(positions, int) and positions > 0 else limit

    def new_token_budget(self, prompt_length: int, settings: GenerationSettings) -> int:
        """`settings.max_new_tokens`, capped to the room the prompt leaves in the context."""
        return token_budget(self.context_length, prompt_length, settings)

    def _generate_ids(self, batch: dict[str, torch.Tensor], settings: GenerationSettings,
                      cancel: threading.Event | None, streamer: BaseStreamer | None = None) -> torch.Tensor:
        max_new_tokens = self.new_token_budget(batch["input_ids"].shape[1], settings)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        device = self.model.device
        with torch.inference_mode():
            embeds = self.model.embed_inputs(batch["input_ids"].to(device), batch.get("pixel_values"),
                                             batch.get("view_skip"))
            criteria = StoppingCriteriaList()
            if self.stops:
                criteria.append(StopOnStrings(self.tokenizer, self.stops, prompt_len=0))
            if cancel is not None:
                criteria.append(StopOnEvent(cancel))
            sampling = settings.temperature > 0
            extra = {}
            if self.model.config.shared_image_position:   # else transformers counts them from the mask
                extra["position_ids"] = self.model.position_ids(batch["input_ids"], batch["attention_mask"]).to(device)
            out = self.model.llm.generate(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=sampling,
                temperature=settings.temperature if sampling else None,
                top_p=settings.top_p if sampling else None, top_k=settings.top_k if sampling else None,
                repetition_penalty=settings.repetition_penalty, use_cache=settings.use_cache,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=criteria, streamer=streamer, **extra)
        return out  # (B, new_tokens): transformers returns only new tokens for inputs_embeds

    def _finish(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
        return self.processor.template.clean_output(
            self.tokenizer.decode(ids, skip_special_tokens=True).translate(_CONTROL_CHARS))

    def generate(self, conversations: Sequence[Conversation], images: Sequence[Any] | None = None,
                 settings: GenerationSettings | None = None, cancel: threading.Event | None = None) -> list[str]:
        """Answers for a batch of conversations; `images[i]` is conversation i's None, image,
        or list of images (one per image part, in order)."""
        settings = settings or GenerationSettings()
        batch = self.processor(list(conversations), images, add_generation_prompt=True, padding_side="left")
        out = self._generate_ids(batch, settings, cancel)
        return [self._finish(row) for row in out.tolist()]

    def stream(self, conversation: Conversation, images: Any = None, settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece (one piece per token that completes text).

        `images`: None, one image, or a list of images (one per image part, in order).

        Text that might be the start of a stop string is held back until it is known not to
        be one; the stop string itself is never yielded. Closing the iterator early cancels
        generation.
        """
        settings = settings or GenerationSettings()
        batch = self.processor([conversation], [images], add_generation_prompt=True)
        self.new_token_budget(batch["input_ids"].shape[1], settings)  # a full context fails here, not in the thread
        cancel = cancel or threading.Event()
        streamer = _TokenQueue()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self._generate_ids(batch, settings, cancel, streamer)
            except BaseException as e:  # surfaced in the reader's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        ids: list[int] = []
        emitted = 0
        try:
            while True:
                new = streamer.queue.get()
                if new is None:
                    break
                ids += new
                text, done = self.visible_text(ids)
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
                if done:
                    cancel.set()
                    break
        finally:
            cancel.set()
            thread.join()
        if errors:
            raise errors[0]
        tail = self.visible_text(ids, final_piece=True)[0]
        if len(tail) > emitted:
            yield tail[emitted:]

    def visible_text(self, ids: list[int], final_piece: bool = False) -> tuple[str, bool]:
        """(text safe to show so far, whether a stop was reached)."""
        eos = self.tokenizer.eos_token_id
        done = eos in ids
        if done:
            ids = ids[: ids.index(eos)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).translate(_CONTROL_CHARS).lstrip()
        for stop in self.stops:
            idx = text.find(stop)
            if idx >= 0:
                return text[:idx].rstrip(), True
        if done or final_piece:
            return text.rstrip(), done
        # hold back an incomplete multi-byte character and trailing space (it may end the answer)
        text = text.rstrip("\ufffd").rstrip()
        for stop in self.stops:  # hold back a possible beginning of a stop string
            for k in range(min(len(stop), len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    return text[:-k], False
        return text, False
