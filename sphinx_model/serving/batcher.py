"""Continuous (iteration-level) batching of concurrent requests, with image and prefix caches.

One scheduler thread owns the model. Requests wait in a queue; each iteration of the thread

    admit   while fewer than `max_batch` rows decode: take a waiting job, reuse the KV of the
            longest known prefix of its prompt (the prefix cache, or a row decoding now that
            holds more of it), get its images' visual tokens (image cache, else the experts +
            projector), prefill only the rest (alone: batch 1, no padding), pick its first
            token, join the batch. A prompt known but for its last position (asked again,
            regenerated) skips the prefill: it joins at once and that position runs as its
            row of the next step, which picks its first token;
    step    one LLM forward for every row of the batch (each row's last token, its own
            position, the batch's padding mask), one token per row, picked with the row's
            own settings (greedy, or sampled from the row's own seeded torch.Generator);
    leave   rows that hit EOS, a stop string, their token budget or a cancel leave the batch
            (`DynamicCache.batch_select_indices`); their KV goes to the prefix cache.

so a request that arrives while others decode starts at the next step instead of waiting for
the batch to finish, and each request streams its own text (stop strings held back as in
`Generator.stream`).

Why not transformers' own continuous batching (`ContinuousBatchingManager`, `generate_batch`,
the paged cache; transformers 5.24): a request there is a list of token ids
(`add_request(input_ids: list[int], ...)`), its model runner calls `model(**batch_data)` with
`input_ids` it builds from those lists, and its prefix sharing hashes token ids. Our prompts
are `inputs_embeds` (visual tokens scattered into the text embeddings) and every image
placeholder is the same id, so neither the images nor which image it is can reach the model
through it. What this module uses from transformers instead: the LLM's forward with explicit
`attention_mask` / `position_ids` / cache, `DynamicCache` (its layers, `batch_select_indices`
to drop rows, `crop`-style slicing for prefixes) and its logits processors for sampling. What
it adds is what DynamicCache lacks: left-padding a new row's cache (or the batch's) to a
common length and joining them on the batch dimension, and trimming columns no row uses.

`GenerationSettings.use_cache` is not consulted: rows always decode with their KV cache (greedy
answers are the same either way). Both caches live on the model's device, bounded in bytes.

A backbone whose cache is not plain full-attention `DynamicLayer`s (sliding windows, linear
attention) runs one request at a time and without prefix reuse: cut or padded, its cache
would not mean the same positions.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..positions import position_shift
from ..processor import IMAGE_TOKEN_ID, ProcessedImage
from .batch_cache import RoomyLayer, pad_left
from .caches import ImageCache, PrefixCache, cache_from, cacheable, common_prefix
from .generation import Generator
from .jobs import EngineConfig, Job, JobMaker


@contextlib.contextmanager
def _timed(stats: collections.Counter, name: str) -> Iterator[None]:
    """Add the block's wall time to `stats[name]`, in microseconds (the engine's time split)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stats[name] += int((time.perf_counter() - t0) * 1e6)


class ContinuousBatcher(JobMaker):
    """`prepare` (any thread: tokenise, check) -> `submit` -> read the job's events (`read`)."""

    def __init__(self, generator: Generator, config: EngineConfig = EngineConfig(),
                 wrap: Callable[[Callable], Callable] | None = None):
        super().__init__(generator.processor, generator.context_length, config)
        self.generator, self.model, self.llm = generator, generator.model, generator.model.llm
        self.images = ImageCache(config.image_cache_bytes)        # key -> visual tokens (scheduler thread)
        self.prefixes = PrefixCache(config.prefix_cache_bytes)
        self.stats: collections.Counter = collections.Counter()
        self._wrap = wrap or (lambda fn: fn)     # e.g. ZeroGPU's spaces.GPU around a burst of work
        params = inspect.signature(self.llm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self._batchable: bool | None = None      # decided by the first prefill's cache
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._rows: list[Job] = []               # the batch; only the scheduler thread touches it
        self._cache: DynamicCache | None = None  # (rows, heads, width, head_dim) per layer
        self._mask: torch.Tensor | None = None   # (rows, width), 0 = left padding

    # --- the callers' side ----------------------------------------------------------------
    def submit(self, *jobs: Job) -> None:
        """Queue jobs (together: they are admitted in this order at the same iteration)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the serving engine is closed")
            self._waiting.extend(jobs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sphinx-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing decodes (a finished row has left the batch)."""
        return not self._waiting and not self._rows

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler thread; jobs not finished get an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._rows and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for job in [*self._waiting, *self._rows]:
                        job.fail(RuntimeError("the serving engine is closed"))
                    self._waiting.clear()
                    return
            with _timed(self.stats, "us_busy"):
                self._wrap(self._burst)()

    def _burst(self) -> None:
        """Admit and step until nothing is waiting or decoding."""
        with torch.inference_mode():
            while not self._closed:
                self._drop_cancelled_waiting()
                self._admit()
                if self._rows:
                    self._step()
                elif not self._waiting:
                    return

    def _drop_cancelled_waiting(self) -> None:
        with self._cond:
            for job in [j for j in self._waiting if j.cancel.is_set()]:
                self._waiting.remove(job)
                job.finish("cancelled")

    def _max_rows(self) -> int:
        return self.config.max_batch if self._batchable is not False else 1

    def _admit(self) -> None:
        while len(self._rows) < self._max_rows():
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.cancel.is_set():
                job.finish("cancelled")
                continue
            try:
                job.arm(self.model.device)
                with _timed(self.stats, "us_prefill"):
                    reused, cache = self._reuse(job)
                    if reused == len(job.ids) - 1 and job.ids[-1] != IMAGE_TOKEN_ID:
                        logits = None           # its last position runs in the next step, with the batch
                        self.stats["prefilled_in_step"] += 1
                    else:
                        cache, logits = self._prefill(job, reused, cache)
                if logits is not None:
                    self._accept(job, self._pick(job, logits))
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                job.fail(e)
                continue
            with _timed(self.stats, "us_join"):
                if job.done:
                    self._remember(job, cache, 0)
                else:
                    self._join(job, cache)

    def _forward(self, cache: DynamicCache, **inputs: Any) -> torch.Tensor:
        kw = {self._cache_kw: cache, "use_cache": True, **inputs}
        if self._keep_kw:
            kw["logits_to_keep"] = 1
        return self.llm(**kw).logits[:, -1, :]                         # (B, V)

    def _reuse(self, job: Job) -> tuple[int, DynamicCache | None]:
        """(n, a new cache holding the KV of the prompt's first n positions) from the row
        decoding now or the prefix cache entry that shares the most, n < len(job.ids): at least
        one position is left to run. (0, None) when nothing is shared or reuse is off."""
        most = len(job.ids) - 1
        if not (self._batchable and self.config.prefix_cache_bytes) or most < 1:
            return 0, None
        row, shared = self._in_flight(job.keys, most)
        if shared > self.prefixes.match(job.keys, most):
            self.stats["reused_in_flight"] += shared
            self.stats["reused"] += shared
            return shared, self._row_prefix(row, shared)
        reused, cache = self.prefixes.longest(job.keys, most)
        self.stats["reused"] += reused
        return reused, cache

    def _prefill(self, job: Job, reused: int, cache: DynamicCache | None) -> tuple[DynamicCache, torch.Tensor]:
        """Run the prompt's positions from `reused` on (alone) into `cache`; the last one's logits."""
        device, n = self.model.device, len(job.ids)
        visual = [self._visual(im, key, job.tokens) for im, key in zip(job.images, job.image_keys)]
        ids = torch.tensor([job.ids], device=device)
        embeds = self.model.fill_image_tokens(ids, visual)[:, reused:]    # (1, n - reused, d)
        cache = cache if cache is not None else DynamicCache(config=self.llm.config)
        logits = self._forward(cache, inputs_embeds=embeds,
                               attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                               position_ids=self.model.position_ids(ids)[:, reused:])
        if self._batchable is None:
            self._batchable = cacheable(cache)
        self.stats["prefilled"] += n - reused
        return cache, logits

    def _shift(self, job: Job) -> int:
        """How far the job's rotary positions fall behind its cache indices (0 unless the model
        gives an image's tokens one position); found once per job."""
        if job.position_shift is None:
            job.position_shift = position_shift(job.ids, self.model.config.shared_image_position)
        return job.position_shift

    def _in_flight(self, keys: tuple, most: int) -> tuple[int, int]:
        """(row, n): the batch row whose prompt and answer so far share the longest prefix with
        `keys`, n <= `most` (0 when none does). Two people asking about the same picture at
        once, or a regenerate while the first answer is still written: the second need not
        wait for the first to finish to reuse its prompt's KV."""
        best, best_row = 0, 0
        for r, job in enumerate(self._rows):
            n = min(common_prefix(keys, job.held()), most)
            if n > best:
                best, best_row = n, r
        return best_row, best

    def _row_prefix(self, row: int, n: int) -> DynamicCache:
        """A new cache with the first n positions of a batch row's KV (rows are right-aligned:
        the row's own positions are its last `cached` columns)."""
        start = self._mask.shape[1] - self._rows[row].cached
        return cache_from([(layer.keys[row:row + 1, :, start:start + n].clone(),
                            layer.values[row:row + 1, :, start:start + n].clone()) for layer in self._cache.layers])

    def _visual(self, image: ProcessedImage, key: str, job_tokens: dict[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """The image's visual tokens (K, d): the job's own (found before it waited), the cache's,
        else encoded once and kept."""
        tokens = job_tokens.get(key) if job_tokens else None
        if tokens is None and self.config.image_cache_bytes:
            tokens = self.images.get(key)
        if tokens is None:
            skip = torch.tensor([image.skipped], dtype=torch.bool)
            tokens = self.model.image_embeddings(image.pixels[None].to(self.model.device), skip)[0]
            self.stats["images_encoded"] += 1
            if self.config.image_cache_bytes:
                self.images.put_tokens(key, tokens)
        return tokens

    def _pick(self, job: Job, logits: torch.Tensor) -> int:
        """The next token from (1, V) logits, with the job's own settings."""
        scores = logits.float()
        if job.penalty or job.sampling:
            seen = torch.tensor([job.generated], dtype=torch.long, device=scores.device)   # (1, k)
            scores = job.penalty(seen, scores)
            if job.sampling:
                probs = torch.softmax(job.warpers(seen, scores), dim=-1)
                return int(torch.multinomial(probs, 1, generator=job.rng))
        return int(scores.argmax(dim=-1))

    def _accept(self, job: Job, token: int) -> None:
        """Append a token, stream what became visible, finish the job where it ends."""
        job.generated.append(token)
        self.stats["tokens"] += 1
        text, stopped = self.generator.visible_text(job.generated)
        reason = ("eos" if token == self.tokenizer.eos_token_id else "stop" if stopped
                  else "length" if len(job.generated) >= job.budget else None)
        if reason == "length":
            text = self.generator.visible_text(job.generated, final_piece=True)[0]
        if len(text) > job.emitted:
            job.events.put(("piece", text[job.emitted:]))
            job.emitted = len(text)
        if reason:
            job.finish(reason)

    def _step(self) -> None:
        """One token for every row of the batch."""
        for job in self._rows:
            if job.cancel.is_set():
                job.finish("cancelled")
        self._leave()
        if not self._rows:
            return
        device, rows = self.model.device, self._rows
        # a row that joined with its prompt's last position still to run feeds that position
        last = torch.tensor([[(j.generated or j.ids)[-1]] for j in rows], device=device)     # (B, 1)
        pos = torch.tensor([[j.cached - self._shift(j)] for j in rows], device=device)       # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)       # (B, W + 1)
        try:
            with _timed(self.stats, "us_step"):
                logits = self._forward(self._cache, input_ids=last, attention_mask=self._mask, position_ids=pos)
            greedy = logits.argmax(dim=-1).tolist()           # one call for the rows that need nothing else
            for r, job in enumerate(rows):
                plain = not (job.penalty or job.sampling)
                self._accept(job, greedy[r] if plain else self._pick(job, logits[r:r + 1]))
        except Exception as e:  # noqa: BLE001 - the batch is lost; the engine keeps serving
            for job in rows:
                job.fail(e)
            self._rows, self._cache, self._mask = [], None, None
            return
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        with _timed(self.stats, "us_leave"):
            self._leave()

    # --- the batch's cache ----------------------------------------------------------------
    def _join(self, job: Job, cache: DynamicCache) -> None:
        """Add a prefilled row: left-pad its cache or the batch's to one width, stack on rows."""
        n = cache.get_seq_length()
        device = self.model.device
        if not self._rows:
            self._rows, self._cache = [job], cache
            cache.layers = [RoomyLayer.taking(layer) for layer in cache.layers]
            self._mask = torch.ones(1, n, dtype=torch.long, device=device)
            return
        width = self._mask.shape[1]
        if n < width:
            pad_left(cache, width - n)
        elif n > width:
            pad_left(self._cache, n - width)
            self._mask = F.pad(self._mask, (n - width, 0))
        row = F.pad(torch.ones(1, n, dtype=torch.long, device=device), (max(width - n, 0), 0))
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self._mask = torch.cat([self._mask, row])
        self._rows.append(job)

    def _leave(self) -> None:
        """Drop finished rows (keeping their KV as prefixes) and the columns no row uses."""
        done = [r for r, j in enumerate(self._rows) if j.done]
        if not done:
            return
        for r in done:
            self._remember(self._rows[r], self._cache, r)
        keep = [r for r, j in enumerate(self._rows) if not j.done]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._rows = [self._rows[r] for r in keep]
        first = int(self._mask.any(dim=0).to(torch.int8).argmax())      # leftmost column in use
        if first:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _remember(self, job: Job, cache: DynamicCache, row: int) -> None:
        """Keep a finished row's KV (its prompt and all but its last token) for later turns."""
        if not (self._batchable and self.config.prefix_cache_bytes):
            return
        keys = job.held()
        n = len(keys)                                                    # positions in the cache
        if n < 1:                                                        # (-0: would slice them all)
            return
        kv = [(layer.keys[row:row + 1, :, -n:], layer.values[row:row + 1, :, -n:]) for layer in cache.layers]
        self.prefixes.store(keys, kv)
