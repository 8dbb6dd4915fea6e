"""The expert-feature cache on disk: its manifest, its shards, its fingerprint, and the reader a run uses.

SPHINX-X's visual experts stay frozen, so what they make of an image never changes during a
run; `python -m train.feature_cache` computes it once per image and a run reads it back
(`data.feature_cache`) instead of decoding the image and running the experts.

    CACHE/manifest.json                format, fingerprint (and its parts), data root, storage dtype,
                                       the finished shards in order, the images the last write could not use
    CACHE/shard-000000.safetensors     per image KEY (its path relative to the data root, '/'-separated):
        features:KEY   (K, T, sum c_e)  the fused experts' tokens of its K kept views, in view order
                                        (`SphinxForCausalLM.expert_features(...)[1]`), in the storage dtype
        view_skip:KEY  (V,) bool        which views are skipped (padding only)
        canvas:KEY     (5,) int64       width, height, side, offset_x, offset_y (`tiling.Canvas`)

The fingerprint covers everything that decides those tensors besides the pixels: the vision
settings of the config (canvas size, grid, anchor, skip tokens, tokens per view, pixel cap, the
experts' kinds, sizes and options) and the experts' weights, hashed byte for byte as float32 values
(`sphinx_model.serving.caches.vision_fingerprint` hashes the config only, not the weights). A run
whose experts differ in either is refused. The storage dtype (bf16 by default) is recorded, not
fingerprinted: it is the cache's rounding, not the experts'.

Tensors go in safetensors and metadata in JSON: nothing here unpickles.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sphinx_model.config import SphinxConfig
from sphinx_model.processor import ProcessedImage
from sphinx_model.tiling import Canvas

from .config import FEATURE_MANIFEST, ConfigError

FORMAT = 1
MANIFEST = FEATURE_MANIFEST
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_NAME = re.compile(r"shard-\d{6}\.safetensors")   # a manifest names files inside its folder only
PARTS = ("features", "view_skip", "canvas")
MAX_MANIFEST_BYTES = 256 << 20


class CacheError(ConfigError):
    """A feature cache that cannot be used here (missing, damaged, of other experts); one line."""


@dataclass
class CachedImage(ProcessedImage):
    """A record's image as the cache holds it: the frozen experts' outputs of its kept views
    (`features`, (K, T, sum c_e)) stand in for the pixels, which stay empty."""

    features: torch.Tensor = field(default_factory=lambda: torch.empty(0))


# --- what decides the features -----------------------------------------------------------------
def vision_settings(config: SphinxConfig) -> dict[str, Any]:
    """The config fields that decide an image's expert outputs (besides the weights)."""
    experts = [{k: v for k, v in dataclasses.asdict(e).items() if k != "pretrained"} for e in config.experts]
    return {"canvas_size": config.canvas_size, "grid": config.grid, "anchor": config.anchor,
            "skip_tokens": config.skip_tokens, "tokens_per_view": config.tokens_per_view,
            "max_pixels": config.max_pixels, "experts": experts}


def experts_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every expert tensor (parameters and buffers), by name, shape and float32 bytes."""
    h = hashlib.sha256()
    for key in model.expert_keys:
        for name, t in sorted(getattr(model, key).state_dict().items()):
            data = t.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{key}.{name}:{tuple(data.shape)}:".encode())
            h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(settings: dict[str, Any], weights: str) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, "settings": settings, "weights": weights},
                                     sort_keys=True).encode()).hexdigest()


def cache_key(root: Path, path: Path) -> str | None:
    """An image's key: its path relative to the data root, or None for one outside it."""
    try:
        return path.resolve().relative_to(root).as_posix()
    except (ValueError, OSError, RuntimeError):
        return None


# --- the manifest ---------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of `folder`, checked field by field; CacheError for anything else."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CacheError(f"{folder} is not a feature cache (no {MANIFEST}; "
                         "write one with python -m train.feature_cache)")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError("too large")
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} cannot be read as a feature cache manifest ({e})") from None
    ok = (isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("fingerprint"), str)
          and isinstance(m.get("weights"), str) and isinstance(m.get("settings"), dict)
          and isinstance(m.get("root"), str) and m.get("dtype") in STORE_DTYPES
          and isinstance(m.get("shards"), list) and all(isinstance(s, str) and SHARD_NAME.fullmatch(s)
                                                        for s in m["shards"]))
    if not ok:
        raise CacheError(f"{path} is damaged or of another format (this code reads format {FORMAT})")
    return m


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Atomically: a reader sees the old manifest or the new one, never half of one."""
    tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def index_shards(folder: Path, shards: list[str]) -> dict[str, str]:
    """Image key -> the shard holding it (a later shard wins), from the shards' headers only."""
    index: dict[str, str] = {}
    for name in shards:
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                names = set(f.keys())
        except (OSError, SafetensorError) as e:
            raise CacheError(f"feature cache shard {folder / name} cannot be read ({e})") from None
        for tensor in names:
            part, _, key = tensor.partition(":")
            if part == "features" and all(f"{p}:{key}" in names for p in PARTS):
                index[key] = name
    return index


def mismatch(manifest: dict[str, Any], settings: dict[str, Any], weights: str) -> str | None:
    """Why features written under `manifest` are not those of these experts, or None."""
    theirs = manifest["settings"]
    changed = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
    if changed:
        return f"the vision settings differ ({', '.join(changed)})"
    if manifest["weights"] != weights:
        return "the experts' weights differ"
    if manifest["fingerprint"] != fingerprint(settings, weights):
        return "the fingerprint differs"
    return None


# --- the reader --------------------------------------------------------------------------------
class FeatureCache:
    """Image path -> CachedImage, for a run. Shards are opened lazily, once per process (a forked
    DataLoader worker opens its own)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.root = Path(self.manifest["root"])
        self.index = index_shards(self.folder, self.manifest["shards"])
        self._files: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:   # spawned workers open their own shards
        return {**self.__dict__, "_files": {}}

    def check(self, model: torch.nn.Module) -> None:
        """CacheError unless these features are what `model`'s experts make of the images."""
        why = mismatch(self.manifest, vision_settings(model.config), experts_digest(model))
        if why:
            raise CacheError(f"data.feature_cache {self.folder} was written for other experts: {why}; "
                             f"write a new cache from this model's experts (python -m train.feature_cache)")

    def load(self, path: Path) -> CachedImage | None:
        """The cached image at `path`, or None when the cache does not hold it."""
        key = cache_key(self.root, path)
        shard = self.index.get(key) if key is not None else None
        if shard is None:
            return None
        f = self._file(shard)
        features = f.get_tensor(f"features:{key}")
        skip = f.get_tensor(f"view_skip:{key}")
        canvas = f.get_tensor(f"canvas:{key}")
        if skip.dtype != torch.bool or features.ndim != 3 or features.shape[0] != int((~skip).sum()) \
                or canvas.shape != (5,):
            return None                       # a damaged entry: the record is skipped, the run goes on
        return CachedImage(torch.empty(0), Canvas(*map(int, canvas.tolist())), skip.tolist(), features)

    def _file(self, shard: str) -> Any:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._files[shard]
