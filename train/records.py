"""Training records on disk: lazy JSONL indexes, skip reasons, the held-out split.

Millions of samples never sit in memory: each JSONL file is indexed once into numpy arrays
(byte offset, byte size, estimated length, status: 13 bytes a record), cached on disk, and a
record is read with `os.pread` only when a batch needs it. Indexing never decodes pixels:
image headers give the exact visual-token count.

A record is untrusted data. Whatever is wrong with it (not JSON, wrong JSON types, absurd
nesting, an empty dialogue, a missing or unreadable image) becomes a `Skip` with one of
`REASONS`; `parse_record` is the one place a line becomes a `Conversation`, so indexing and
rendering (`train.data`) agree on what is unusable.

Imports flow one way: `train.data` (samples, batches) -> this module -> `train.mixture`
(the datasets a mixture names).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sphinx_model.conversation import Conversation, SchemaError
from sphinx_model.processor import IMAGE_TOKEN_ID, SphinxProcessor
from sphinx_model.templates import tokenize_segments
from sphinx_model.tiling import visual_token_count

from .mixture import DataError, DatasetSpec


# New reasons go last: a cached index stores 1 + the index of its reason.
REASONS: tuple[str, ...] = ("schema", "empty_dialogue", "missing_image", "unreadable_image", "too_long",
                            "uncached_image")  # the last: not in the run's feature cache (train/feature_files.py)
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


_PARSE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, RecursionError)  # SchemaError is a ValueError
MAX_DEPTH = 64  # JSON nesting a record may have; the schema needs 5, Python's parser gives up near 1,000


def parse_record(line: bytes | str) -> Conversation:
    """One JSONL line -> a Conversation, or Skip("schema") whatever is wrong with it.

    The line is untrusted: invalid UTF-8 or JSON, absurd nesting, wrong JSON types anywhere
    (a list where the schema wants an object, a number for a role, metadata that is not an
    object) all mean the same thing to training: this record is skipped and counted.
    """
    try:
        raw = json.loads(line)
        if _depth(raw) > MAX_DEPTH:
            raise SchemaError(f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(raw, dict):
            raise SchemaError(f"a record is a JSON object, got {type(raw).__name__}")
        for key, kind in (("meta", dict), ("task", str), ("id", (str, int))):
            if raw.get(key) is not None and not isinstance(raw[key], kind):
                raise SchemaError(f"'{key}' has the wrong JSON type ({type(raw[key]).__name__})")
        conv = Conversation.from_dict(raw)
        for m in conv.messages:
            m.text.encode("utf-8")  # lone surrogates (a "\\ud800" escape) cannot be tokenised
        return conv
    except _PARSE_ERRORS as e:  # from_dict's own checks raise SchemaError; a wrong type deep inside, others
        raise Skip("schema", f"{type(e).__name__}: {str(e)[:200]}") from None


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (so hostile input cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


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
        conv = parse_record(line)
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
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    index = build_index(spec, processor, scan_images)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, offsets=index.offsets, sizes=index.sizes, lengths=index.lengths, status=index.status)
        os.replace(tmp, cache)  # atomic: a reader never sees half a file
    return index


def _read_cache(path: Path) -> SourceIndex | None:
    """A cached index, or None when it is missing or damaged (then it is rebuilt). Never unpickles."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            index = SourceIndex(z["offsets"], z["sizes"], z["lengths"], z["status"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    n = len(index.offsets)
    if not all(len(a) == n for a in (index.sizes, index.lengths, index.status)):
        return None
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




# --- the held-out split ------------------------------------------------------------------------
@dataclass
class Split:
    train: list[np.ndarray]  # per dataset: global ids of usable training records
    eval: np.ndarray         # global ids held out for the eval loss

    @property
    def train_pool(self) -> np.ndarray:
        return np.concatenate(self.train) if self.train else np.zeros(0, np.int64)


def split(store: RecordStore, eval_per_dataset: int, seed: int) -> Split:
    """Usable records per dataset, minus a seeded held-out set of `eval_per_dataset` each."""
    train, held = [], []
    for d in range(len(store.specs)):
        ids = store.dataset_ids(d)
        ids = ids[store.status[ids] == OK]
        k = min(eval_per_dataset, len(ids) // 2)  # never hold out more than half a dataset
        if k:
            rng = np.random.default_rng([seed, d, 7])
            chosen = np.zeros(len(ids), dtype=bool)
            chosen[rng.choice(len(ids), size=k, replace=False)] = True
            held.append(ids[chosen])
            ids = ids[~chosen]
        train.append(ids)
    if not any(len(t) for t in train):
        raise DataError(f"no usable training samples in the mixture ({describe_skips(store.bad_counts())})")
    return Split(train, np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64))


def describe_skips(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(counts.items())) or "no records"
