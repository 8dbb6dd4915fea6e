"""The model a run starts from: a preset (random or pretrained) or one of our checkpoints.

The processor is built first and alone (tokenizer + config, no weights), so the data can be
indexed, and a hopeless mixture reported, before any weights load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sphinx_model.config import SphinxConfig, get_preset, list_presets

from .config import ConfigError, ModelSection


def apply_overrides(config: SphinxConfig, overrides: dict[str, Any]) -> SphinxConfig:
    """`{"max_length": 2048, "llm.router_aux_loss_coef": 0.02}` -> a new config."""
    d = config.to_dict()
    for dotted, value in overrides.items():
        *path, key = dotted.split(".")
        target = d
        for part in path:
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"model.overrides: {dotted!r} names no config field")
            target = target[part]
        if key not in target:
            raise ConfigError(f"model.overrides: {dotted!r} names no config field")
        target[key] = value
    try:
        return SphinxConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides: {e}") from e


def check_init(section: ModelSection) -> None:
    """Torch-free: the init names a preset or a folder."""
    if section.experts_from is not None and not Path(section.experts_from).is_dir():
        raise ConfigError(f"model.experts_from {section.experts_from!r} is not a checkpoint folder")
    if not Path(section.init).is_dir() and section.init not in list_presets():
        raise ConfigError(f"model.init {section.init!r} is neither a preset ({', '.join(list_presets())}) "
                          "nor a checkpoint folder")


def model_config(section: ModelSection) -> SphinxConfig:
    """The SphinxConfig the run trains: preset or checkpoint config, overrides, master dtype."""
    check_init(section)
    if Path(section.init).is_dir():
        try:
            base = SphinxConfig.load(section.init)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.init {section.init}: not a checkpoint of ours ({e})") from e
    else:
        base = get_preset(section.init)
    config = apply_overrides(base, section.overrides)
    return config.replace(llm={**config.llm.__dict__, "dtype": section.dtype})


def load_processor(config: SphinxConfig, section: ModelSection):
    from sphinx_model.processor import SphinxProcessor
    from sphinx_model.tokenizer import load_tokenizer

    source = section.init if Path(section.init).is_dir() else (config.tokenizer or config.llm.name_or_path)
    if not source:
        raise ConfigError(f"model {config.name} names no tokenizer")
    return SphinxProcessor(config, load_tokenizer(str(source), trust_remote_code=config.llm.trust_remote_code))


def build_model(config: SphinxConfig, section: ModelSection, cast_frozen: bool = True):
    """Trainable weights in `section.dtype` (fp32 master weights by default); frozen ones in `frozen_dtype`
    (unless `cast_frozen` is False: then `cast_frozen_experts` later, e.g. once a feature cache has
    checked the experts' weights as they were loaded)."""
    import sphinx_model.released  # noqa: F401  (registers released:NAME with the loader)
    from sphinx_model.loading import CheckpointError, build_from_config, from_pretrained

    if Path(section.init).is_dir():
        fields = config.to_dict()
        changed = {k.split(".")[0]: fields[k.split(".")[0]] for k in section.overrides}
        try:
            model, _ = from_pretrained(section.init, dtype=section.dtype, **changed)
        except CheckpointError as e:
            raise ConfigError(f"model.init: {e}") from e
    else:
        model, _ = build_from_config(config, load_weights=section.load_weights)
    if section.experts_from:
        replace_experts(model, section.experts_from)
    if cast_frozen:
        cast_frozen_experts(model, section)
    return model


def cast_frozen_experts(model, section: ModelSection) -> None:
    """The frozen experts in `section.frozen_dtype` (when set), to halve their memory."""
    from sphinx_model.modeling import resolve_dtype

    if section.frozen_dtype:
        for expert in model.experts:
            expert.to(resolve_dtype(section.frozen_dtype))


def replace_experts(model, source: str) -> None:
    """Load the visual experts of checkpoint `source` (ours) into `model`, which keeps its LLM,
    projector and tokenizer: how freshly pretrained experts go under an already trained LLM.
    The experts must be configured alike (same kinds, sizes and keys); they stay frozen."""
    from dataclasses import asdict

    import sphinx_model.released  # noqa: F401  (registers released:NAME with the loader)
    from sphinx_model.loading import CheckpointError, read_weights

    try:
        theirs = SphinxConfig.load(source)
        state = read_weights(source)
    except (OSError, ValueError, CheckpointError) as e:
        raise ConfigError(f"model.experts_from {source}: not a checkpoint of ours ({e})") from e
    ours = [asdict(e) for e in model.config.experts]
    if [asdict(e) for e in theirs.experts] != ours:
        raise ConfigError(f"model.experts_from {source}: its experts are configured differently from model.init's")
    prefixes = tuple(f"{key}." for key in model.expert_keys)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    given = {k: v for k, v in state.items() if k.startswith(prefixes)}
    missing, bad = sorted(set(own) - set(given)), [k for k in given if k in own and given[k].shape != own[k].shape]
    if missing or bad or set(given) - set(own):
        raise ConfigError(f"model.experts_from {source}: expert weights do not fit "
                          f"(missing {missing[:4]}, wrong shape {bad[:4]}, unexpected {sorted(set(given) - set(own))[:4]})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in given.items()}, strict=False)
    for key in model.expert_keys:
        getattr(model, key).requires_grad_(False)
