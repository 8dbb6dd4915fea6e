"""A YAML mixture of datasets -> deterministic weighted epochs -> length-grouped batches.

    # mixture.yaml (paths relative to this file)
    samples_per_epoch: 100000        # optional; default: every usable training record once
    datasets:
      - name: llava
        path: data/llava.jsonl       # our schema or LLaVA's
        image_root: data/coco        # optional; default: the file's folder
        task: vqa                    # optional label (logged)
        weight: 2.0                  # share of each epoch, relative to the other weights
      - name: feedback
        path: exports/2026-11-20     # a storage export folder: data.jsonl + images/
      - name: space
        path: hf://datasets/you/sphinx-feedback   # what the app's Hub sync pushed (downloaded once)

Everything here is a pure function of (seed, epoch): the same seed gives the same samples
in the same batches in the same order, on any number of restarts, which is what makes
resuming exact. Torch-free, so the CLI checks a mixture before loading a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import numpy as np

from sphinx_model import feedback_data
from sphinx_model.feedback_data import is_hub_source

from .config import ConfigError, expand_path, read_yaml

_KEYS = {"name", "path", "image_root", "task", "weight"}
EXPORT_DATA_FILE = "data.jsonl"  # the storage export: DIR/data.jsonl + DIR/images/
MAX_SAMPLES_PER_EPOCH = 100_000_000  # ~3 GB of int64 plans; SPHINX-X's whole mixture is ~15M samples


class DataError(RuntimeError):
    """The data as a whole is unusable (missing file, nothing usable); one line, exit status 2."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a mixture, paths already resolved."""

    name: str
    path: Path              # the JSONL file
    image_root: Path        # image references are relative to this folder
    task: str | None = None
    weight: float = 1.0


def hub_source(value: str, image_root: Path | None) -> tuple[Path, Path]:
    """`hf://datasets/owner/name[@revision]` (what the app's Hub sync pushes) -> (its merged
    JSONL, its image root), downloaded once through huggingface_hub's cache."""
    try:
        file, snapshot = feedback_data.resolve(value)
    except feedback_data.HubDataError as e:
        raise DataError(str(e)) from None
    return file, image_root or snapshot


def resolve_source(path: Path, image_root: Path | None) -> tuple[Path, Path]:
    """A JSONL file, or a storage export folder (DIR/data.jsonl + DIR/images/) -> (file, image root)."""
    if path.is_dir():
        data = path / EXPORT_DATA_FILE
        if not data.is_file():
            raise DataError(f"{path} is a folder without {EXPORT_DATA_FILE} (expected a JSONL file or a storage export)")
        return data, image_root or path
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    if not path.is_file():
        raise DataError(f"dataset {path} is not a regular file")
    return path, image_root or path.parent


@dataclass(frozen=True)
class Mixture:
    datasets: tuple[DatasetSpec, ...]
    samples_per_epoch: int | None = None

    @property
    def weights(self) -> np.ndarray:
        return np.array([d.weight for d in self.datasets], dtype=np.float64)


def load_mixture(path: str | Path) -> Mixture:
    """Read and check a mixture YAML; every dataset must exist (DataError / ConfigError otherwise)."""
    path = Path(path)
    raw = read_yaml(path, "mixture")
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise ConfigError(f"mixture {path} needs a non-empty 'datasets' list")
    unknown = set(raw) - {"datasets", "samples_per_epoch"}
    if unknown:
        raise ConfigError(f"mixture {path}: unknown key(s) {sorted(unknown)}")
    base = path.resolve().parent
    specs = [_spec(entry, i, base, path) for i, entry in enumerate(raw["datasets"])]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"mixture {path}: dataset names must be unique, got {names}")
    spe = raw.get("samples_per_epoch")
    if spe is not None and (type(spe) is not int or not 1 <= spe <= MAX_SAMPLES_PER_EPOCH):
        raise ConfigError(f"mixture {path}: samples_per_epoch must be an integer in [1, {MAX_SAMPLES_PER_EPOCH:,}] "
                          "(an epoch's plan is held in memory)")
    return Mixture(tuple(specs), spe)


def _spec(entry: object, i: int, base: Path, where: Path) -> DatasetSpec:
    if not isinstance(entry, dict) or "path" not in entry:
        raise ConfigError(f"mixture {where}: dataset #{i} needs at least a 'path'")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ConfigError(f"mixture {where}: dataset #{i} has unknown key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ConfigError(f"mixture {where}: dataset #{i} weight must be a finite number >= 0")
    for key in ("name", "path", "image_root", "task"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or "\x00" in value or (key == "path" and not value)):
            raise ConfigError(f"mixture {where}: dataset #{i} {key} must be a string, got {value!r:.60}")
    root = entry.get("image_root")
    try:
        if is_hub_source(entry["path"]):   # hf://datasets/owner/name: a feedback export on the Hub
            file, image_root = hub_source(entry["path"], base / expand_path(root) if root else None)
        else:
            file, image_root = resolve_source(base / expand_path(entry["path"]),
                                              base / expand_path(root) if root else None)
    except DataError as e:
        raise DataError(f"mixture {where}: {e}") from None
    return DatasetSpec(name=str(entry.get("name") or Path(str(entry["path"])).stem), path=file,
                       image_root=image_root, task=entry.get("task"), weight=float(weight))


# --- weighted epochs -------------------------------------------------------------------------
def quotas(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer draws per dataset proportional to `weights`, summing to `total` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ConfigError("mixture weights of the usable datasets sum to 0")
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    rest = total - int(out.sum())
    if rest:
        order = np.argsort(-(exact - out), kind="stable")
        out[order[:rest]] += 1
    return out


def epoch_samples(pools: list[np.ndarray], weights: np.ndarray, samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global ids of one epoch, in no particular order.

    Dataset i contributes its quota of draws: whole shuffled passes over its pool, then a
    seeded subset, so an up-weighted dataset repeats and a down-weighted one shows a different
    part of itself each epoch.
    """
    weights = np.where([len(p) > 0 for p in pools], weights, 0.0)
    out = []
    for i, (pool, n) in enumerate(zip(pools, quotas(weights, samples))):
        if n == 0:
            continue
        rng = np.random.default_rng([seed, epoch, i])
        reps = -(-int(n) // len(pool))
        draws = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]
        out.append(draws)
    return np.concatenate(out)


def plan_batches(ids: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                 group_by_length: bool, megabatch_mult: int) -> list[np.ndarray]:
    """Micro-batches of one epoch (global over all processes).

    Grouped: shuffle, cut into mega-batches of `megabatch_mult` micro-batches, sort each by
    length, cut into micro-batches, shuffle their order; the longest batch goes first so an
    out-of-memory shows at step 1, not hours in. Random: shuffle and cut.
    """
    rng = np.random.default_rng([seed, epoch, 1_000_003])
    ids = rng.permutation(ids)
    if not group_by_length:
        return [ids[i:i + batch_size] for i in range(0, len(ids) - batch_size + 1, batch_size)]
    mega = batch_size * megabatch_mult
    batches = []
    for m in range(0, len(ids), mega):
        chunk = ids[m:m + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    order = rng.permutation(len(batches))
    batches = [batches[i] for i in order]
    if batches:
        longest = int(np.argmax([lengths[b].max() for b in batches]))
        batches.insert(0, batches.pop(longest))
    return batches


@dataclass(frozen=True)
class EpochPlan:
    """This process's micro-batches of one epoch; every process gets the same number."""

    batches: list[np.ndarray]
    steps: int  # optimiser steps in the epoch


def rank_plan(batches: list[np.ndarray], rank: int, world: int, grad_accum: int) -> EpochPlan:
    steps = len(batches) // (world * grad_accum)
    usable = steps * world * grad_accum
    return EpochPlan(batches[:usable][rank::world], steps)
