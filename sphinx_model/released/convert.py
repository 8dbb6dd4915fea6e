"""Released LLaMA2-Accessory SPHINX folders <-> our checkpoint format.

A released folder holds `consolidated.NN-of-MM.model.pth` (Megatron-style tensor-parallel
shards, each `{"model": state_dict}` with keys under `llma.`), `config.json` (the LLM's
ModelArgs), `meta.json` (`{"llama_type": ...}`) and a SentencePiece `tokenizer.model`.

    convert_accessory(src, dst)            released folder -> checkpoint.save_pretrained folder
    export_accessory(model, spm, dst, n)   our model -> released layout (export.py)

What conversion does, in order: merge the shards (split dims below), map LLaMA names to
transformers names with the rotary row permutation of wq/wk (Meta's interleaved pairs ->
HF's rotate-half halves), map Mixtral's packed expert tensors, hand each visual expert its
keys (`VisualExpert.map_released_state_dict`), pass the projector and start/end embeddings
through, and refuse when a released key has no place or one of our keys gets no tensor.

Released Mixtral experts (LLaMA2-Accessory `mixtral_sparse*`): `feed_forward.w1`, `w2`, `w3`
are each (num_experts * ffn, dim) with expert e in rows [e*ffn, (e+1)*ffn); w1/w3 act as
`x @ w.T` (gate / up), w2 as `h @ w2` (so it is down_proj transposed). Shards split each
expert's ffn rows. transformers 5 keeps `mlp.experts.gate_up_proj` (E, 2*ffn, dim) = [w1; w3]
per expert and `mlp.experts.down_proj` (E, dim, ffn).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import SphinxConfig, get_preset
from ..experts import get_expert_class
from ..loading.checkpoint import CheckpointError, save_pretrained
from ..modeling import DTYPES, SphinxForCausalLM
from ..processor import SphinxProcessor
from ..tokenizer import load_tokenizer, sentencepiece_tokenizer
from .shards import (_MOE_EXPERTS, PREFIX, SHARD_RE, find_shards, load_shard, merge_shards,  # noqa: F401
                     model_arg, read_json_object, split_dim)



@dataclass(frozen=True)
class ReleasedType:
    """How one released `llama_type` maps onto our configs."""

    base_preset: str                     # supplies experts, canvas, grid, anchor, template


RELEASED_TYPES: dict[str, ReleasedType] = {
    "llama_ens_light": ReleasedType("sphinx-tiny"),              # SPHINX-Tiny
    "llama_ens5_light": ReleasedType("sphinx-tiny-1k"),          # SPHINX-Tiny-1k
    "llama_ens": ReleasedType("sphinx"),                         # SPHINX
    "llama_ens5": ReleasedType("sphinx-1k"),                     # SPHINX-1k, SPHINX-v2-1k
    "mixtral_sparse_ens": ReleasedType("sphinx-moe-released"),   # SPHINX-MoE
    "mixtral_sparse_ens5": ReleasedType("sphinx-moe-1k"),        # SPHINX-MoE-1k
}

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^llm\.model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {  # released layer suffix -> transformers layer suffix (Llama and Mixtral)
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.gate.weight": "mlp.gate.weight",
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


@dataclass
class ConversionReport:
    mapped: int                                      # tensors written
    unmapped: list[str] = field(default_factory=list)  # released keys with no place in our model
    missing: list[str] = field(default_factory=list)   # our keys that got no (fitting) tensor
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"mapped {self.mapped} tensors, {len(self.unmapped)} unmapped, {len(self.missing)} missing"]
        out += [f"unmapped: {k}" for k in self.unmapped] + [f"missing: {k}" for k in self.missing]
        return out + [f"note: {n}" for n in self.notes]


# --- rotary layout -------------------------------------------------------------------------
def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows (pairs 2i, 2i+1) -> HF's halves (i, i + head_dim/2), per head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_rotary`."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# --- the LLM --------------------------------------------------------------------------------
def llm_config(args: dict[str, Any], sd: dict[str, torch.Tensor], notes: list[str], min_positions: int = 4096
               ) -> dict[str, Any]:
    """transformers Llama/Mixtral config dict from Accessory ModelArgs + tensor shapes."""
    moe = "layers.0.feed_forward.gate.weight" in sd
    need = ["layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
            "layers.0.feed_forward.w1" if moe else "layers.0.feed_forward.w1.weight"]
    if absent := [PREFIX + k for k in need if k not in sd]:
        raise CheckpointError(f"the checkpoint lacks {', '.join(absent)}; cannot read the LLM's dimensions")
    if sd["tok_embeddings.weight"].dim() != 2:
        raise CheckpointError(f"{PREFIX}tok_embeddings.weight is not a matrix")
    vocab, dim = sd["tok_embeddings.weight"].shape
    layers = 1 + max(int(m[1]) for k in sd if (m := _LAYER.match(k)))
    if "n_heads" not in args:
        raise CheckpointError("config.json gives no n_heads (the head count cannot be read off the tensors)")
    n_heads = model_arg(args, "n_heads", int)
    n_kv = model_arg(args, "n_kv_heads", int) or n_heads
    if n_heads < 1 or n_kv < 1 or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise CheckpointError(f"config.json's head counts are impossible for dim {dim}: n_heads {n_heads}, "
                              f"n_kv_heads {n_kv} (need n_heads dividing dim into an even head size, "
                              "and n_kv_heads dividing n_heads)")
    head_dim = dim // n_heads
    wq, wk = sd["layers.0.attention.wq.weight"], sd["layers.0.attention.wk.weight"]
    if tuple(wq.shape) != (n_heads * head_dim, dim) or tuple(wk.shape) != (n_kv * head_dim, dim):
        raise CheckpointError(f"attention shapes wq {tuple(wq.shape)} / wk {tuple(wk.shape)} do not fit "
                              f"dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv}")
    for key, value in (("dim", dim), ("n_layers", layers)):
        if args.get(key) is not None and model_arg(args, key, int) != value:
            raise CheckpointError(f"config.json says {key}={args[key]} but the tensors give {value}")
    theta = model_arg(args, "rope_theta", float)
    if theta is None:  # the authors' ModelArgs defaults: llama 1e4, mixtral_sparse 1e6
        theta = 1e6 if moe else 1e4
        notes.append(f"config.json gives no rope_theta; using {theta:g}")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if model_arg(args, "rope_scaling", float):  # Accessory: a float, linear position interpolation
        rope.update(rope_type="linear", factor=model_arg(args, "rope_scaling", float))
    norm_eps = model_arg(args, "norm_eps", float)
    cfg: dict[str, Any] = dict(
        model_type="llama", hidden_size=dim, num_hidden_layers=layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv, head_dim=head_dim, vocab_size=vocab,
        rms_norm_eps=1e-5 if norm_eps is None else norm_eps,
        rope_parameters=rope, max_position_embeddings=max(model_arg(args, "max_seq_len", int) or 0, min_positions),
        tie_word_embeddings=False, hidden_act="silu")
    if not moe:
        return {**cfg, "intermediate_size": sd["layers.0.feed_forward.w1.weight"].shape[0],
                "attention_bias": False, "mlp_bias": False}
    experts = sd["layers.0.feed_forward.gate.weight"].shape[0]
    moe_args = args.get("moe") or {}
    if not isinstance(moe_args, dict):
        raise CheckpointError(f"config.json's 'moe' must be an object, got {type(moe_args).__name__}")
    if (model_arg(moe_args, "num_experts", int) or experts) != experts:
        raise CheckpointError(f"config.json says {moe_args['num_experts']} experts but the router has {experts}")
    per_tok = model_arg(moe_args, "num_experts_per_tok", int) or 2
    if not 1 <= per_tok <= experts:
        raise CheckpointError(f"config.json's num_experts_per_tok {per_tok} is impossible with {experts} experts")
    return {**cfg, "model_type": "mixtral", "num_local_experts": experts, "num_experts_per_tok": per_tok,
            "intermediate_size": sd["layers.0.feed_forward.w1"].shape[0] // experts,
            "sliding_window": None, "output_router_logits": False, "router_jitter_noise": 0.0}


def map_llm(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Released LLM tensors -> `llm.*` keys; returns (mapped, released keys consumed)."""
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    heads = {"attention.wq.weight": cfg["num_attention_heads"], "attention.wk.weight": cfg["num_key_value_heads"]}
    for key, value in sd.items():
        layer = _LAYER.match(key)
        if key in _TOP_NAMES:
            mapped[f"llm.{_TOP_NAMES[key]}"] = value
        elif layer and layer[2] in _LAYER_NAMES:
            n = heads.get(layer[2])
            mapped[f"llm.model.layers.{layer[1]}.{_LAYER_NAMES[layer[2]]}"] = \
                permute_rotary(value, n) if n else value
        else:
            continue  # Mixtral experts below; anything else is not the LLM's
        used.add(key)
    for i in range(cfg["num_hidden_layers"] if cfg["model_type"] == "mixtral" else 0):
        names = [f"layers.{i}.feed_forward.{w}" for w in ("w1", "w2", "w3")]
        if all(n in sd for n in names):
            gate_up, down = _moe_to_hf(*(sd[n] for n in names), cfg, i)
            mapped[f"llm.model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up
            mapped[f"llm.model.layers.{i}.mlp.experts.down_proj"] = down
            used.update(names)
    return mapped, used


def _moe_to_hf(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, cfg: dict[str, Any], layer: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    e, f, d = cfg["num_local_experts"], cfg["intermediate_size"], cfg["hidden_size"]
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        if tuple(w.shape) != (e * f, d):
            raise CheckpointError(
                f"layers.{layer}.feed_forward.{name} has shape {tuple(w.shape)}; the converter assumes the "
                f"LLaMA2-Accessory mixtral_sparse layout (num_experts * ffn, dim) = ({e * f}, {d})")
    gate_up = torch.cat([w1.reshape(e, f, d), w3.reshape(e, f, d)], dim=1)  # (E, 2F, d)
    return gate_up, w2.reshape(e, f, d).transpose(1, 2).contiguous()        # (E, d, F)


def map_experts(sd: dict[str, torch.Tensor], config: SphinxConfig
                ) -> tuple[dict[str, torch.Tensor], set[str], list[str]]:
    """Each expert maps its own prefix; returns (mapped, consumed, known-unused released keys)."""
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    ignored: list[str] = []
    for ecfg in config.experts:
        cls = get_expert_class(ecfg.kind)
        pre = f"{ecfg.key}."
        own = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        got, rest = cls.map_released_state_dict(own)
        mapped.update({pre + k: v for k, v in got.items()})
        used.update(pre + k for k in own if k not in rest)
        ignored += [pre + k for k in rest if cls.is_unused_released_key(k)]
    return mapped, used | set(ignored), ignored


def glue_names(config: SphinxConfig) -> set[str]:
    """Released keys that pass through unchanged: the projectors and the start/end embeddings."""
    projectors = ["visual_proj"] + [f"{e.key}_proj" for e in config.experts if not get_expert_class(e.kind).fused]
    return {"start_img", "end_img"} | {f"{p}.{i}.{w}" for p in projectors for i in (0, 1) for w in ("weight", "bias")}


# --- conversion -----------------------------------------------------------------------------
def _resolve_base(llama_type: Any, base_preset: str | None, base_config: SphinxConfig | None) -> SphinxConfig:
    if llama_type is not None and not isinstance(llama_type, str):
        raise CheckpointError(f"meta.json's llama_type must be a string, got {type(llama_type).__name__}")
    if base_config is not None:
        return base_config
    released = RELEASED_TYPES.get(llama_type or "")
    name = base_preset or (released.base_preset if released else None)
    if name is None:
        raise CheckpointError(f"unknown llama_type {llama_type!r} in meta.json (known: {sorted(RELEASED_TYPES)}); "
                              "pass base_preset (--base-preset NAME)")
    try:
        return get_preset(name)
    except KeyError as e:
        raise CheckpointError(str(e.args[0])) from e


def _tokenizer(src: Path, base: SphinxConfig, notes: list[str]):
    """The release's tokenizer.model, run by sentencepiece itself (see tokenizer.SentencePieceTokenizer)."""
    model_file = src / "tokenizer.model"
    if not model_file.exists():
        if not base.tokenizer:
            raise CheckpointError(f"no tokenizer.model in {src}")
        notes.append(f"no tokenizer.model in the source; using the base preset's tokenizer {base.tokenizer!r}")
        return load_tokenizer(base.tokenizer)
    try:
        return sentencepiece_tokenizer(model_file)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _dtype_name(t: torch.Tensor) -> str:
    return next((n for n, d in DTYPES.items() if d == t.dtype), "float32")


def convert_accessory(src: str | Path, dst: str | Path, base_preset: str | None = None,
                      dtype: str | None = None, allow_unmapped: bool = False,
                      base_config: SphinxConfig | None = None, progress: bool = False) -> ConversionReport:
    """Convert a released LLaMA2-Accessory SPHINX folder into a `from_pretrained` folder.

    The vision side (experts, canvas, grid, template) comes from `base_config`, else the
    preset `base_preset`, else the preset of meta.json's `llama_type`; the LLM is read off
    config.json and the tensors. Refuses (CheckpointError, nothing written) when a released
    key has no place in our model or one of our tensors gets none, unless `allow_unmapped`;
    then the unfilled tensors keep their random init and the report lists them. `progress`
    shows a bar over the shards and the steps on stderr (a terminal only).
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    notes: list[str] = []
    say = _stage_printer(progress)
    paths = find_shards(src)
    meta, args = read_json_object(src / "meta.json"), read_json_object(src / "config.json")
    base = _resolve_base(meta.get("llama_type"), base_preset, base_config)
    sd = merge_shards([load_shard(p) for p in _bar(paths, progress, "reading shards")], notes)
    if "tok_embeddings.weight" not in sd:
        raise CheckpointError(f"{paths[0].name} holds no {PREFIX}tok_embeddings.weight: "
                              "not a LLaMA-family checkpoint")
    tokenizer = _tokenizer(src, base, notes)
    config = _converted_config(src.resolve().name, base, args, sd, tokenizer, dtype, notes)

    say(f"mapping {len(sd)} tensors onto {config.name} ({', '.join(e.kind for e in config.experts)})")
    state, unmapped = _map_all(sd, config, notes)
    model = _empty_model(config)
    own = model.state_dict()
    bad = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    unmapped += [f"{k} (shape {tuple(state[k].shape)}, ours {tuple(own[k].shape)})" for k in bad]
    unmapped += [f"{k} (mapped, but our model has no such tensor)" for k in sorted(set(state) - set(own))]
    state = {k: v for k, v in state.items() if k in own and k not in bad}
    report = ConversionReport(len(state), unmapped, sorted(set(own) - set(state)), notes)
    if (report.unmapped or report.missing) and not allow_unmapped:
        raise CheckpointError(_refusal(report))
    if report.missing:
        notes.append(f"{len(report.missing)} tensors of our model keep their random init")
        model = SphinxForCausalLM(config)
    _assign(model, state)
    say(f"writing {dst}")
    save_pretrained(model, SphinxProcessor(config, tokenizer), dst)
    _write_card(dst, src, meta.get("llama_type"), config, report)
    return report


def _stage_printer(progress: bool):
    """One line per conversion step on stderr, when asked for and stderr is a terminal."""
    show = progress and sys.stderr.isatty()
    return lambda text: print(text, file=sys.stderr, flush=True) if show else None


def _bar(items: list[Path], progress: bool, what: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, unit="shard", disable=None)  # disable=None: silent off a terminal


def _write_card(dst: Path, src: Path, llama_type: Any, config: SphinxConfig, report: ConversionReport) -> None:
    """A short model card, so a pushed folder says what it is and where it came from."""
    experts = ", ".join(f"{e.kind} `{e.model_name}` @ {e.image_size}px" for e in config.experts)
    text = (f"---\nlibrary_name: sphinx_model\ntags: [sphinx, multimodal, llama2-accessory]\n---\n\n"
            f"# {config.name}\n\nConverted from the released LLaMA2-Accessory folder `{src.resolve().name}` "
            f"(`llama_type` {llama_type!r}) with `python -m sphinx_model convert-accessory`; load it with "
            f"`sphinx_model.from_pretrained`. The weights are the authors' (see their license).\n\n"
            f"- LLM: {(config.llm.config or {}).get('model_type')}, {config.llm.dtype}\n- experts: {experts}\n"
            f"- canvas {config.canvas_size}, grid {config.grid}, {config.tokens_per_view} tokens per view\n"
            f"- conversion: {report.lines()[0]}\n")
    (dst / "README.md").write_text(text, encoding="utf-8")


def _converted_config(name: str, base: SphinxConfig, args: dict[str, Any], sd: dict[str, torch.Tensor],
                      tokenizer: Any, dtype: str | None, notes: list[str]) -> SphinxConfig:
    """The base preset's vision side + an explicit LLM config read off config.json and the tensors."""
    hf = llm_config(args, sd, notes, base.max_length)
    if len(tokenizer) > hf["vocab_size"]:
        raise CheckpointError(f"tokenizer.model has {len(tokenizer)} tokens but the embeddings "
                              f"only {hf['vocab_size']}")
    hf.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    llm = {**base.llm.__dict__, "name_or_path": None, "config": hf, "trust_remote_code": False,
           "dtype": dtype or _dtype_name(sd["tok_embeddings.weight"])}
    if hf["model_type"] == "mixtral" and args.get("load_balancing_weight") is not None:
        llm["router_aux_loss_coef"] = float(args["load_balancing_weight"])
    return base.replace(name=name, llm=llm, tokenizer=None, experts=_clip_activation(base, args, notes))


def _clip_activation(base: SphinxConfig, args: dict[str, Any], notes: list[str]) -> list[dict[str, Any]]:
    """config.json's `load_pretrained_visual_encoder: true` makes the authors' code build CLIP
    through open_clip's `openai` weights, whose config uses QuickGELU; false (or absent) builds
    it with `pretrained=None`, plain GELU. Our CLIP expert follows with its `quick_gelu` option."""
    flag = args.get("load_pretrained_visual_encoder", False)
    if not isinstance(flag, bool):
        raise CheckpointError(f"config.json's load_pretrained_visual_encoder must be true or false, got {flag!r}")
    experts = [dict(e.__dict__, options=dict(e.options)) for e in base.experts]
    for e in experts:
        if e["kind"] == "clip_vit":
            e["options"]["quick_gelu"] = flag
            if flag:
                notes.append("config.json: load_pretrained_visual_encoder is true: CLIP uses QuickGELU, "
                             "as open_clip's openai weights do")
    return experts


def _map_all(sd: dict[str, torch.Tensor], config: SphinxConfig, notes: list[str]
             ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All released tensors -> our keys; returns (state, released keys that found no place)."""
    state, used = map_llm(sd, config.llm.config or {})
    expert_state, expert_used, ignored = map_experts(sd, config)
    passing = glue_names(config)
    glue = {k: v for k, v in sd.items() if k in passing}
    state.update(expert_state)
    state.update(glue)
    used |= expert_used | set(glue)
    if ignored:
        notes.append(f"ignored released keys the experts do not use: {', '.join(PREFIX + k for k in ignored)}")
    return state, sorted(PREFIX + k for k in sd if k not in used)


def _refusal(report: ConversionReport) -> str:
    def shown(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    parts = []
    if report.unmapped:
        parts.append(f"{len(report.unmapped)} released keys have no place in this model: {shown(report.unmapped)}")
    if report.missing:
        parts.append(f"{len(report.missing)} of our tensors get no released tensor: {shown(report.missing)}")
    parts.append("pass allow_unmapped=True (--allow-unmapped) to convert anyway")
    return "refusing to convert: " + "; ".join(parts)


def _empty_model(config: SphinxConfig) -> SphinxForCausalLM:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return SphinxForCausalLM(config, load_weights=False)


def _assign(model: SphinxForCausalLM, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False, assign=True)
    for key in model.expert_keys:
        getattr(model, key).requires_grad_(False)

