"""Our model -> the released LLaMA2-Accessory layout (the inverse of convert_accessory).

Used by the tests to write released-layout checkpoints at tiny dimensions, and by users
who want to go back to the authors' code: the same key names, rotary layout and
tensor-parallel split rules as `convert_accessory` reads.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..experts import get_expert_class
from ..modeling import SphinxForCausalLM
from .convert import (_HF_LAYER, _LAYER_NAMES, _MOE_EXPERTS, _TOP_NAMES, PREFIX, glue_names, split_dim,
                      unpermute_rotary)


def export_accessory(model: SphinxForCausalLM, tokenizer_model: str | Path | None, dst: str | Path,
                     num_shards: int = 1, llama_type: str = "llama_ens_light") -> Path:
    """Write `model` in the released layout: `num_shards` tensor-parallel shards + config/meta json."""
    if model.config.llm.quantize:
        raise ValueError(f"the released layout holds full-precision weights; this model is quantised "
                         f"({model.config.llm.quantize}): export the model it was quantised from")
    if model.skip_img is not None:
        raise ValueError("the released layout has no skip token; export a model with skip_tokens=False")
    hf = model.llm.config
    released, args, state = _released_llm(model), _released_args(hf), model.state_dict()
    for ecfg in model.config.experts:
        own = {k[len(ecfg.key) + 1:]: v for k, v in state.items() if k.startswith(ecfg.key + ".")}
        cls = get_expert_class(ecfg.kind)
        back = getattr(cls, "to_released_state_dict", None)
        out = back(own) if back else own  # renaming experts must provide the inverse
        if set(cls.map_released_state_dict(out)[0]) != set(own):
            raise ValueError(f"cannot export expert {ecfg.key!r}: {cls.__name__} has no to_released_state_dict")
        released.update({f"{ecfg.key}.{k}": v for k, v in out.items()})
    for name in sorted(glue_names(model.config)):  # projectors (the Q-Former's too) and start/end
        released[name] = state[name]
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    experts = args.get("moe", {}).get("num_experts", 0)
    for rank in range(num_shards):
        shard = {PREFIX + k: _shard_of(k, v, rank, num_shards, experts) for k, v in released.items()}
        torch.save({"model": shard}, dst / f"consolidated.{rank:02d}-of-{num_shards:02d}.model.pth")
    (dst / "config.json").write_text(json.dumps(args, indent=2) + "\n", encoding="utf-8")
    (dst / "meta.json").write_text(json.dumps({"llama_type": llama_type}) + "\n", encoding="utf-8")
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, dst / "tokenizer.model")
    return dst


def _released_llm(model: SphinxForCausalLM) -> dict[str, torch.Tensor]:
    hf = model.llm.config
    to_released = {f"llm.{v}": k for k, v in _TOP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    heads = {"q_proj": hf.num_attention_heads, "k_proj": hf.num_key_value_heads}
    back = {v: k for k, v in _LAYER_NAMES.items()}
    for key, value in model.state_dict().items():
        if key in to_released:
            out[to_released[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if not m:
            continue
        proj = m[2].split(".")[1] if m[2].startswith("self_attn.") else ""
        if m[2] in back:
            out[f"layers.{m[1]}.{back[m[2]]}"] = unpermute_rotary(value, heads[proj]) if proj in heads else value
        elif m[2] == "mlp.experts.gate_up_proj":  # (E, 2F, d) -> w1, w3 (E*F, d)
            w1, w3 = value.chunk(2, dim=1)
            out[f"layers.{m[1]}.feed_forward.w1"] = w1.flatten(0, 1)
            out[f"layers.{m[1]}.feed_forward.w3"] = w3.flatten(0, 1)
        elif m[2] == "mlp.experts.down_proj":     # (E, d, F) -> w2 (E*F, d)
            out[f"layers.{m[1]}.feed_forward.w2"] = value.transpose(1, 2).flatten(0, 1)
        else:
            raise ValueError(f"no released name for {key}")
    return out


def _released_args(hf: Any) -> dict[str, Any]:
    rope = getattr(hf, "rope_parameters", None) or {}
    args: dict[str, Any] = {"dim": hf.hidden_size, "n_layers": hf.num_hidden_layers,
                            "n_heads": hf.num_attention_heads, "n_kv_heads": hf.num_key_value_heads, "vocab_size": hf.vocab_size,
                            "norm_eps": hf.rms_norm_eps, "rope_theta": rope.get("rope_theta", 10000.0)}
    if hf.model_type == "llama":  # Meta's FFN-size formula then gives exactly intermediate_size
        f = hf.intermediate_size
        args.update(multiple_of=f, ffn_dim_multiplier=f / int(2 * 4 * hf.hidden_size / 3))
    if hf.model_type == "mixtral":
        args.update(hidden_dim=hf.intermediate_size, head_dim=hf.head_dim,
                    moe={"num_experts": hf.num_local_experts, "num_experts_per_tok": hf.num_experts_per_tok})
    return args


def _shard_of(key: str, value: torch.Tensor, rank: int, n: int, experts: int) -> torch.Tensor:
    if n == 1:
        return value
    if _MOE_EXPERTS.match(key):
        return value.reshape(experts, -1, value.shape[-1]).chunk(n, dim=1)[rank].flatten(0, 1).clone()
    dim = split_dim(key)
    if dim is None:
        return value
    if value.shape[dim] % n:
        raise ValueError(f"{key} {tuple(value.shape)} does not split into {n} shards on dim {dim}")
    return value.chunk(n, dim=dim)[rank].clone()  # a view would save the whole storage
