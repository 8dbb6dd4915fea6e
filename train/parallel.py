"""How the model is spread over processes: plain / DDP, FSDP2, or DeepSpeed ZeRO.

accelerate does the work where it can: DDP, its FSDP2 integration (GPUs) and DeepSpeed are
configured by the accelerate YAMLs in `train/configs/`. Two things it cannot know are set
here: the LLM's decoder layers are the FSDP units (`_no_split_modules` of the *LLM*; the
SPHINX wrapper has none), and the frozen visual experts stay out of sharding (ignored
parameters: replicated, never gathered, never in the optimiser).

accelerate only shards on accelerators; on CPU (gloo) an FSDP request — an accelerate FSDP
config or `train.fsdp: true` — is served by torch's `fully_shard` directly, with the same
policy. That path is also what the CPU tests and the memory benchmark exercise.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from sphinx_model.modeling import SphinxForCausalLM

from .config import ConfigError, RunConfig

Mode = Literal["plain", "fsdp", "fsdp_torch", "deepspeed"]
HIDDEN_SIZE_KEYS = {
    "zero_optimization.reduce_bucket_size": lambda d: d * d,
    "zero_optimization.stage3_prefetch_bucket_size": lambda d: int(0.9 * d * d),
    "zero_optimization.stage3_param_persistence_threshold": lambda d: 10 * d,
}


def fsdp_requested(cfg: RunConfig) -> bool:
    return cfg.train.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def sharding_mode(accelerator: Accelerator, cfg: RunConfig) -> Mode:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if fsdp_requested(cfg) and accelerator.num_processes > 1:
        return "fsdp_torch"
    return "plain"


def decoder_layer_classes(model: SphinxForCausalLM) -> list[str]:
    names = sorted(getattr(model.llm, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(f"{type(model.llm).__name__} names no decoder layer classes (_no_split_modules); "
                          "FSDP cannot pick its wrapping units")
    return names


def frozen_modules(model: SphinxForCausalLM) -> list[nn.Module]:
    return [getattr(model, k) for k in model.expert_keys]


def touch_glue_parameters(model: SphinxForCausalLM) -> None:
    """Make every trainable parameter outside the LLM part of every loss (times zero).

    A text-only micro-batch never uses the projector or the start/end embeddings, and a batch
    without padded views never uses the skip token. Processes that disagree about which
    parameters got gradients break data parallelism: FSDP2 reduce-scatters mismatched buffers,
    DDP waits forever (or pays for find_unused_parameters). Adding `0 * sum(p)` costs nothing
    and keeps every process's gradient set identical. It runs as a forward hook on the root,
    while FSDP still holds the unsharded parameters.
    """

    def hook(module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
        if getattr(output, "loss", None) is None:
            return output
        glue = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("llm.")]
        if glue:
            output.loss = output.loss + 0.0 * torch.stack([p.sum() for p in glue]).sum().to(output.loss.dtype)
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def prepare(accelerator: Accelerator, model: SphinxForCausalLM, cfg: RunConfig,
            make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
            ) -> tuple[nn.Module, torch.optim.Optimizer, Mode]:
    """Wrap the model for this run's mode and build its optimiser on the (possibly sharded) parameters."""
    mode = sharding_mode(accelerator, cfg)
    if mode != "deepspeed":  # ZeRO fills missing gradients itself (and partitions params under ZeRO-3)
        touch_glue_parameters(model)
    if mode == "fsdp_torch":
        model = shard_with_torch(model, accelerator.num_processes, reshard_after_forward=True)
        return model, make_optimizer(model), mode
    if mode == "fsdp":
        _configure_fsdp_plugin(accelerator, model)
    if mode == "deepspeed":
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, model, cfg)
    optimizer = make_optimizer(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, mode


def _configure_fsdp_plugin(accelerator: Accelerator, model: SphinxForCausalLM) -> None:
    plugin = accelerator.state.fsdp_plugin
    if not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = decoder_layer_classes(model)
    if plugin.ignored_modules is None:
        plugin.ignored_modules = frozen_modules(model)
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise ConfigError("FSDP1 with frozen parameters needs fsdp_use_orig_params: true (or use fsdp_version: 2)")


def fill_deepspeed_config(ds: dict[str, Any], model: SphinxForCausalLM, cfg: RunConfig) -> None:
    """Fill what accelerate would take from a prepared DataLoader or a transformers `model.config`
    (the SPHINX wrapper's config is ours): micro-batch size, clipping, hidden-size buckets."""
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_clipping"] = cfg.optim.max_grad_norm
    hidden = model.llm.config.hidden_size
    for dotted, value in HIDDEN_SIZE_KEYS.items():
        section, key = dotted.split(".")
        if ds.get(section, {}).get(key) == "auto":
            ds[section][key] = value(hidden)


def shard_with_torch(model: SphinxForCausalLM, world: int, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 by hand: each decoder layer is a unit, then the root; experts are ignored (replicated)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cpu" if not torch.cuda.is_available() else "cuda"
    mesh = init_device_mesh(device, (world,))
    ignored = {p for m in frozen_modules(model) for p in m.parameters()}
    layer_names = set(decoder_layer_classes(model))
    for module in list(model.llm.modules()):
        if type(module).__name__ in layer_names:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    return model


def is_sharded(mode: Mode) -> bool:
    return mode in ("fsdp", "fsdp_torch", "deepspeed")
