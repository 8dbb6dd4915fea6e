"""Our checkpoint format and `from_pretrained`.

A checkpoint is one folder:
  sphinx_config.json                       the SphinxConfig, with the LLM's full transformers config inlined
  model.safetensors | model-0000x-of-0000y.safetensors + model.safetensors.index.json
  tokenizer files                          (tokenizer.save_pretrained)

`from_pretrained` takes a local folder or a Hugging Face Hub repo id (downloaded through
huggingface_hub); the model is built on the meta device and the weights are assigned
directly, so a 13B model is never initialised twice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors.torch import load_file

from .config import CONFIG_FILE, SphinxConfig
from .modeling import SphinxForCausalLM, resolve_dtype
from .processor import SphinxProcessor
from .tokenizer import load_tokenizer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not fit its config."""


def save_pretrained(model: SphinxForCausalLM, processor: SphinxProcessor, folder: str | Path,
                    max_shard_size: str | int = "5GB") -> Path:
    """Write config (LLM config inlined, so loading needs no hub), weights and tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llm_config = model.llm.config.to_dict()
    cfg = model.config.replace(llm={**model.config.llm.__dict__, "config": llm_config,
                                    "name_or_path": model.config.llm.name_or_path
                                    if model.config.llm.trust_remote_code else None},
                               tokenizer=None)
    cfg.save(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size)
    processor.tokenizer.save_pretrained(folder)
    return folder


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder as is, or a hub repo id downloaded (or found in the local cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} is a folder but not a SPHINX checkpoint (no {CONFIG_FILE}); "
                                  "for released LLaMA2-Accessory folders run "
                                  "`python -m sphinx_model convert-accessory SRC DST` first")
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; a checkpoint is a folder")
    try:
        return Path(snapshot_download(str(name_or_path)))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise CheckpointError(f"{name_or_path!r} is not a local folder and is not in the Hugging Face cache; "
                              "downloading is impossible (offline: HF_HUB_OFFLINE=1 or no network). "
                              "Pass a local checkpoint folder or a preset name.") from e
    except HFValidationError as e:
        raise CheckpointError(f"{name_or_path!r} is neither a local folder nor a valid hub repo id") from e


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise CheckpointError(f"no weights in {folder} (expected {WEIGHTS_NAME} or {INDEX_NAME})")


def load_weights_into(model: SphinxForCausalLM, state: dict[str, torch.Tensor]) -> None:
    """Assign `state` to a (possibly meta-device) model; every key must match."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    tied = {k for k in own if k not in state and _is_tied(model, k)}
    missing = sorted(set(own) - set(state) - tied)
    bad_shape = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise CheckpointError("checkpoint does not fit the config: "
                              f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                              f"wrong shape {bad_shape[:8]}")
    dtypes = {k: own[k].dtype for k in state}
    model.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()}, strict=False, assign=True)
    if tied:
        model.llm.tie_weights()
    for key in model.expert_keys:  # assign=True keeps flags, but be explicit: experts stay frozen
        getattr(model, key).requires_grad_(False)


def _is_tied(model: SphinxForCausalLM, key: str) -> bool:
    return bool(getattr(model.llm.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def from_pretrained(name_or_path: str | Path, device: str | torch.device | None = None,
                    dtype: str | None = None, **config_overrides: Any
                    ) -> tuple[SphinxForCausalLM, SphinxProcessor]:
    """Load (model, processor) from a checkpoint folder or hub repo id.

    `dtype` ("bfloat16", ...) and `config_overrides` (e.g. skip_tokens=False) adjust the
    stored config; `device_map` in the stored LLM config dispatches across GPUs.
    """
    from accelerate import init_empty_weights

    folder = resolve_checkpoint(name_or_path)
    config = SphinxConfig.load(folder)
    if dtype is not None:
        resolve_dtype(dtype)
        config = config.replace(llm={**config.llm.__dict__, "dtype": dtype})
    if config_overrides:
        config = config.replace(**config_overrides)
    with init_empty_weights():
        model = SphinxForCausalLM(config, load_weights=False)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        state.update(load_file(str(f)))
    load_weights_into(model, state)
    model = _place(model, device)
    tokenizer = load_tokenizer(str(folder), trust_remote_code=config.llm.trust_remote_code)
    return model.eval(), SphinxProcessor(config, tokenizer)


def _place(model: SphinxForCausalLM, device: str | torch.device | None) -> SphinxForCausalLM:
    device_map = model.config.llm.device_map
    if device_map:
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = list(getattr(model.llm, "_no_split_modules", None) or [])
        no_split += sorted({type(e).__name__ for e in model.experts})
        if device_map in ("auto", "balanced", "sequential"):
            device_map = infer_auto_device_map(model, no_split_module_classes=no_split, dtype=model.dtype)
        return dispatch_model(model, device_map=device_map)
    return model.to(device) if device is not None else model


def build_from_config(config: SphinxConfig, load_weights: bool = False
                      ) -> tuple[SphinxForCausalLM, SphinxProcessor]:
    """A fresh model from a config; `load_weights` pulls the LLM and experts' pretrained weights."""
    tok_source = config.tokenizer or config.llm.name_or_path
    if not tok_source:
        raise ValueError("config names no tokenizer (set `tokenizer` or `llm.name_or_path`)")
    tokenizer = load_tokenizer(tok_source, trust_remote_code=config.llm.trust_remote_code)
    model = SphinxForCausalLM(config, load_weights=load_weights)
    if model.llm.config.vocab_size < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM's vocabulary is "
                         f"{model.llm.config.vocab_size}")
    return model, SphinxProcessor(config, tokenizer)


def load_model(spec: str | Path, device: str | torch.device | None = None, dtype: str | None = None
               ) -> tuple[SphinxForCausalLM, SphinxProcessor]:
    """A preset name (weights from the hub where the preset names them), a folder, or a hub id."""
    from .config import list_presets, get_preset

    if str(spec) in list_presets() and not Path(spec).exists():
        config = get_preset(str(spec))
        if dtype is not None:
            config = config.replace(llm={**config.llm.__dict__, "dtype": dtype})
        model, processor = build_from_config(config, load_weights=config.llm.name_or_path is not None)
        return (model.to(device) if device is not None else model).eval(), processor
    return from_pretrained(spec, device=device, dtype=dtype)
