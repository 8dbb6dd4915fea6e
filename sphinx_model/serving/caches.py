"""The serving caches: visual tokens per image, and KV caches of known conversation prefixes.

Both are least-recently-used maps bounded by the bytes of the tensors they hold (an entry
larger than the whole bound is not kept). The engine (batcher.py) owns them and is their only
user, from its one scheduler thread; they take no locks.

Image key = sha256 of the image's content as given (PIL pixels or file bytes, `source_key`)
and of the model's vision config and pixel cap, so a change of preprocessing, tiling or
experts never reuses stale tokens; the processed canvas is kept under the same key, so a
follow-up turn does not even re-run the preprocessing. (An image given as a stream is keyed
by its processed canvas instead.) Prefix entries are keyed by what decides the KV of a position: the token id, or for
an image placeholder the image's key and the placeholder's offset in it. A new prompt reuses
the longest common prefix with any entry (`DynamicCache.crop` takes off the rest), so a
re-tokenised answer that differs from the generated ids in its last tokens still reuses all
that agrees.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from PIL import Image
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..config import SphinxConfig
from ..image_processing import KeyedImage
from ..processor import IMAGE_TOKEN_ID, ProcessedImage

V = TypeVar("V")
PositionKey = Hashable          # a token id (int), or (image key, offset) for an image placeholder


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LRUBytes(Generic[V]):
    """key -> value, at most `max_bytes` in all; the least recently used go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> V | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> bool:
        """Keep `value` (False when it alone is over the bound); evicts the oldest to make room."""
        self.pop(key)
        if nbytes > self.max_bytes:
            return False
        while self._items and self.nbytes + nbytes > self.max_bytes:
            self.pop(next(iter(self._items)))
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        return True

    def touch(self, key: Hashable) -> None:
        if key in self._items:
            self._items.move_to_end(key)

    def pop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item[1]

    def items(self) -> list[tuple[Hashable, V]]:
        return [(k, v) for k, (v, _) in self._items.items()]


# --- images ---------------------------------------------------------------------------------
def vision_fingerprint(config: SphinxConfig) -> str:
    """What decides an image's visual tokens besides its pixels."""
    fields = ("canvas_size", "grid", "anchor", "skip_tokens", "tokens_per_view", "experts", "projector")
    d = config.to_dict()
    return hashlib.sha256(json.dumps({k: d.get(k) for k in fields}, sort_keys=True, default=str).encode()).hexdigest()


def image_key(image: ProcessedImage, fingerprint: str) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(str(image.skipped).encode())
    h.update(str(tuple(image.pixels.shape)).encode())
    h.update(image.pixels.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def source_key(image: Any) -> str | None:
    """A content hash of an image as given (PIL pixels, file bytes, raw bytes, or the digest a
    KeyedImage carries), or None for what cannot be hashed without consuming it (a stream).
    Equal content, equal processing."""
    h = hashlib.sha256()
    if isinstance(image, KeyedImage):
        h.update(b"sha256:" + image.content_sha256.encode())   # its owner hashed the content already
    elif isinstance(image, Image.Image):
        h.update(f"pil:{image.mode}:{image.size}:".encode())
        h.update(image.tobytes())
    elif isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                h.update(b"file:" + f.read())
        except OSError:
            return None          # the processor says what is wrong with it
    elif isinstance(image, (bytes, bytearray)):
        h.update(b"bytes:" + bytes(image))
    else:
        return None
    return h.hexdigest()


class ImageCache(LRUBytes[torch.Tensor]):
    """image key -> its visual token sequence (K, d): start/view/end and skip tokens, projected."""

    def put_tokens(self, key: str, tokens: torch.Tensor) -> bool:
        return self.put(key, tokens, tensor_bytes(tokens))


# --- prefixes ---------------------------------------------------------------------------------
def position_keys(ids: Sequence[int], images: Sequence[str], counts: Sequence[int]) -> tuple[PositionKey, ...]:
    """One key per prompt position: the token id, or (image key, offset) for a placeholder.
    `images` / `counts`: key and placeholder count of each image, in sequence order."""
    owners = [(key, k) for key, n in zip(images, counts) for k in range(n)]
    placeholders = sum(1 for t in ids if t == IMAGE_TOKEN_ID)
    if placeholders != len(owners):
        raise ValueError(f"{placeholders} image placeholders but {len(owners)} visual tokens")
    it = iter(owners)
    return tuple(next(it) if t == IMAGE_TOKEN_ID else int(t) for t in ids)


def common_prefix(a: Sequence[PositionKey], b: Sequence[PositionKey]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cacheable(cache: Any) -> bool:
    """Only full-attention DynamicLayers can be cut, padded and joined position by position."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_from(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding these (keys, values) per layer, (B, heads, L, head_dim) each."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@dataclass
class PrefixEntry:
    keys: tuple[PositionKey, ...]          # the positions whose KV is held
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer, (1, heads, len(keys), head_dim)


class PrefixCache(LRUBytes[PrefixEntry]):
    """KV of prompts (and the answers that followed) seen before, for the next turn to reuse."""

    def store(self, keys: tuple[PositionKey, ...], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Keep the KV of `keys` (False when it alone is over the bound or a longer entry holds it);
        entries it extends go (the next turn supersedes the last)."""
        nbytes = tensor_bytes(*(t for pair in kv for t in pair))
        if not keys or nbytes > self.max_bytes:
            return False
        covered = []
        for old_key, entry in self.items():
            if len(entry.keys) >= len(keys) and entry.keys[:len(keys)] == keys:
                self.touch(old_key)        # already held by a longer entry: refresh it
                return False
            if keys[:len(entry.keys)] == entry.keys:
                covered.append(old_key)
        for old_key in covered:
            self.pop(old_key)
        kv = [(k.detach().clone(), v.detach().clone()) for k, v in kv]
        return self.put(keys, PrefixEntry(keys, kv), nbytes)

    def match(self, keys: Sequence[PositionKey], most: int) -> int:
        """How many leading positions of `keys` (at most `most`) the best entry holds; no copy."""
        return max((min(common_prefix(keys, entry.keys), most) for _, entry in self.items()), default=0)

    def longest(self, keys: Sequence[PositionKey], most: int) -> tuple[int, DynamicCache | None]:
        """(n, a new DynamicCache with the KV of keys[:n]) for the entry sharing the longest
        prefix, n <= `most`; (0, None) when nothing is shared."""
        best, best_key, best_entry = 0, None, None
        for key, entry in self.items():
            n = min(common_prefix(keys, entry.keys), most)
            if n > best:
                best, best_key, best_entry = n, key, entry
        if best_entry is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        self.touch(best_key)
        return best, cache_from([(k[:, :, :best], v[:, :, :best]) for k, v in best_entry.kv])
