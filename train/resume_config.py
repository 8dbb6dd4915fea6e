"""A resumed run continues the run its checkpoint came from, with the same settings.

The checkpoint's manifest keeps the run config it was written under (`run_settings`); on
resume the current config is compared with it and any change to what the steps compute (a
learning rate, `max_steps` and so the schedule, the data, the model, the freeze spec) stops
the run with one line naming the changed fields, unless the user says so explicitly
(`--allow-config-change`). Settings that only change what is logged, saved or shown, or where
the process stops, may change freely.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import FEATURE_MANIFEST, ConfigError, RunConfig

# May differ on resume: they never change the maths of the steps to come.
FREE_TO_CHANGE = frozenset({
    "train.output_dir", "train.stop_after_steps", "train.progress", "train.tensorboard", "train.log_every",
    "train.save_every", "train.keep_checkpoints", "data.cache_dir", "data.num_workers"})


def run_settings(cfg: RunConfig) -> dict[str, Any]:
    """The config as flat `section.key` -> plain value; the mixture by the SHA-256 of its file
    (its path may differ when a run folder is copied or moved, its content may not)."""
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        for key, value in (values or {}).items():
            flat[f"{section}.{key}"] = value
    mixture = Path(cfg.data.mixture)
    try:
        flat["data.mixture"] = "sha256:" + hashlib.sha256(mixture.read_bytes()).hexdigest()
    except OSError:
        flat["data.mixture"] = str(mixture)
    if cfg.data.feature_cache is not None:  # likewise: what its features are, wherever it lies
        flat["data.feature_cache"] = _feature_cache_identity(Path(cfg.data.feature_cache))
    return flat


def _feature_cache_identity(folder: Path) -> str:
    """What a feature cache holds, from its manifest: whose features, in which dtype, how many shards
    (a cache extended since holds features for records that were skipped before); its path if unreadable."""
    try:
        m = json.loads((folder / FEATURE_MANIFEST).read_text(encoding="utf-8"))
        return f"fingerprint:{m['fingerprint']}:{m['dtype']}:{len(m['shards'])} shards"
    except (OSError, ValueError, KeyError, TypeError):
        return str(folder)


def changed_fields(saved: Any, current: dict[str, Any]) -> list[str]:
    """The `section.key` names whose values differ (FREE_TO_CHANGE excluded), sorted."""
    if not isinstance(saved, dict):
        return []          # a checkpoint written before configs were recorded: nothing to compare
    keys = (set(saved) | set(current)) - FREE_TO_CHANGE
    return sorted(k for k in keys if _norm(saved.get(k)) != _norm(current.get(k)))


def _norm(value: Any) -> Any:
    """JSON round-trips tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def check_same_config(saved: Any, current: dict[str, Any], folder: Path, allow: bool) -> list[str]:
    """ConfigError naming the changed fields (with the saved and new value of the first few),
    unless `allow`; returns the changed fields either way."""
    changed = changed_fields(saved, current)
    if changed and not allow:
        shown = ", ".join(f"{k} {_short(saved.get(k))} -> {_short(current.get(k))}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"cannot resume: the config differs from the one {folder.name} was written with "
                          f"({shown}{more}); resume with the same config, start a new run in another "
                          "train.output_dir, or pass --allow-config-change")
    return changed


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
