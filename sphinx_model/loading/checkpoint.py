"""Our checkpoint format and `from_pretrained`.

A checkpoint is one folder:
  sphinx_config.json                       the SphinxConfig, with the LLM's full transformers config inlined
  model.safetensors | model-0000x-of-0000y.safetensors + model.safetensors.index.json
  tokenizer files                          (tokenizer.save_pretrained)

`from_pretrained` takes a local folder or a Hugging Face Hub repo id (downloaded through
huggingface_hub), or a name whose scheme a room registered (`released:NAME`, see schemes.py); the model is built on the meta device and the weights are assigned
directly, so a 13B model is never initialised twice.

Loading is the one checkpoint loader, and a checkpoint is data from elsewhere: every file it
names (its shard index's shards, and every entry of the folder) must resolve inside it
(symlinks out are refused; a hub snapshot's links into its repo's `blobs/` are inside), only
regular files are opened, and a corrupt, truncated or empty weight file, a config of the
wrong shape or a tokenizer that will not load is a `CheckpointError` with one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import CONFIG_FILE, ConfigError, SphinxConfig
from ..files import UnsafePathError, check_regular_file, inside, read_text
from ..modeling import SphinxForCausalLM, resolve_dtype
from ..processor import SphinxProcessor
from ..tokenizer import load_tokenizer
from .schemes import registered_schemes, resolver_for, scheme_of

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, is damaged, or does not fit its config."""


class DeviceError(ValueError):
    """A device that is malformed or not present on this machine."""


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """`device` checked: well-formed ("cpu", "cuda", "cuda:1", "mps", ...) and present here."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r} (expected cpu, cuda, cuda:N, mps, ...)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "mps":
        count = 1 if torch.backends.mps.is_available() else 0
    else:
        backend = getattr(torch, dev.type, None)
        ok = backend is not None and hasattr(backend, "is_available") and backend.is_available()
        count = backend.device_count() if ok and hasattr(backend, "device_count") else int(ok)
    if not count:
        raise DeviceError(f"device {str(device)!r} is not available on this machine")
    if dev.index is not None and dev.index >= count:
        raise DeviceError(f"device {str(device)!r} does not exist: this machine has {count} {dev.type} device(s)")
    return dev


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
    return _locate(name_or_path)[0]


def read_weights(name_or_path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint of ours (one file or shards), on the CPU, by state-dict key."""
    folder, root = _locate(name_or_path)
    return _read_weights(_weight_files(folder, root))


def _locate(name_or_path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, the root its files must resolve into)."""
    scheme = scheme_of(name_or_path)
    if scheme is not None:  # e.g. released:NAME -> its converted folder in the cache
        resolver = resolver_for(scheme)
        if resolver is None:
            known = ", ".join(registered_schemes()) or "none"
            raise CheckpointError(f"{name_or_path!r}: no resolver is registered for {scheme!r} (registered: "
                                  f"{known}); `import sphinx_model.released` registers released:NAME, as the CLI, "
                                  "the app and `sphinx_model.from_pretrained` do")
        folder = resolver(str(name_or_path))
        return folder, folder
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / CONFIG_FILE).exists():
            raise CheckpointError(f"{path} is a folder but not a SPHINX checkpoint (no {CONFIG_FILE}); "
                                  "for released LLaMA2-Accessory folders run "
                                  "`python -m sphinx_model convert-accessory SRC DST` first")
        return path, path
    if path.exists():
        raise CheckpointError(f"{path} is a file; a checkpoint is a folder")
    try:
        folder = Path(snapshot_download(str(name_or_path)))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise CheckpointError(f"{name_or_path!r} is not a local folder and is not in the Hugging Face cache; "
                              "downloading is impossible (offline: HF_HUB_OFFLINE=1 or no network). "
                              "Pass a local checkpoint folder or a preset name.") from e
    except (HFValidationError, ValueError) as e:
        raise CheckpointError(f"{name_or_path!r} is neither a local folder nor a valid hub repo id") from e
    # a cache snapshot's files are links into the repo's blobs/: the repo folder is the root
    return folder, folder.parent.parent if folder.parent.name == "snapshots" else folder


def _checked(root: Path, folder: Path, name: str) -> Path:
    """A file the checkpoint names: inside it and a regular file, or CheckpointError."""
    try:
        return check_regular_file(inside(root, name, folder, what="checkpoint file"), "checkpoint file")
    except UnsafePathError as e:
        raise CheckpointError(str(e)) from e
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} names {name!r}, which does not exist") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {name!r} in {folder}: {e.strerror or e}") from e


def _check_folder(folder: Path, root: Path) -> None:
    """Every entry of the checkpoint folder resolves inside it, and every file is a regular one
    (the tokenizer's files are read by name, so a planted link or FIFO is refused here)."""
    for entry in sorted(folder.iterdir()):
        try:
            inside(root, entry.name, folder, what="checkpoint file")
            if not entry.is_dir():
                check_regular_file(entry, "checkpoint file")
        except UnsafePathError as e:
            raise CheckpointError(str(e)) from e
        except OSError as e:  # e.g. a dangling link
            raise CheckpointError(f"{entry.name!r} in {folder} cannot be read: {e.strerror or e}") from e


def _weight_files(folder: Path, root: Path | None = None) -> list[Path]:
    root = folder if root is None else root
    if (folder / INDEX_NAME).exists():
        index_path = _checked(root, folder, INDEX_NAME)
        try:
            index = json.loads(read_text(index_path, "shard index", max_bytes=64 << 20))
        except (json.JSONDecodeError, RecursionError, UnsafePathError) as e:
            raise CheckpointError(f"{INDEX_NAME} in {folder} is not a valid shard index ({e})") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{INDEX_NAME} in {folder} needs a 'weight_map' object of tensor name -> file name")
        return [_checked(root, folder, name) for name in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_NAME).exists() or (folder / WEIGHTS_NAME).is_symlink():
        return [_checked(root, folder, WEIGHTS_NAME)]
    raise CheckpointError(f"no weights in {folder} (expected {WEIGHTS_NAME} or {INDEX_NAME})")


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            detail = " ".join(str(e).split())[:200]
            raise CheckpointError(f"{f.name} is not a readable safetensors file (empty, truncated or corrupt: "
                                  f"{detail})") from e
    return state


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
                    dtype: str | None = None, quantize: str | None = None,
                    device_map: str | dict[str, Any] | None = None, max_memory: str | dict[Any, str] | None = None,
                    **config_overrides: Any) -> tuple[SphinxForCausalLM, SphinxProcessor]:
    """Load (model, processor) from a checkpoint folder, a hub repo id or `released:NAME`.

    `dtype` ("bfloat16", ...) and `config_overrides` (e.g. skip_tokens=False) adjust the
    stored config. `quantize` ("8bit" / "4bit") quantises the LLM's linear layers with
    bitsandbytes (the experts and projectors stay in `dtype`, bf16 by default); a checkpoint
    saved quantised loads quantised. `device_map` ("auto", or the stored `llm.device_map`)
    spreads the model over the GPUs and the CPU within `max_memory` (see placement.py).
    """
    from accelerate import init_empty_weights

    from .placement import parse_max_memory
    from .quantize import check_mode

    device, mode = resolve_device(device), check_mode(quantize)
    max_memory = parse_max_memory(max_memory)
    folder, root = _locate(name_or_path)
    _check_folder(folder, root)
    _checked(root, folder, CONFIG_FILE)
    try:
        config = SphinxConfig.load(folder)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    stored = config.llm.quantize
    if mode and stored and mode != stored:
        raise CheckpointError(f"{folder} is stored quantised to {stored}; it cannot be loaded as {mode}")
    mode = mode or stored
    if dtype is None and mode and config.llm.dtype == "float32":
        dtype = "bfloat16"  # quantised models compute in bf16; experts and projectors follow
    if dtype is not None:
        resolve_dtype(dtype)
        config = config.replace(llm={**config.llm.__dict__, "dtype": dtype})
    if config_overrides:
        config = config.replace(**config_overrides)
    files = _weight_files(folder, root)
    try:
        with init_empty_weights():
            model = SphinxForCausalLM(config, load_weights=False)
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"the config in {folder} does not build a model: {' '.join(str(e).split())[:300]}") from e
    model = _load_and_place(model, _read_weights(files), device, mode, stored,
                            device_map or config.llm.device_map, max_memory)
    try:
        tokenizer = load_tokenizer(str(folder), trust_remote_code=config.llm.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception for a damaged tokenizer.json
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {' '.join(str(e).split())[:200]}") from e
    return model.eval(), SphinxProcessor(model.config, tokenizer)


def _load_and_place(model: SphinxForCausalLM, state: dict[str, torch.Tensor], device: torch.device | None,
                    mode: str | None, stored: str | None, device_map: Any, max_memory: dict[Any, str] | None
                    ) -> SphinxForCausalLM:
    """Weights into the meta-device model, quantised if asked, each part on its device."""
    from .placement import device_lookup, place, plan_device_map
    from .quantize import special_dtypes

    try:
        plan = plan_device_map(model, device_map, max_memory, special_dtypes(model, mode) if mode else None) \
            if device_map else None
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if stored:
        _load_quantized(model, state, stored, device_lookup(plan, device, "llm."))
    else:
        load_weights_into(model, state)
        if mode:
            quantize_model(model, mode, device_lookup(plan, device, "llm."))
    return place(model, device, plan)


def quantize_model(model: SphinxForCausalLM, mode: str, device_of: Any = None) -> SphinxForCausalLM:
    """Quantise a loaded model's LLM in place (bitsandbytes; experts and projectors untouched);
    `device_of(name inside the LLM)` says where each layer is quantised (default: CPU)."""
    from .placement import device_lookup
    from .quantize import check_mode, quantize_llm

    check_mode(mode)
    if model.config.llm.quantize:
        raise ValueError(f"the model is already quantised ({model.config.llm.quantize})")
    quantize_llm(model.llm, mode, model.dtype, device_of or device_lookup(None, None))
    model.config = model.config.replace(llm={**model.config.llm.__dict__, "quantize": mode})
    return model


def _load_quantized(model: SphinxForCausalLM, state: dict[str, torch.Tensor], mode: str, device_of: Any) -> None:
    """A checkpoint saved quantised: bitsandbytes modules filled from their saved statistics."""
    from .quantize import load_quantized_state, swap_modules

    swap_modules(model.llm, mode, model.dtype)
    llm_state = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
    try:
        rest = load_quantized_state(model.llm, llm_state, device_of)
    except (KeyError, ValueError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"the quantised weights do not fit the config ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from e
    rest = {**{f"llm.{k}": v for k, v in rest.items()}, **{k: v for k, v in state.items() if not k.startswith("llm.")}}
    empty = {k for k, v in model.state_dict().items() if v.is_meta}
    if set(rest) != empty:
        raise CheckpointError(f"checkpoint does not fit the config: missing {sorted(empty - set(rest))[:8]}, "
                              f"unexpected {sorted(set(rest) - empty)[:8]}")
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in rest.items()}, strict=False, assign=True)
    for key in model.expert_keys:
        getattr(model, key).requires_grad_(False)


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


def load_model(spec: str | Path, device: str | torch.device | None = None, dtype: str | None = None,
               quantize: str | None = None, device_map: str | dict[str, Any] | None = None,
               max_memory: str | dict[Any, str] | None = None) -> tuple[SphinxForCausalLM, SphinxProcessor]:
    """A preset name (weights from the hub where the preset names them), a folder, a hub id, or
    `released:NAME`; `quantize`, `device_map` and `max_memory` as in `from_pretrained`."""
    from ..config import get_preset, list_presets
    from .placement import parse_max_memory
    from .quantize import check_mode

    device = resolve_device(device)
    if str(spec) in list_presets() and not Path(spec).exists():
        check_mode(quantize)
        parse_max_memory(max_memory)
        config = get_preset(str(spec))
        dtype = dtype or ("bfloat16" if quantize and config.llm.dtype == "float32" else None)
        if dtype is not None:
            config = config.replace(llm={**config.llm.__dict__, "dtype": dtype})
        model, processor = build_from_config(config, load_weights=config.llm.name_or_path is not None)
        if quantize:
            quantize_model(model, quantize)
            processor = SphinxProcessor(model.config, processor.tokenizer)
        return (model.to(device) if device is not None else model).eval(), processor
    return from_pretrained(spec, device=device, dtype=dtype, quantize=quantize, device_map=device_map,
                           max_memory=max_memory)
