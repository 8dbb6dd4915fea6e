"""`python -m train.feature_cache --checkpoint CKPT --data WORLD_DIR --out CACHE`: the frozen experts'
outputs, computed once per image, for runs that train the LLM stage only.

    python -m train.feature_cache --checkpoint runs/demo_experts/init \\
        --data data/world_train --data data/world_train/pairs.jsonl --out data/world_train_features

Each `--data` is a JSONL file of records or a folder holding `data.jsonl` (a world written by
`python -m train.synthetic`, a storage export), as a mixture names them; image references are
relative to its folder. Every distinct image the records reference is processed exactly as the
model's processor does (`SphinxProcessor.process_image`), its kept views go through the experts
once (`expert_features`, no gradients, float32), and the fused experts' tokens are stored with the
view mask (layout and fingerprint: `train/feature_files.py`), in bf16 by default (`--dtype
float32` keeps them exact; bf16 halves the disk and rounds as bf16 autocast would).

A rerun into the same folder computes only the images not cached yet (a killed run loses at most
its unfinished shard); a missing or unreadable image is counted and listed, never a traceback.
Then a run reads the cache with `data.feature_cache: CACHE` (see train/config.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sphinx_model.image_processing import ImageError
from sphinx_model.processor import ProcessedImage

from .feature_files import (FORMAT, MANIFEST, STORE_DTYPES, CacheError, cache_key, experts_digest, fingerprint,
                            index_shards, read_manifest, vision_settings, write_manifest)
from .mixture import DataError, resolve_source
from .records import Skip, image_path, parse_record


@dataclass
class WriteReport:
    images: int = 0                                       # distinct images the records reference
    computed: int = 0                                     # cached by this run
    reused: int = 0                                       # in the cache already
    bad: dict[str, str] = field(default_factory=dict)     # image path -> why it has no features
    unparsable_records: int = 0

    def summary(self) -> str:
        reasons = Counter(why.split(":")[0] for why in self.bad.values())
        bad = f"{len(self.bad)} bad ({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})" \
            if self.bad else "0 bad"
        return (f"{self.images} images: {self.computed} computed, {self.reused} cached before, {bad}; "
                f"{self.unparsable_records} unparsable records")


# --- which images ------------------------------------------------------------------------------
def referenced_images(sources: Sequence[Path]) -> tuple[Path, list[Path], int]:
    """(data root: the common folder of the sources' image roots, every distinct image path the
    records reference in sorted order, the number of records that do not parse)."""
    resolved = [resolve_source(Path(s), None) for s in sources]
    root = Path(os.path.commonpath([str(r.resolve()) for _, r in resolved]))
    paths: set[Path] = set()
    unparsable = 0
    for file, image_root in resolved:
        with open(file, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    conv = parse_record(line)
                except Skip:
                    unparsable += 1
                    continue
                paths.update(image_path(image_root, ref) for ref in conv.image_refs if ref)
    return root, sorted(paths), unparsable


# --- the writer --------------------------------------------------------------------------------
class ShardWriter:
    """Buffers images' tensors and writes them as one shard once `max_bytes` are reached; the
    manifest names a shard only after it is complete on disk."""

    def __init__(self, folder: Path, manifest: dict, max_bytes: int):
        self.folder, self.manifest, self.max_bytes = folder, manifest, max_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.nbytes = 0

    def add(self, key: str, image: ProcessedImage, features: torch.Tensor, dtype: torch.dtype) -> None:
        c = image.canvas
        # its own memory: a view would keep the whole batch's tensor alive until the shard is written
        self.tensors[f"features:{key}"] = features.to("cpu", dtype, copy=True)
        self.tensors[f"view_skip:{key}"] = torch.tensor(image.skipped, dtype=torch.bool)
        self.tensors[f"canvas:{key}"] = torch.tensor([c.width, c.height, c.side, c.offset_x, c.offset_y])
        self.nbytes += features.numel() * dtype.itemsize
        if self.nbytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.tensors:
            return
        shards = self.manifest["shards"]
        number = 1 + max((int(s[6:12]) for s in shards), default=-1)
        name = f"shard-{number:06d}.safetensors"
        tmp = self.folder / f"{name}.tmp"
        save_file(self.tensors, str(tmp), metadata={"format": str(FORMAT)})
        os.replace(tmp, self.folder / name)
        shards.append(name)
        write_manifest(self.folder, self.manifest)
        self.tensors, self.nbytes = {}, 0


def open_manifest(out: Path, fresh: dict) -> tuple[dict, dict[str, str]]:
    """The manifest to extend (and the keys it holds): the folder's own when it holds a cache of
    the same experts, root and dtype; a new one for an empty folder; CacheError otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).exists():
        if any(p.suffix == ".safetensors" for p in out.iterdir()):
            raise CacheError(f"{out} holds shards but no {MANIFEST}; write the cache to an empty folder")
        return fresh, {}
    old = read_manifest(out)
    for what in ("fingerprint", "root", "dtype"):
        if old[what] != fresh[what]:
            raise CacheError(f"{out} holds a cache with another {what} ({str(old[what])[:60]}, this run "
                             f"{str(fresh[what])[:60]}); write to a new folder")
    return old, index_shards(out, old["shards"])


def _load(processor, paths: dict[str, Path], report: WriteReport) -> list[tuple[str, ProcessedImage]]:
    """The images that can be used, as the processor renders them; the others go into the report."""
    loaded = []
    for key, path in paths.items():
        if not path.is_file():
            report.bad[str(path)] = "missing_image"
            continue
        try:
            loaded.append((key, processor.process_image(path)))
        except (ImageError, OSError, ValueError) as e:
            report.bad[str(path)] = f"unreadable_image: {str(e)[:200]}"
    return loaded


def write_cache(model, processor, sources: Sequence[Path], out: Path, dtype: str = "bfloat16",
                batch_size: int = 16, shard_bytes: int = 512 << 20, progress: bool = True) -> WriteReport:
    """Cache the expert features of every image the records of `sources` reference (see module doc)."""
    if any(not e.fused for e in model.experts):
        raise CacheError("the cache holds the fused experts' tokens only; this model has an expert with "
                         "separate tokens (a Q-Former): train it from pixels")
    root, paths, unparsable = referenced_images(sources)
    settings, weights = vision_settings(model.config), experts_digest(model)
    fresh = {"format": FORMAT, "fingerprint": fingerprint(settings, weights), "settings": settings,
             "weights": weights, "root": str(root), "dtype": dtype, "shards": [], "bad": {}}
    manifest, index = open_manifest(out, fresh)
    report = WriteReport(images=len(paths), unparsable_records=unparsable)
    todo: dict[str, Path] = {}                              # key -> image path, in sorted order
    for path in paths:
        key = cache_key(root, path)
        if key is None:
            report.bad[str(path)] = "outside_root"
        elif key in index:
            report.reused += 1
        else:
            todo.setdefault(key, path)
    writer = ShardWriter(out, manifest, shard_bytes)
    keys = list(todo)
    with tqdm(total=len(keys), disable=not progress, desc="images", unit="img") as bar:
        for start in range(0, len(keys), batch_size):
            chunk = {k: todo[k] for k in keys[start:start + batch_size]}
            loaded = _load(processor, chunk, report)
            if loaded:
                _encode(model, loaded, writer, STORE_DTYPES[dtype])
                report.computed += len(loaded)
            bar.update(len(chunk))
    manifest["bad"] = dict(sorted(report.bad.items()))
    writer.flush()
    write_manifest(out, manifest)
    return report


def _encode(model, batch: list[tuple[str, ProcessedImage]], writer: ShardWriter,
            dtype: torch.dtype) -> None:
    """One pass of the experts over a batch of images -> each image's (K_i, T, sum c_e) into the shard."""
    images = [im for _, im in batch]
    pixels = torch.stack([im.pixels for im in images]).to(model.device)             # (N, 3, C, C)
    skip = torch.tensor([im.skipped for im in images], dtype=torch.bool)             # (N, V)
    with torch.no_grad():
        _, fused = model.expert_features(pixels, skip)                              # (K, T, sum c_e)
    for (key, image), features in zip(batch, fused.split([im.num_encoded_views for im in images])):
        writer.add(key, image, features, dtype)


# --- the command -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.feature_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder (ours) whose experts compute the features")
    ap.add_argument("--data", required=True, type=Path, action="append",
                    help="a JSONL file of records or a folder with data.jsonl; repeatable")
    ap.add_argument("--out", required=True, type=Path, help="cache folder (a rerun into it goes on where it stopped)")
    ap.add_argument("--dtype", choices=sorted(STORE_DTYPES), default="bfloat16", help="storage dtype of the features")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=16, help="images per pass of the experts")
    ap.add_argument("--shard-mb", type=int, default=512, help="features per shard file, in MiB")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not 1 <= args.batch_size <= 4096 or not 1 <= args.shard_mb <= 1 << 20:
        print("error: --batch-size must be in 1..4096 and --shard-mb in 1..1048576", file=sys.stderr)
        return 2
    import sphinx_model.released  # noqa: F401  (registers released:NAME with the loader)
    from sphinx_model.loading import CheckpointError, from_pretrained

    try:
        model, processor = from_pretrained(args.checkpoint, device=args.device, dtype="float32")
        report = write_cache(model.eval(), processor, args.data, args.out, args.dtype, args.batch_size,
                             args.shard_mb << 20, progress=not args.no_progress)
    except (CheckpointError, CacheError, DataError, OSError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"{args.out}: {report.summary()}")
    for path, why in list(report.bad.items())[:10]:
        print(f"  no features: {path} ({why})")
    if len(report.bad) > 10:
        print(f"  ... and {len(report.bad) - 10} more (the manifest lists them all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
