"""Reading a released LLaMA2-Accessory folder: its shards (weights-only), their merge, its JSON.

Everything here treats the folder as data from elsewhere: shards must be regular files and
hold nothing but tensors (weights-only unpickling; anything else is refused in one line),
`meta.json` / `config.json` must be JSON objects, and every ModelArgs value is checked for
its kind before use (`model_arg`).
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..files import UnsafePathError, check_regular_file, read_text
from ..loading.checkpoint import CheckpointError

PREFIX = "llma."
SHARD_RE = re.compile(r"^consolidated\.(\d+)-of-(\d+)\.model\.pth$")

# Tensor-parallel split dim of the sharded LLM tensors (keys without `llma.`); the rest is replicated.
_SPLITS = ((re.compile(r"^layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight$|^output\.weight$"), 0),
           (re.compile(r"^layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight$|^tok_embeddings\.weight$"), 1))
_MOE_EXPERTS = re.compile(r"^layers\.(\d+)\.feed_forward\.(w[123])$")


# --- reading and merging shards ---------------------------------------------------------------
def find_shards(src: Path) -> list[Path]:
    """The shard files in rank order; every rank 0..MM-1 present, all agreeing on MM."""
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder")
    found = {p: SHARD_RE.match(p.name) for p in src.iterdir()}
    for p in (p for p, m in found.items() if m):
        try:
            check_regular_file(p, "shard")
        except (UnsafePathError, OSError) as e:
            raise CheckpointError(str(e) if isinstance(e, UnsafePathError) else f"cannot read {p}: {e}") from e
    shards = {int(m[1]): (int(m[2]), p) for p, m in found.items() if m}
    if not shards:
        raise CheckpointError(f"no consolidated.NN-of-MM.model.pth shards in {src}")
    counts = sorted({n for n, _ in shards.values()})
    if len(counts) != 1:
        raise CheckpointError(f"inconsistent shard count in {src}: files say -of-{counts}")
    if sorted(shards) != list(range(counts[0])):
        raise CheckpointError(f"inconsistent shard count in {src}: expected ranks 0..{counts[0] - 1} "
                              f"of {counts[0]}, found {sorted(shards)}")
    return [shards[r][1] for r in range(counts[0])]


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard's state dict, memory-mapped where the file allows, `llma.` stripped.

    Weights-only unpickling: anything but tensors (and the dicts holding them) is refused by
    torch before it can run, and reported as such in one line.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from e
    except Exception:  # legacy (non-zip) pickles cannot be memory-mapped; try plainly
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refused(path, e) from e
        except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged archive
            raise _unreadable(path, e) from e
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path.name} holds no state dict")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path.name} holds something other than tensors and was not loaded")
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in sd.items()}


def _refused(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """The weights-only unpickler said no: the file is not a pickle of tensors alone (a class
    or function it names, an opcode it does not allow, or bytes that are no pickle at all)."""
    return CheckpointError(f"{path.name} holds something other than tensors and was not loaded: refused for "
                           "safety, since unpickling it could run code (only tensors are read from a checkpoint)")


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    detail = " ".join(str(error).split())[:120]
    return CheckpointError(f"{path.name} is not a readable PyTorch checkpoint (truncated or corrupt: {detail})")


def split_dim(key: str) -> int | None:
    """Tensor-parallel split dim of a released key (`llma.` stripped); None = replicated."""
    for pattern, dim in _SPLITS:
        if pattern.match(key):
            return dim
    return None


def merge_shards(shards: list[dict[str, torch.Tensor]], notes: list[str]) -> dict[str, torch.Tensor]:
    """Megatron-style merge; MoE expert tensors concatenate each expert's ffn rows."""
    keys = list(shards[0])
    if any(set(s) != set(keys) for s in shards[1:]):
        raise CheckpointError("the shards hold different keys")
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        try:
            merged[key] = _merge_one(key, [s[key] for s in shards], shards[0], notes)
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"cannot merge {PREFIX}{key} across {len(shards)} shards: {e}") from e
    return merged


def _merge_one(key: str, parts: list[torch.Tensor], first: dict[str, torch.Tensor], notes: list[str]
               ) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if moe := _MOE_EXPERTS.match(key):
        experts = first[f"layers.{moe[1]}.feed_forward.gate.weight"].shape[0]
        return torch.cat([p.reshape(experts, -1, p.shape[-1]) for p in parts], dim=1).flatten(0, 1)
    if (dim := split_dim(key)) is not None:
        return torch.cat(parts, dim=dim)
    if not all(torch.equal(parts[0], p) for p in parts[1:]):
        notes.append(f"replicated tensor {PREFIX}{key} differs between shards; rank 0's copy is used")
    return parts[0]


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a regular file ({} when absent); anything else is a CheckpointError."""
    if not path.exists():
        return {}
    try:
        data = json.loads(read_text(path, path.name, max_bytes=16 << 20))
    except (UnsafePathError, OSError) as e:
        raise CheckpointError(str(e)) from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data



def model_arg(args: dict[str, Any], key: str, kind: type) -> Any:
    """A ModelArgs value of the expected kind (None when absent), or CheckpointError."""
    value = args.get(key)
    if value is None:
        return None
    ok = not isinstance(value, bool) and (isinstance(value, int) or
                                          (isinstance(value, float) and math.isfinite(value)))
    if ok and kind is int:
        ok = float(value).is_integer() and abs(value) < 2**31 if isinstance(value, float) else abs(value) < 2**31
    if not ok:
        raise CheckpointError(f"config.json's {key!r} must be {'an integer' if kind is int else 'a finite number'}, "
                              f"got {value!r}"[:200])
    return kind(value)
