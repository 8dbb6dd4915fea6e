"""Checkpoints that resume exactly, and the final export in `sphinx_model`'s format.

A checkpoint folder `OUTPUT/checkpoints/step-000120/` holds
  * `accelerator.save_state`: model and optimiser (or DeepSpeed / FSDP shards), the
    registered LR scheduler, per-process RNG states;
  * `sharded/` (torch-FSDP mode only, where accelerate does not shard): model and optimiser
    through torch.distributed.checkpoint;
  * `trainer_state.json`: step, data position, counters — written last, so a folder without
    it is an interrupted save and is never resumed from.

Frozen weights (the experts; the LLM under LoRA) are not written: they are rebuilt from the
same config and seed, and a fingerprint in the state file proves they match on resume.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from sphinx_model.checkpoint import load_weights_into, save_pretrained
from sphinx_model.modeling import SphinxForCausalLM
from sphinx_model.processor import SphinxProcessor

from .config import ConfigError, LoraSection
from .freeze import apply_lora, merge_lora
from .parallel import Mode

STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
SHARDED = "sharded"


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_file(path: Path) -> "TrainerState":
        return TrainerState(**json.loads(path.read_text(encoding="utf-8")))


def frozen_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the frozen weights (sums, not bytes): equal configs + seeds give equal values."""
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        if not p.requires_grad and p.device.type != "meta":
            h.update(f"{name}:{tuple(p.shape)}:{float(p.sum(dtype=torch.float64)):.8e}".encode())
    return h.hexdigest()[:16]


def install_trainable_only_hooks(accelerator: Accelerator) -> None:
    """accelerate writes model weights as one state dict; keep only what trains."""

    def drop_frozen(models: list[nn.Module], weights: list[dict[str, Any]], _out: str) -> None:
        for model, state in zip(models, weights):
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in keep]:
                del state[key]

    accelerator.register_save_state_pre_hook(drop_frozen)


def save_checkpoint(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, mode: Mode,
                    state: TrainerState, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if mode == "fsdp_torch":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / SHARDED))
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(state.to_json() + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, mode: Mode,
                    folder: Path) -> TrainerState:
    state = TrainerState.from_file(folder / STATE_FILE)
    if mode == "fsdp_torch":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        msd, osd = get_state_dict(model, optimizer, options=opts)
        blob = {"model": msd, "optim": osd}
        dcp.load(blob, checkpoint_id=str(folder / SHARDED))
        set_state_dict(model, optimizer, model_state_dict=blob["model"], optim_state_dict=blob["optim"], options=opts)
    kwargs = {"strict": False} if mode == "plain" else {}
    accelerator.load_state(str(folder), **kwargs)
    return state


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run's output folder (-> its latest complete checkpoint)."""
    if (path / STATE_FILE).is_file():
        return path
    found = complete_checkpoints(path / CHECKPOINTS) if (path / CHECKPOINTS).is_dir() else []
    if not found:
        raise ConfigError(f"--resume {path}: no complete checkpoint there (expected {STATE_FILE} in it "
                          f"or in {CHECKPOINTS}/step-*/)")
    return found[-1]


def complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def prune_checkpoints(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
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


# --- the final model -----------------------------------------------------------------------
def full_state_dict(accelerator: Accelerator, model: nn.Module, mode: Mode) -> dict[str, torch.Tensor]:
    """Gather the whole model on the main process (collective: every process must call it)."""
    if mode in ("fsdp", "fsdp_torch"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


def export_final(accelerator: Accelerator, model: nn.Module, processor: SphinxProcessor, mode: Mode,
                 lora: LoraSection, folder: Path) -> Path | None:
    """Write the trained model as a `sphinx_model` checkpoint (LoRA merged) on the main process."""
    if mode == "plain":
        if accelerator.is_main_process:
            trained = accelerator.unwrap_model(model)
            save_pretrained(merge_lora(trained) if lora.enabled else trained, processor, folder)
        accelerator.wait_for_everyone()
        return folder
    state = full_state_dict(accelerator, model, mode)
    if accelerator.is_main_process:
        shell = _empty_like(accelerator.unwrap_model(model), lora)
        load_weights_into(shell, {k: _own_storage(v.detach().cpu()) for k, v in state.items()})
        save_pretrained(merge_lora(shell) if lora.enabled else shell, processor, folder)
    accelerator.wait_for_everyone()
    return folder


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """Gathered tensors can be views into one flat buffer; safetensors refuses to write those."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _empty_like(trained: SphinxForCausalLM, lora: LoraSection) -> SphinxForCausalLM:
    """The same architecture on the meta device (LLM config inlined: no hub access)."""
    from accelerate import init_empty_weights

    cfg = trained.config
    remote = cfg.llm.name_or_path if cfg.llm.trust_remote_code else None  # remote code needs its hub id
    config = cfg.replace(llm={**cfg.llm.__dict__, "config": trained.llm.config.to_dict(), "name_or_path": remote})
    with init_empty_weights():
        shell = SphinxForCausalLM(config, load_weights=False)
        if lora.enabled:
            apply_lora(shell, lora)
    return shell
