"""The model a run starts from: a preset (random or pretrained) or one of our checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sphinx_model.config import SphinxConfig, get_preset, list_presets
from sphinx_model.modeling import SphinxForCausalLM, resolve_dtype
from sphinx_model.processor import SphinxProcessor

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


def build_model(section: ModelSection) -> tuple[SphinxForCausalLM, SphinxProcessor]:
    """Trainable weights in `section.dtype` (fp32 master weights by default); frozen ones in `frozen_dtype`."""
    from sphinx_model.checkpoint import build_from_config, from_pretrained

    init = section.init
    if Path(init).is_dir():
        from sphinx_model.checkpoint import CheckpointError

        try:
            config = apply_overrides(SphinxConfig.load(init), section.overrides)
            model, processor = from_pretrained(init, dtype=section.dtype, **_top_level(config, section.overrides))
        except CheckpointError as e:
            raise ConfigError(f"model.init: {e}") from e
    elif init in list_presets():
        config = apply_overrides(get_preset(init), section.overrides)
        config = config.replace(llm={**config.llm.__dict__, "dtype": section.dtype})
        model, processor = build_from_config(config, load_weights=section.load_weights)
    else:
        raise ConfigError(f"model.init {init!r} is neither a preset ({', '.join(list_presets())}) "
                          "nor a checkpoint folder")
    if section.frozen_dtype:
        for expert in model.experts:
            expert.to(resolve_dtype(section.frozen_dtype))
    return model, processor


def _top_level(config: SphinxConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained takes whole top-level fields; dotted overrides become their parent field."""
    d = config.to_dict()
    return {k.split(".")[0]: d[k.split(".")[0]] for k in overrides}
