"""The trained model written in `sphinx_model`'s own checkpoint format (LoRA merged), which the CLI loads."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from sphinx_model.loading import load_weights_into, save_pretrained
from sphinx_model.modeling import SphinxForCausalLM
from sphinx_model.processor import SphinxProcessor

from .config import LoraSection
from .freeze import apply_lora, merge_lora
from .parallel import Mode


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
