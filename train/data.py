"""Training samples and batches: a record rendered by the model's own processor, skips counted.

Images are decoded only in `__getitem__`, by the same `SphinxProcessor.encode(...,
add_generation_prompt=False)` the model uses at inference, so training and serving render
identically. With a feature cache (`data.feature_cache`, train/feature_files.py) an image is not
decoded at all: its experts' outputs are read from the cache and a batch carries them as
`expert_features` instead of `pixel_values`. The records themselves (index, status, split) live in
`train.records`.

A bad record (unparsable, empty dialogue, missing or unreadable image, too long) never stops
a run: it is counted under one of `REASONS` and replaced by the next usable record. The
counts travel with the batches (DataLoader workers cannot share counters), so the trainer can
log them.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sphinx_model.conversation import Conversation, SchemaError
from sphinx_model.image_processing import ImageError
from sphinx_model.processor import IMAGE_TOKEN_ID, Encoded, SphinxProcessor
from sphinx_model.templates import IGNORE_INDEX

from .feature_files import CachedImage, FeatureCache
from .records import OK, REASONS, RecordStore, Skip, image_path, is_empty_dialogue, parse_record


# --- samples ----------------------------------------------------------------------------------
@dataclass
class Item:
    encoded: Encoded | None
    skipped: tuple[str, ...] = ()  # reasons of the records tried before (and instead of) this one
    targets: list | None = None    # what `box_targets` made of it (training-only supervision), if anything


BoxTargetsFn = Callable[[Conversation, Encoded], "list | None"]


class ConversationDataset(torch.utils.data.Dataset):
    """Global id -> rendered sample. A bad record is counted and replaced by the next id in `pool`."""

    def __init__(self, store: RecordStore, processor: SphinxProcessor, max_text_tokens: int | None = None,
                 truncate: bool = False, pool: np.ndarray | None = None, max_fallbacks: int = 8,
                 features: FeatureCache | None = None, box_targets: BoxTargetsFn | None = None):
        self.store = store
        self.features = features
        self.box_targets = box_targets
        self.processor = processor
        self.max_text_tokens = max_text_tokens
        self.truncate = truncate
        self.pool = np.sort(pool) if pool is not None else None
        self.max_fallbacks = max_fallbacks if pool is not None and len(pool) else 0

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, gid: int) -> Item:
        skipped: list[str] = []
        for candidate in self._candidates(int(gid)):
            try:
                conv, enc = self._encode(candidate)
                return Item(enc, tuple(skipped), self.box_targets(conv, enc) if self.box_targets else None)
            except Skip as s:
                skipped.append(s.reason)
        return Item(None, tuple(skipped))

    def _candidates(self, gid: int) -> list[int]:
        if not self.max_fallbacks:
            return [gid]
        n = len(self.pool)
        at = int(np.searchsorted(self.pool, gid))
        first = at + 1 if at < n and self.pool[at] == gid else at  # the pool's records after gid
        following = [int(self.pool[(first + k) % n]) for k in range(self.max_fallbacks)]
        return [gid] + [g for g in following if g != gid]

    def conversation(self, gid: int) -> Conversation:
        return parse_record(self.store.read(gid))

    def encode(self, gid: int) -> Encoded:
        """Render one record exactly as the model sees it; raises Skip."""
        return self._encode(gid)[1]

    def _encode(self, gid: int) -> tuple[Conversation, Encoded]:
        status = int(self.store.status[gid])
        if status != OK:
            raise Skip(REASONS[status - 1])
        conv = self.conversation(gid)
        if is_empty_dialogue(conv):
            raise Skip("empty_dialogue")
        images = [self._image(gid, ref) for ref in conv.image_refs]
        try:
            enc = self.processor.encode(conv, images, add_generation_prompt=False, max_length=1 << 40)
        except (SchemaError, ValueError) as e:
            raise Skip("schema", str(e)) from e
        return conv, self._fit(enc)

    def _image(self, gid: int, ref: str | None):
        if not ref:
            raise Skip("schema", "image part without a reference")
        d, _ = self.store.locate(gid)
        path = image_path(self.store.specs[d].image_root, ref)
        if self.features is not None:   # the cached experts' outputs; the image file is not read
            cached = self.features.load(path)
            if cached is None:
                raise Skip("uncached_image" if path.is_file() else "missing_image", str(path))
            return cached
        if not path.is_file():
            raise Skip("missing_image", str(path))
        try:
            return self.processor.process_image(path)
        except ImageError as e:
            raise Skip("unreadable_image", str(e)) from e

    def _fit(self, enc: Encoded) -> Encoded:
        """Apply the context limit: the model's max_length, and max_text_tokens on top of the image."""
        limit = self.processor.config.max_length
        visual = self.processor.num_visual_tokens(enc.images)
        if self.max_text_tokens is not None:
            limit = min(limit, 1 + visual + self.max_text_tokens)
        if len(enc.input_ids) <= limit:
            return enc
        if not self.truncate or limit <= 1 + visual:
            raise Skip("too_long", f"{len(enc.input_ids)} tokens > {limit}")
        if IMAGE_TOKEN_ID in enc.input_ids[limit:]:  # a later image would lose its tokens
            raise Skip("too_long", f"{len(enc.input_ids)} tokens > {limit}, truncation would cut an image")
        labels = enc.labels[:limit]
        if all(t == IGNORE_INDEX for t in labels):
            raise Skip("too_long", "nothing left to learn after truncation")
        return Encoded(enc.input_ids[:limit], labels, enc.images)


# --- batches ----------------------------------------------------------------------------------
@dataclass
class Batch:
    inputs: dict[str, torch.Tensor] | None  # model inputs, None when every record was bad
    skipped: Counter = field(default_factory=Counter)
    samples: int = 0
    tokens: int = 0   # real (non-pad) tokens
    slots: int = 0    # rows x width: tokens + padding
    targets: list | None = None  # per row, the items' `targets` ([] where one has none); None if no item has any

    @property
    def padding(self) -> float:
        return 1.0 - self.tokens / self.slots if self.slots else 0.0

    def to(self, device: torch.device | str) -> "Batch":
        if self.inputs is not None:
            self.inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return self


class Collator:
    """Items -> one right-padded Batch through the processor's own `collate`."""

    def __init__(self, processor: SphinxProcessor):
        self.processor = processor

    def __call__(self, items: Sequence[Item]) -> Batch:
        skipped = Counter(r for it in items for r in it.skipped)
        encoded = [it.encoded for it in items if it.encoded is not None]
        if not encoded:
            return Batch(None, skipped)
        images = [im for e in encoded for im in e.images]
        if any(isinstance(im, CachedImage) for im in images):
            inputs = self._collate_cached(encoded, images)
        else:
            inputs = self.processor.collate(encoded, padding_side="right")
        rows, width = inputs["input_ids"].shape
        kept = [it for it in items if it.encoded is not None]
        targets = [it.targets or [] for it in kept] if any(it.targets for it in kept) else None
        return Batch(inputs, skipped, len(encoded), int(inputs["attention_mask"].sum()), rows * width, targets)

    def _collate_cached(self, encoded: list[Encoded], images: list) -> dict[str, torch.Tensor]:
        """The processor's text tensors; the images as the experts' outputs of their kept views
        (K, T, sum c_e) and the view mask (N, V), in the order the placeholders take them."""
        if not all(isinstance(im, CachedImage) for im in images):
            raise ValueError("a batch mixes cached expert features with pixels")
        inputs = self.processor.collate([Encoded(e.input_ids, e.labels, []) for e in encoded], padding_side="right")
        inputs["view_skip"] = torch.tensor([im.skipped for im in images], dtype=torch.bool)
        inputs["expert_features"] = torch.cat([im.features for im in images])
        return inputs


def make_loader(dataset: ConversationDataset, batches: Sequence[Sequence[int]], num_workers: int,
                collate: Callable[[Sequence[Item]], Batch],
                generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over a fixed list of batches of global ids (the plan decides the order).

    Pass a `generator` so that starting workers does not draw from the global RNG (resuming
    must leave that stream exactly where the uninterrupted run had it).
    """
    return torch.utils.data.DataLoader(dataset, batch_sampler=[list(map(int, b)) for b in batches],
                                       collate_fn=collate, num_workers=num_workers, generator=generator,
                                       prefetch_factor=4 if num_workers else None)
