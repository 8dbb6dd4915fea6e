"""Training state as files that cannot run code: safetensors for tensors, JSON for the rest.

A checkpoint folder is something people copy and share, so loading one must never execute
anything it contains. Pickle (what `torch.save`, accelerate's custom states and
torch.distributed.checkpoint's metadata use) can; safetensors and JSON cannot. Everything
the trainer itself needs to resume exactly is written here in those two formats:

  * trainable weights (a process's local shard under FSDP2) -> `{name: tensor}`;
  * optimiser state -> its tensors by `state.<param index>.<key>`, its param groups and
    scalars as JSON;
  * RNG states -> torch's as uint8 tensors, Python's and NumPy's as JSON integer lists;
  * scheduler / grad-scaler state dicts -> JSON, accepted only when they have exactly the
    keys and JSON types this run's own objects produce (nothing a file adds reaches
    `load_state_dict`).

Every file is listed with its size and SHA-256, so a truncated or altered file is named
before anything is loaded from it. For state that only a third-party engine can write
(DeepSpeed), `check_pickles` first proves each pickle holds nothing but tensors and plain
data (PyTorch's weights-only unpickler, which refuses every other Python object).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError


class CheckpointDamaged(ConfigError):
    """A checkpoint that is incomplete, truncated, altered or holds something unsafe (one line)."""


# --- files, hashes, JSON ----------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} of files the caller has just written into `folder`."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256(folder / n)} for n in names}


def inside(folder: Path, name: Any) -> Path:
    """`folder/name` for a plain file name written by us; anything else is damage (no `..`, no links)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointDamaged(f"{folder}: the checkpoint names a file outside itself ({name!r})")
    path = folder / name
    if path.is_symlink():
        raise CheckpointDamaged(f"{path} is a symbolic link; a checkpoint holds plain files only")
    return path


def verify_files(folder: Path, listed: Any) -> None:
    """Every listed file is present, a regular file inside `folder`, of the listed size and hash."""
    if not isinstance(listed, dict):
        raise CheckpointDamaged(f"{folder}: the file list is missing or malformed")
    for name, info in listed.items():
        path = inside(folder, name)
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int):
            raise CheckpointDamaged(f"{path}: malformed entry in the file list")
        if not path.is_file():
            raise CheckpointDamaged(f"{path} is missing")
        if path.stat().st_size != info["bytes"]:
            raise CheckpointDamaged(f"{path} has {path.stat().st_size} bytes, {info['bytes']} were written "
                                    "(truncated or replaced)")
        if info.get("sha256") is not None and sha256(path) != info["sha256"]:
            raise CheckpointDamaged(f"{path} does not match its recorded SHA-256 (altered or corrupt)")


def write_json(path: Path, value: Any) -> None:
    """Atomically: a reader (or a crash) never leaves half a JSON file under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointDamaged(f"{path} is not valid JSON (half-written or corrupt: {type(e).__name__})") from None
    if not isinstance(value, dict):
        raise CheckpointDamaged(f"{path} does not hold a JSON object")
    return value


def plain(value: Any) -> Any:
    """A state dict's JSON form (tuples become lists); refuses tensors and other objects."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} as JSON state")


def conform(saved: Any, current: Any, where: str) -> Any:
    """`saved` (from JSON) in the shape of `current` (this run's own state): same keys, same JSON
    types, tuples restored. Anything else is damage, so no file can smuggle a key or an object
    into a `load_state_dict`."""
    if isinstance(current, Mapping):
        if not isinstance(saved, dict) or set(saved) != {str(k) for k in current}:
            raise CheckpointDamaged(f"{where}: keys differ from what this run writes")
        return {k: conform(saved[str(k)], v, f"{where}.{k}") for k, v in current.items()}
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(current):
            raise CheckpointDamaged(f"{where}: expected a list of {len(current)}")
        items = [conform(s, c, f"{where}[{i}]") for i, (s, c) in enumerate(zip(saved, current))]
        return tuple(items) if isinstance(current, tuple) else items
    if _scalar_fits(saved, current):
        return saved
    raise CheckpointDamaged(f"{where}: expected {type(current).__name__}, found {type(saved).__name__}")


def _scalar_fits(saved: Any, current: Any) -> bool:
    if current is None or saved is None:  # optional settings (e.g. `foreach`): any scalar
        return saved is None or isinstance(saved, (bool, int, float, str))
    if isinstance(current, bool) or isinstance(saved, bool):
        return isinstance(current, bool) and isinstance(saved, bool)
    if isinstance(current, int):
        return isinstance(saved, int)
    if isinstance(current, float):
        return isinstance(saved, (int, float))
    return isinstance(current, str) and isinstance(saved, str)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointDamaged(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


# --- local shards ----------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard (FSDP2) or the tensor itself


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """This process's part of every trainable parameter (the whole tensor unless sharded)."""
    return {n: _local(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointDamaged(f"{where}: weights do not match this model "
                                f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, p in params.items():
        local = _local(p)
        if tuple(tensors[name].shape) != tuple(local.shape):
            raise CheckpointDamaged(f"{where}: {name} has shape {tuple(tensors[name].shape)}, "
                                    f"the model {tuple(local.shape)}")
        local.copy_(tensors[name].to(local.dtype))


def optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of an optimiser's state; DTensor states as this process's local shards."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = _local(value)
            else:
                scalars.setdefault(str(idx), {})[key] = plain(value)
    return tensors, {"param_groups": plain(sd["param_groups"]), "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                      meta: Any, where: Path) -> None:
    current = optimizer.state_dict()
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{where}: optimiser state is malformed")
    groups = conform(meta.get("param_groups"), current["param_groups"], f"{where}: param_groups")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = (key.split(".", 2) + ["", ""])[:3]
        if not idx.isdigit() or int(idx) >= len(params) or not name:
            raise CheckpointDamaged(f"{where}: unexpected optimiser tensor {key!r}")
        p = params[int(idx)]
        state.setdefault(int(idx), {})[name] = _like(value, p, name, where)
    scalars = meta.get("scalars") or {}
    if not isinstance(scalars, dict):
        raise CheckpointDamaged(f"{where}: optimiser scalars are malformed")
    for idx, values in scalars.items():
        if not idx.isdigit() or int(idx) >= len(params) or not isinstance(values, dict):
            raise CheckpointDamaged(f"{where}: unexpected optimiser entry {idx!r}")
        state.setdefault(int(idx), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointDamaged(f"{where}: optimiser state does not fit this run ({e})") from None


def _like(value: torch.Tensor, param: torch.Tensor, name: str, where: Path) -> torch.Tensor:
    """A loaded local shard back in the form the optimiser keeps next to `param`."""
    local = _local(param)
    if name != "step" and tuple(value.shape) != tuple(local.shape):
        raise CheckpointDamaged(f"{where}: optimiser state {name} has shape {tuple(value.shape)}, "
                                f"its parameter {tuple(local.shape)}")
    if name != "step" and hasattr(param, "to_local"):
        from torch.distributed.tensor import DTensor

        value = DTensor.from_local(value.to(local.device), param.device_mesh, param.placements,
                                   run_check=False, shape=param.shape, stride=param.stride())
    return value


# --- RNG --------------------------------------------------------------------------------------
def rng_files() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG streams: torch's as tensors, Python's and NumPy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, words, gauss = random.getstate()
    key, np_words, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(words), gauss],
                     "numpy": [key, np_words.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Any, where: Path) -> None:
    try:
        version, words, gauss = meta["python"]
        key, np_words, pos, has_gauss, cached = meta["numpy"]
        if not (isinstance(words, list) and isinstance(np_words, list) and isinstance(key, str)
                and all(isinstance(w, int) for w in words + np_words)):
            raise TypeError("not integer lists")
        random.setstate((version, tuple(words), gauss))
        np.random.set_state((key, np.asarray(np_words, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["torch"])
        cuda = sorted(k for k in tensors if k.startswith("cuda."))
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(len(cuda))])
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise CheckpointDamaged(f"{where}: RNG state is malformed ({type(e).__name__})") from None


# --- pickles written by others ---------------------------------------------------------------
def is_pickle(path: Path) -> bool:
    """torch.save zips (a `data.pkl` inside) and raw pickles (protocol 2+), told by content, not name."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith("data.pkl") for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return head[:1] == b"\x80"


def check_pickles(folder: Path, allowed: Iterable[Any] = ()) -> None:
    """Refuse `folder` unless every pickle under it loads with PyTorch's weights-only unpickler
    (tensors, containers, numbers, strings, and the `allowed` classes only). Nothing is executed:
    that unpickler refuses to call or import anything else. Symbolic links are refused too."""
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise CheckpointDamaged(f"{path} is a symbolic link; a checkpoint holds plain files only")
        if not path.is_file() or not is_pickle(path):
            continue
        zipped = zipfile.is_zipfile(path)
        try:
            with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "pickle protocol 4" notes
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except Exception as e:  # noqa: BLE001 - any failure under the weights-only unpickler means "refuse"
            found = re.search(r"(?:[Uu]nsupported (?:global|operand|GLOBAL) ?[\w.]*)", str(e))
            reason = found.group(0) if found else type(e).__name__
            raise CheckpointDamaged(f"{path} holds something other than tensors and plain data (or is corrupt), "
                                    f"so it was not loaded ({reason})") from None
