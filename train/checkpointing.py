"""Checkpoints that resume exactly, execute nothing, and never mix two runs.

A checkpoint folder `OUTPUT/checkpoints/step-000120/` holds (see `state_files.py`)
  * `model.safetensors`, `optimizer.safetensors` (one each, or one per process under FSDP2:
    `model-00003.safetensors` is process 3's shard): trainable weights and optimiser state;
  * `rng-<rank>.safetensors` + `rank-<rank>.json`: each process's RNG streams, optimiser
    param groups, and the size and SHA-256 of the files that process wrote;
  * `trainer_state.json`, written last: step, data position, counters, the run id, the
    scheduler / grad-scaler state, and the size and SHA-256 of every `rank-*.json`.
A folder is written as `step-000120.partial` and renamed when complete, so a killed save
never looks like a checkpoint. Nothing here is a pickle; a pickle someone adds is ignored.
Under DeepSpeed (GPU only) the engine writes its own files; those are loaded only after
`check_pickles` has proven each holds nothing but tensors and plain data.

Resuming from a run folder takes its newest checkpoint that verifies, and names any damaged
one it passes over; a named checkpoint folder that fails verification stops the run with one
line. A new run refuses an output folder that already holds a run's checkpoints or final
model, and a resumed run refuses one that holds another run's checkpoints.

Frozen weights (the experts; the LLM under LoRA) are not written: they are rebuilt from the
same config and seed, and a fingerprint in the state file proves they match on resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from .config import ConfigError
from .parallel import Mode
from .state_files import (CheckpointDamaged, check_pickles, conform, describe, inside, load_tensors, optimizer_files,
                          plain, read_json, restore_optimizer, restore_rng, restore_trainable, rng_files,
                          save_tensors, trainable_tensors, verify_files, write_json)

STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
FORMAT = 2                     # 1: accelerate's save_state layout (read only, behind check_pickles)
_STEP_DIR = re.compile(r"step-\d{6,}")
PARTIAL = ".partial"


@dataclass
class TrainerState:
    step: int = 0                 # optimiser steps done
    epoch: int = 0                # epoch of the next micro-batch
    micro: int = 0                # micro-batches of `epoch` this process has consumed
    tokens: int = 0               # real tokens trained on, all processes
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # bad records met while training, all processes
    world_size: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    frozen_fingerprint: str = ""
    run_id: str = ""              # which run wrote it: two runs' checkpoints never mix

    @staticmethod
    def from_dict(d: Any, where: Path) -> "TrainerState":
        """Exactly the fields above with their JSON types; anything else is damage."""
        names = {f.name: f for f in dataclasses.fields(TrainerState)}
        if not isinstance(d, dict) or not set(d) <= set(names):
            raise CheckpointDamaged(f"{where}: the trainer state has unknown or malformed fields")
        for key, value in d.items():
            kind = names[key].type
            ok = (isinstance(value, dict) and all(isinstance(k, str) and type(v) is int for k, v in value.items())
                  if key == "skipped" else isinstance(value, str) if kind == "str" else type(value) is int)
            if not ok or (type(value) is int and value < 0):
                raise CheckpointDamaged(f"{where}: trainer state field {key!r} has a bad value {value!r:.40}")
        return TrainerState(**d)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder and what its state file says."""

    folder: Path
    state: TrainerState
    manifest: dict[str, Any]

    @property
    def format(self) -> int:
        return int(self.manifest.get("format", 1))


def frozen_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the frozen weights (sums, not bytes): equal configs + seeds give equal values."""
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        if not p.requires_grad and p.device.type != "meta":
            h.update(f"{name}:{tuple(p.shape)}:{float(p.sum(dtype=torch.float64)):.8e}".encode())
    return h.hexdigest()[:16]


# --- writing -----------------------------------------------------------------------------------
def save_checkpoint(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, mode: Mode, state: TrainerState, folder: Path,
                    config: dict[str, Any] | None = None) -> Path:
    """Write `folder` (collective: every process calls it); `config`: the run's settings, which a
    resume compares with its own (`resume_config.py`)."""
    acc = accelerator
    partial = folder.with_name(folder.name + PARTIAL)
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    if mode == "deepspeed":
        acc.save_state(str(partial))  # the engine's own partitioned files
    else:
        _write_rank_files(acc, model, optimizer, mode, partial)
    acc.wait_for_everyone()
    if acc.is_main_process:
        listed = sorted(p.name for p in partial.iterdir() if p.name.startswith("rank-")) if mode != "deepspeed" \
            else sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
        files = describe(partial, listed) if mode != "deepspeed" else \
            {n: {"bytes": (partial / n).stat().st_size, "sha256": None} for n in listed}
        write_json(partial / STATE_FILE, {
            "format": FORMAT, "mode": mode, "state": asdict(state), "scheduler": plain(scheduler.state_dict()),
            "scaler": plain(acc.scaler.state_dict()) if acc.scaler is not None else None,
            "accelerator_step": acc.step, "files": files, "config": config})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
    acc.wait_for_everyone()
    return folder


def _sharded(mode: str) -> bool:
    return mode in ("fsdp", "fsdp_torch")


def _write_rank_files(acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, mode: Mode,
                      folder: Path) -> None:
    rank = f"{acc.process_index:05d}"
    meta: dict[str, Any] = {"rank": acc.process_index}
    names = [f"rng-{rank}.safetensors"]
    rng, meta["rng"] = rng_files()
    save_tensors(rng, folder / names[0])
    if _sharded(mode) or acc.is_main_process:  # replicated (DDP) state is written once
        tag = f"-{rank}" if _sharded(mode) else ""
        meta["model_file"], meta["optimizer_file"] = f"model{tag}.safetensors", f"optimizer{tag}.safetensors"
        save_tensors(trainable_tensors(acc.unwrap_model(model)), folder / meta["model_file"])
        tensors, meta["optimizer"] = optimizer_files(getattr(optimizer, "optimizer", optimizer))
        save_tensors(tensors, folder / meta["optimizer_file"])
        names += [meta["model_file"], meta["optimizer_file"]]
    meta["files"] = describe(folder, names)
    write_json(folder / f"rank-{rank}.json", meta)


# --- reading -------------------------------------------------------------------------------------
def read_checkpoint(folder: Path, rank: int = 0, world: int = 1) -> Checkpoint:
    """Parse and verify `folder` for process `rank`: every file it will read is present, inside
    the folder, and has its recorded size and hash. Raises CheckpointDamaged (one line)."""
    path = inside(folder, STATE_FILE)
    manifest = read_json(path)
    if "format" not in manifest:  # format 1: trainer_state.json was the state itself
        check_pickles(folder, _legacy_globals())
        return Checkpoint(folder, TrainerState.from_dict(manifest, path), {"format": 1})
    if manifest["format"] != FORMAT:
        raise CheckpointDamaged(f"{path}: unknown checkpoint format {manifest['format']!r}")
    state = TrainerState.from_dict(manifest.get("state"), path)
    verify_files(folder, manifest.get("files"))
    if manifest.get("mode") == "deepspeed":
        check_pickles(folder, _deepspeed_globals())
    elif state.world_size == world:  # (a different world size is refused by check_compatible)
        for r in sorted({rank, 0}):
            verify_files(folder, _rank_meta(folder, r).get("files"))
    return Checkpoint(folder, state, manifest)


def _rank_meta(folder: Path, rank: int) -> dict[str, Any]:
    return read_json(inside(folder, f"rank-{rank:05d}.json"))


def load_checkpoint(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    mode: Mode, ckpt: Checkpoint) -> TrainerState:
    """Restore a checkpoint `read_checkpoint` verified (collective)."""
    acc, folder = accelerator, ckpt.folder
    if ckpt.format == 1:
        return _load_legacy(acc, scheduler, mode, ckpt)
    saved_mode = ckpt.manifest.get("mode")
    if (saved_mode == "deepspeed") != (mode == "deepspeed") or _sharded(str(saved_mode)) != _sharded(mode):
        raise ConfigError(f"cannot resume: {folder} was written in {saved_mode} mode, this run is {mode}")
    if mode == "deepspeed":
        acc.load_state(str(folder))
    else:
        own = _rank_meta(folder, acc.process_index)
        holder = own if _sharded(mode) else _rank_meta(folder, 0)
        restore_trainable(acc.unwrap_model(model), load_tensors(inside(folder, holder.get("model_file"))), folder)
        restore_optimizer(getattr(optimizer, "optimizer", optimizer),
                          load_tensors(inside(folder, holder.get("optimizer_file"))), holder.get("optimizer"), folder)
        restore_rng(load_tensors(inside(folder, f"rng-{acc.process_index:05d}.safetensors")), own.get("rng"), folder)
    m = ckpt.manifest
    scheduler.load_state_dict(conform(m.get("scheduler"), plain(scheduler.state_dict()), f"{folder}: scheduler"))
    if acc.scaler is not None:
        acc.scaler.load_state_dict(conform(m.get("scaler"), plain(acc.scaler.state_dict()), f"{folder}: scaler"))
    if type(m.get("accelerator_step")) is not int:
        raise CheckpointDamaged(f"{folder}: accelerator_step is missing")
    acc.step = m["accelerator_step"]
    return ckpt.state


def _load_legacy(acc: Accelerator, scheduler: Any, mode: Mode, ckpt: Checkpoint) -> TrainerState:
    """accelerate's layout of earlier versions: every pickle passed check_pickles; each is read weights-only."""
    if mode != "plain":
        raise ConfigError(f"cannot resume: {ckpt.folder} was written by an earlier trainer version; "
                          "only single-process or DDP checkpoints of that version can be resumed")
    acc.load_state(str(ckpt.folder), strict=False)  # accelerate reads weights-only; no custom objects registered
    custom = ckpt.folder / "custom_checkpoint_0.pkl"
    if custom.is_file():
        saved = torch.load(custom, map_location="cpu", weights_only=True)
        scheduler.load_state_dict(conform(plain(saved), plain(scheduler.state_dict()), f"{custom}"))
    return ckpt.state


def _legacy_globals() -> list[Any]:
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy arrays in accelerate's RNG pickles

    return list(TORCH_SAFE_GLOBALS)


def _deepspeed_globals() -> list[Any]:
    """Plain-data classes DeepSpeed puts beside its tensors; anything else is refused by name."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [*_legacy_globals(), ZeroStageEnum, fragment_address]


# --- which checkpoint -----------------------------------------------------------------------------
def step_dirs(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (interrupted `.partial` saves excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def find_checkpoint(path: Path, accelerator: Accelerator) -> Checkpoint:
    """`path` is a checkpoint folder (verified, or one line why not) or a run folder (its newest
    checkpoint of that run that verifies; each one passed over is named). Collective."""
    acc = accelerator
    if (path / STATE_FILE).exists():
        return _agreed(acc, [path], explicit=True)
    candidates = step_dirs(path / CHECKPOINTS)
    if not candidates:
        raise ConfigError(f"--resume {path}: no checkpoint there (expected {STATE_FILE} in it "
                          f"or in {CHECKPOINTS}/step-*/)")
    return _agreed(acc, candidates[::-1], explicit=False, run_id=run_id_of(path))


def _agreed(acc: Accelerator, candidates: list[Path], explicit: bool, run_id: str | None = None) -> Checkpoint:
    """The first candidate every process verifies."""
    from accelerate.utils import reduce

    passed: list[str] = []
    for folder in candidates:
        try:
            ckpt = read_checkpoint(folder, acc.process_index, acc.num_processes)
            if run_id and ckpt.state.run_id and ckpt.state.run_id != run_id:
                raise CheckpointDamaged(f"{folder} belongs to another run ({ckpt.state.run_id}, not {run_id})")
            problem = ""
        except CheckpointDamaged as e:
            ckpt, problem = None, str(e)
        bad = reduce(torch.tensor([float(bool(problem))], device=acc.device), reduction="sum")
        if float(bad.sum()) == 0 and ckpt is not None:
            for note in passed:
                acc.print(f"warning: skipped a checkpoint: {note}")
            if passed:
                acc.print(f"resuming from the newest intact checkpoint, {folder.name}")
            return ckpt
        if explicit:
            raise CheckpointDamaged(f"cannot resume: {problem or 'another process found this checkpoint damaged'}")
        passed.append(problem or f"{folder.name}: damaged on another process")
    raise CheckpointDamaged(f"cannot resume: no intact checkpoint ({'; '.join(passed)[:600]})")


def prune_checkpoints(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_compatible(state: TrainerState, expected: TrainerState) -> None:
    """The data position only means something for the same batching and seed."""
    for name in ("world_size", "batch_size", "grad_accum", "seed"):
        a, b = getattr(state, name), getattr(expected, name)
        if a != b:
            raise ConfigError(f"cannot resume: the checkpoint was written with {name}={a}, this run has {b}")
    if state.frozen_fingerprint and expected.frozen_fingerprint and state.frozen_fingerprint != expected.frozen_fingerprint:
        raise ConfigError("cannot resume: the frozen weights differ from the run that wrote the checkpoint "
                          "(different model.init, seed or preset)")


# --- one run per output folder --------------------------------------------------------------------
def run_id_of(output_dir: Path) -> str | None:
    """The run id recorded in an output folder, if any."""
    path = output_dir / RUN_FILE
    if not path.is_file():
        return None
    value = read_json(path).get("run_id")
    return value if isinstance(value, str) and value else None


def check_output_dir(output_dir: Path, resuming: TrainerState | None) -> None:
    """A new run needs a folder without a run in it; a resumed one, a folder of its own run."""
    held = [p.name for p in step_dirs(output_dir / CHECKPOINTS)]
    final = (output_dir / "final").exists()
    if resuming is None and (held or final):
        what = f"checkpoints {held[0]}..{held[-1]}" if held else "a final model"
        raise ConfigError(f"train.output_dir {output_dir} already holds a run ({what}); resume it with "
                          f"--resume {output_dir}, or choose another train.output_dir")
    if resuming is not None and held:
        theirs = run_id_of(output_dir)
        if theirs and resuming.run_id and theirs != resuming.run_id:
            raise ConfigError(f"train.output_dir {output_dir} holds checkpoints of another run ({theirs}); "
                              "resuming there would mix the two: choose another train.output_dir")


def write_run_file(output_dir: Path, run_id: str) -> None:
    write_json(output_dir / RUN_FILE, {"run_id": run_id})
