"""Training records: lazy JSONL indexes, per-sample rendering, skip accounting, batching.

Millions of samples never sit in memory: each JSONL file is indexed once into numpy arrays
(byte offset, byte size, estimated length, status: 13 bytes a record), cached on disk, and a
record is read with `os.pread` only when a batch needs it. Images are decoded only in
`__getitem__`, by the same `SphinxProcessor.encode(..., add_generation_prompt=False)` the
model uses at inference, so training and serving render identically.

A bad record (unparsable, empty dialogue, missing or unreadable image, too long) never stops
a run: it is counted under one of `REASONS` and replaced by the next usable record. The
counts travel with the batches (DataLoader workers cannot share counters), so the trainer can
log them.
"""
from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sphinx_model.conversation import Conversation, SchemaError
from sphinx_model.image_processing import ImageError
from sphinx_model.processor import IMAGE_TOKEN_ID, Encoded, SphinxProcessor
from sphinx_model.templates import IGNORE_INDEX, tokenize_segments
from sphinx_model.tiling import visual_token_count

from .mixture import DatasetSpec

REASONS: tuple[str, ...] = ("schema", "empty_dialogue", "missing_image", "unreadable_image", "too_long")
OK = 0  # status code; a bad record has status 1 + REASONS.index(reason)
INDEX_VERSION = 1
CALIBRATION_RECORDS = 512  # records tokenised exactly per dataset to fit chars -> tokens


class Skip(Exception):
    """One record cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- the index of one JSONL file --------------------------------------------------------------
@dataclass
class SourceIndex:
    offsets: np.ndarray   # int64, byte offset of each record's line
    sizes: np.ndarray     # int32, byte size of the line
    lengths: np.ndarray   # int32, estimated tokens (BOS + visual + text)
    status: np.ndarray    # uint8, OK or 1 + REASONS index (problems visible without decoding images)

    def __len__(self) -> int:
        return len(self.offsets)

    def bad_counts(self) -> Counter:
        codes = Counter(self.status[self.status != OK].tolist())
        return Counter({REASONS[c - 1]: n for c, n in codes.items()})


def image_path(root: Path, ref: str) -> Path:
    p = Path(ref)
    return p if p.is_absolute() else root / p


def is_empty_dialogue(conv: Conversation) -> bool:
    return not any(m.text.strip() for m in conv.messages if m.role != "system")


def image_size(path: Path) -> tuple[int, int]:
    """Width and height from the header, after EXIF rotation (as `load_image` will apply it)."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


class _Scanner:
    """Classifies records and measures their cost without decoding any pixels."""

    def __init__(self, processor: SphinxProcessor, image_root: Path, scan_images: bool):
        self.processor = processor
        self.root = image_root
        self.scan_images = scan_images
        cfg = processor.config
        self.full_visual = visual_token_count(cfg.tokens_per_view, [False] * cfg.num_views)

    def visual_tokens(self, ref: str) -> int:
        """Exact count from the image header; the no-skip maximum when images are not scanned."""
        if not self.scan_images:
            return self.full_visual
        path = image_path(self.root, ref)
        if not path.is_file():
            raise Skip("missing_image", str(path))
        try:
            w, h = image_size(path)
        except Exception as e:  # noqa: BLE001 - Pillow raises many unrelated types for bad headers
            raise Skip("unreadable_image", f"{path}: {e}") from e
        p = self.processor
        return visual_token_count(p.config.tokens_per_view, p.skipped_views(p.geometry(w, h)))

    def scan(self, line: bytes, exact: bool) -> tuple[int, int, int, int]:
        """-> (visual tokens, text chars, EOS tokens, exact text tokens or -1); raises Skip."""
        try:
            conv = Conversation.from_dict(json.loads(line))
        except (ValueError, SchemaError) as e:  # JSONDecodeError is a ValueError
            raise Skip("schema", str(e)) from e
        if is_empty_dialogue(conv):
            raise Skip("empty_dialogue")
        try:
            segments = self.processor.template.segments(conv, add_generation_prompt=False)
        except (SchemaError, ValueError) as e:
            raise Skip("schema", str(e)) from e
        refs = conv.image_refs
        if len(refs) > self.processor.max_images:
            raise Skip("schema", f"{len(refs)} images, the model takes at most {self.processor.max_images}")
        if not all(refs):
            raise Skip("schema", "image part without a reference")
        visual = sum(self.visual_tokens(ref) for ref in refs)
        chars = sum(len(s.text) for s in segments)
        tokens = -1
        if exact:
            tokens = len(tokenize_segments(segments, self.processor.tokenizer, 0, IMAGE_TOKEN_ID)[0])
        return visual, chars, sum(1 for s in segments if s.eos), tokens


def build_index(spec: DatasetSpec, processor: SphinxProcessor, scan_images: bool) -> SourceIndex:
    """One pass over the file: offsets, statuses, and lengths (chars -> tokens fitted on a sample)."""
    scanner = _Scanner(processor, spec.image_root, scan_images)
    offsets, sizes, status = array("q"), array("i"), array("B")
    visual, chars, eos = array("i"), array("q"), array("i")
    calib_chars = calib_tokens = 0
    pos = 0
    with open(spec.path, "rb") as f:
        for line in f:
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            offsets.append(start)
            sizes.append(len(line))
            exact = len(offsets) <= CALIBRATION_RECORDS
            try:
                v, c, e, t = scanner.scan(line, exact)
            except Skip as s:
                v, c, e, t = 0, 0, 0, -1
                status.append(1 + REASONS.index(s.reason))
            else:
                status.append(OK)
            visual.append(v)
            chars.append(c)
            eos.append(e)
            if t >= 0:
                calib_chars += c
                calib_tokens += t - 1 - e
    ratio = calib_tokens / calib_chars if calib_chars else 1.0
    text = 1 + np.asarray(eos, dtype=np.int64) + np.rint(np.asarray(chars, dtype=np.float64) * ratio).astype(np.int64)
    lengths = np.asarray(visual, dtype=np.int64) + text
    st = np.asarray(status, dtype=np.uint8)
    lengths[st != OK] = 0
    return SourceIndex(np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int32),
                       lengths.astype(np.int32), st)


def _cache_key(spec: DatasetSpec, processor: SphinxProcessor, scan_images: bool) -> str:
    st = spec.path.stat()
    cfg = processor.config
    tok = processor.tokenizer
    key = {"v": INDEX_VERSION, "path": str(spec.path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
           "root": str(spec.image_root.resolve()), "scan": scan_images, "tpv": cfg.tokens_per_view,
           "grid": cfg.grid, "anchor": cfg.anchor, "skip": cfg.skip_tokens, "template": cfg.template,
           "tok": [type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok)]}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_index(spec: DatasetSpec, processor: SphinxProcessor, scan_images: bool,
               cache_dir: Path | None) -> SourceIndex:
    """The cached index if the file (size, mtime) and the rendering settings are unchanged."""
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"{spec.path.stem}-{_cache_key(spec, processor, scan_images)}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                return SourceIndex(z["offsets"], z["sizes"], z["lengths"], z["status"])
    index = build_index(spec, processor, scan_images)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, offsets=index.offsets, sizes=index.sizes, lengths=index.lengths, status=index.status)
        os.replace(tmp, cache)  # atomic: a reader never sees half a file
    return index


# --- all records of a mixture, addressed by a global id ----------------------------------------
class RecordStore:
    """Every record of every dataset; global id = dataset start + line number."""

    def __init__(self, specs: Sequence[DatasetSpec], indexes: Sequence[SourceIndex]):
        self.specs = list(specs)
        self.indexes = list(indexes)
        sizes = [len(i) for i in self.indexes]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.lengths = np.concatenate([i.lengths for i in self.indexes]) if sizes else np.zeros(0, np.int32)
        self.status = np.concatenate([i.status for i in self.indexes]) if sizes else np.zeros(0, np.uint8)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def dataset_ids(self, d: int) -> np.ndarray:
        """Global ids of dataset d."""
        return np.arange(self.starts[d], self.starts[d + 1], dtype=np.int64)

    def locate(self, gid: int) -> tuple[int, int]:
        d = int(np.searchsorted(self.starts, gid, side="right") - 1)
        return d, int(gid - self.starts[d])

    def read(self, gid: int) -> bytes:
        d, i = self.locate(gid)
        idx = self.indexes[d]
        return os.pread(self._fd(d), int(idx.sizes[i]), int(idx.offsets[i]))

    def _fd(self, d: int) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker: never share file descriptors
            self._fds, self._pid = {}, os.getpid()
        if d not in self._fds:
            self._fds[d] = os.open(self.specs[d].path, os.O_RDONLY)
        return self._fds[d]

    def __getstate__(self) -> dict[str, Any]:  # spawned workers reopen their own files
        return {**self.__dict__, "_fds": {}}

    def bad_counts(self) -> Counter:
        total: Counter = Counter()
        for i in self.indexes:
            total.update(i.bad_counts())
        return total


def open_records(specs: Sequence[DatasetSpec], processor: SphinxProcessor, scan_images: bool,
                 cache_dir: Path | None) -> RecordStore:
    return RecordStore(specs, [load_index(s, processor, scan_images, cache_dir) for s in specs])


# --- samples ----------------------------------------------------------------------------------
@dataclass
class Item:
    encoded: Encoded | None
    skipped: tuple[str, ...] = ()  # reasons of the records tried before (and instead of) this one


class ConversationDataset(torch.utils.data.Dataset):
    """Global id -> rendered sample. A bad record is counted and replaced by the next id in `pool`."""

    def __init__(self, store: RecordStore, processor: SphinxProcessor, max_text_tokens: int | None = None,
                 truncate: bool = False, pool: np.ndarray | None = None, max_fallbacks: int = 8):
        self.store = store
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
                return Item(self.encode(candidate), tuple(skipped))
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
        try:
            return Conversation.from_dict(json.loads(self.store.read(gid)))
        except (ValueError, SchemaError) as e:
            raise Skip("schema", str(e)) from e

    def encode(self, gid: int) -> Encoded:
        """Render one record exactly as the model sees it; raises Skip."""
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
        return self._fit(enc)

    def _image(self, gid: int, ref: str | None):
        if not ref:
            raise Skip("schema", "image part without a reference")
        d, _ = self.store.locate(gid)
        path = image_path(self.store.specs[d].image_root, ref)
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
        inputs = self.processor.collate(encoded, padding_side="right")
        rows, width = inputs["input_ids"].shape
        return Batch(inputs, skipped, len(encoded), int(inputs["attention_mask"].sum()), rows * width)


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
