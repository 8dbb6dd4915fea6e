"""What trains: the freeze spec (parameter-name prefixes) and optional LoRA on the LLM.

SPHINX-X's one-stage recipe trains the LLM, the projector and the learnable start/end/skip
embeddings, and keeps both visual experts frozen. A stage or task that needs something else
changes the spec in its YAML, not this code.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sphinx_model.modeling import SphinxForCausalLM

from .config import ConfigError, FreezeSection, LoraSection


def matches(name: str, prefixes: Sequence[str]) -> bool:
    """`llm` matches `llm` and `llm.model...`, never `llm_head`."""
    return any(name == p.rstrip(".") or name.startswith(p.rstrip(".") + ".") for p in prefixes)


def lr_scale_of(name: str, scales: dict[str, float]) -> float:
    """The multiplier of the learning rate for parameter `name`: the longest prefix of `scales` that
    matches it (`matches`' rule), 1.0 where none does."""
    hits = [p for p in scales if matches(name, [p])]
    return float(scales[max(hits, key=lambda p: len(p.rstrip(".")))]) if hits else 1.0


def check_lr_scale(model: nn.Module, scales: dict[str, float]) -> None:
    """Every prefix of `optim.lr_scale` names a trainable parameter: a typo is refused, not ignored."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix in scales:
        if not any(matches(n, [prefix]) for n in names):
            raise ConfigError(f"optim.lr_scale prefix {prefix!r} matches no trainable parameter")


def apply_freeze(model: SphinxForCausalLM, spec: FreezeSection) -> dict[str, int]:
    """Set requires_grad from the spec; returns parameter counts (trainable / frozen)."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in [*spec.train, *spec.freeze]:
        if not any(matches(n, [prefix]) for n in names):
            raise ConfigError(f"freeze pattern {prefix!r} matches no parameter (top level: "
                              f"{sorted({n.split('.')[0] for n in names})})")
    for name, p in model.named_parameters():
        p.requires_grad_(matches(name, spec.train) and not matches(name, spec.freeze))
    for key in model.expert_keys:
        if any(p.requires_grad for p in getattr(model, key).parameters()):
            raise ConfigError(f"visual expert {key!r} is in freeze.train; the experts stay frozen "
                              "(they run in eval mode under no_grad)")
    return count_parameters(model)


def apply_lora(model: SphinxForCausalLM, spec: LoraSection) -> None:
    """Wrap the LLM with LoRA adapters (peft); its own weights freeze, the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, config)


def merge_lora(model: SphinxForCausalLM) -> SphinxForCausalLM:
    """Fold adapters into the LLM's weights, so the saved model is a plain SPHINX checkpoint."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}
