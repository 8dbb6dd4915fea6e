"""bitsandbytes quantisation of the LLM: `quantize="8bit" | "4bit"`, everything else stays as it is.

Only the LLM's linear layers are quantised (attention and MLP projections, and Mixtral's
experts; `lm_head` and the embeddings stay in the model's dtype, as transformers leaves them),
the visual experts and projectors are untouched, and image features reach the LLM in its
embeddings' dtype (modeling.embed_inputs). 4-bit is NF4 with double quantisation and the
model's dtype (bf16 by default) as compute dtype; 8-bit is LLM.int8 (threshold 6). The
released authors quantise the same way and leave the same vision prefixes alone.

bitsandbytes quantises `nn.Linear` only, and transformers 5 stores MoE experts fused as 3-D
tensors (`gate_up_proj` (E, 2I, D), `down_proj` (E, D, I)). `QuantizedExperts` holds them as
one bitsandbytes linear per expert and projection, and routes exactly as the fused module.

A quantised model saves as a normal checkpoint (`llm.quantize` in its config, bitsandbytes'
own state-dict entries beside each weight) and loads back bit for bit (`load_quantized_state`).
bitsandbytes runs on the CPU too (slowly), so the tests exercise the path GPU users take.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import QUANTIZE_NAMES as QUANTIZE_MODES  # the config validates the same names

SKIP_MODULES = ("lm_head",)        # kept in the model's dtype, as transformers' bitsandbytes loading does
INT8_THRESHOLD = 6.0               # LLM.int8 outlier threshold (transformers' default)
NF4_BLOCK = 64                     # NF4 block size; double quantisation packs its absmax again per 256 blocks


def check_mode(mode: str | None) -> str | None:
    """`mode` if it names a quantisation (or is None), else a ValueError naming the choices."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantisation {mode!r}; use one of {list(QUANTIZE_MODES)}")
    return mode


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:  # a requirement; say what to install rather than fail deep inside
        raise ValueError("quantisation needs bitsandbytes: pip install bitsandbytes") from e
    return bitsandbytes


def bytes_per_weight(mode: str | None, dtype_bytes: int = 2) -> float:
    """Storage of one quantised weight: NF4 + double-quantised absmax, int8 (+ a row scale, ~0)."""
    if mode == "4bit":
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)
    if mode == "8bit":
        return 1.0
    return float(dtype_bytes)


# --- which tensors are quantised -----------------------------------------------------------------
def quantized_linears(llm: nn.Module) -> list[str]:
    """Names (inside the LLM) of the plain linear layers that quantisation replaces."""
    return [name for name, m in llm.named_modules()
            if type(m) is nn.Linear and name.split(".")[-1] not in SKIP_MODULES]


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's fused MoE experts: 3-D `gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I)."""
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == down.dim() == 3
            and up.shape[0] == down.shape[0] and up.shape[1] == 2 * down.shape[2] and up.shape[2] == down.shape[1]
            and hasattr(module, "act_fn"))


def quantized_weight_names(llm: nn.Module) -> list[str]:
    """Every weight of a not-yet-quantised LLM that quantisation stores in 4 or 8 bits."""
    names = [f"{n}.weight" for n in quantized_linears(llm)]
    return names + [f"{n}.{p}" for n, m in llm.named_modules() if is_fused_experts(m)
                    for p in ("gate_up_proj", "down_proj")]


# --- the modules ---------------------------------------------------------------------------------
def new_linear(in_features: int, out_features: int, bias: bool, mode: str, compute_dtype: torch.dtype,
               device: str | torch.device = "meta") -> nn.Module:
    """An empty bitsandbytes linear layer (weights arrive later) for `mode`."""
    bnb = _bnb()
    if mode == "4bit":
        return bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                 compress_statistics=True, quant_type="nf4", device=device)
    _quiet_int8_cast_notice()
    return bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False,
                               threshold=INT8_THRESHOLD, device=device)


class _Int8CastNotice(logging.Filter):
    """LLM.int8 always multiplies in fp16; bitsandbytes logs that on every forward of a bf16 model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "MatMul8bitLt: inputs will be cast" not in str(record.msg)


def _quiet_int8_cast_notice() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in log.filters):
        log.addFilter(_Int8CastNotice())


def quantize_weight(module: nn.Module, weight: torch.Tensor, device: torch.device) -> None:
    """Give a bitsandbytes linear its full-precision `weight`, quantised on `device`."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        param = bnb.nn.Params4bit(weight.detach().to("cpu").contiguous(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True, blocksize=NF4_BLOCK, module=module)
    else:
        param = bnb.nn.Int8Params(weight.detach().to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False)
    module.weight = param.to(device)  # bitsandbytes quantises when the weight moves to a device


class QuantizedExperts(nn.Module):
    """Fused MoE experts as bitsandbytes linears: `gate_up[e]` (D -> 2I) and `down[e]` (I -> D).

    Routing as transformers' fused module: each token's top-k experts compute
    `act(gate) * up` from `gate_up` (gate half first), project with `down`, and add up
    weighted by the router's top-k weights.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: Callable, mode: str,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts, self.act_fn = num_experts, act_fn
        self.gate_up = nn.ModuleList(new_linear(hidden, 2 * intermediate, False, mode, compute_dtype)
                                     for _ in range(num_experts))
        self.down = nn.ModuleList(new_linear(intermediate, hidden, False, mode, compute_dtype)
                                  for _ in range(num_experts))

    @classmethod
    def empty_like(cls, fused: nn.Module, mode: str, compute_dtype: torch.dtype) -> "QuantizedExperts":
        e, two_i, d = fused.gate_up_proj.shape
        return cls(e, d, two_i // 2, fused.act_fn, mode, compute_dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)                              # (T, D)
        for e in top_k_index.unique().tolist():
            tokens, slot = torch.where(top_k_index == e)                   # the tokens routed to e
            gate, up = self.gate_up[e](hidden_states[tokens]).chunk(2, dim=-1)   # (t, I) each
            y = self.down[e](self.act_fn(gate) * up)                       # (t, D)
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def swap_modules(llm: nn.Module, mode: str, compute_dtype: torch.dtype,
                 fill: Callable[[nn.Module, nn.Module], None] | None = None) -> None:
    """Replace the LLM's quantisable modules by empty bitsandbytes ones; `fill(old, new)` may
    hand each new module its weights (else they stay on the meta device, for loading)."""
    for name in quantized_linears(llm):
        old = llm.get_submodule(name)
        new = new_linear(old.in_features, old.out_features, old.bias is not None, mode, compute_dtype)
        if fill is not None:
            fill(old, new)
        _replace(llm, name, new)
    for name in [n for n, m in llm.named_modules() if is_fused_experts(m)]:
        old = llm.get_submodule(name)
        new = QuantizedExperts.empty_like(old, mode, compute_dtype)
        if fill is not None:
            fill(old, new)
        _replace(llm, name, new)


def quantize_llm(llm: nn.Module, mode: str, compute_dtype: torch.dtype,
                 device_of: Callable[[str], torch.device]) -> None:
    """Quantise a loaded full-precision LLM in place; `device_of(module name)` says where each
    quantised layer goes (quantisation happens there, layer by layer)."""
    check_mode(mode)
    names = {id(m): n for n, m in llm.named_modules()}

    def fill(old: nn.Module, new: nn.Module) -> None:
        device = device_of(names[id(old)])
        if isinstance(new, QuantizedExperts):
            down = old.down_proj.detach()
            for e, up in enumerate(old.gate_up_proj.detach()):
                quantize_weight(new.gate_up[e], up, device)
                quantize_weight(new.down[e], down[e], device)
            return
        quantize_weight(new, old.weight, device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)

    swap_modules(llm, mode, compute_dtype, fill)


# --- loading a quantised checkpoint ---------------------------------------------------------------
def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor],
                         device_of: Callable[[str], torch.device]) -> dict[str, torch.Tensor]:
    """Put the saved bitsandbytes weights (and their statistics) into the empty bitsandbytes
    modules of `model`; returns the rest of `state` for the ordinary loader. Raises KeyError
    naming a quantised weight the state lacks."""
    bnb = _bnb()
    rest = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        device = device_of(name)
        weight = rest.pop(f"{name}.weight")
        if isinstance(module, bnb.nn.Linear4bit):
            prefix = f"{name}.weight."
            stats = {k[len(prefix):]: rest.pop(k) for k in [k for k in rest if k.startswith(prefix)]}
            module.weight = bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=stats,
                                                                requires_grad=False, device=device, module=module)
        else:
            rest.pop(f"{name}.weight_format", None)
            param = bnb.nn.Int8Params(weight.to(device), requires_grad=False, has_fp16_weights=False)
            param.CB, param.SCB = param.data, rest.pop(f"{name}.SCB").to(device)
            module.weight = param
        if module.bias is not None and f"{name}.bias" in rest:
            module.bias = nn.Parameter(rest.pop(f"{name}.bias").to(device), requires_grad=False)
    return rest


def is_quantized(module: nn.Module) -> bool:
    """Whether any bitsandbytes layer sits in `module`."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in module.modules())


def special_dtypes(model: nn.Module, mode: str, prefix: str = "llm.") -> dict[str, Any]:
    """accelerate `special_dtypes` for the weights quantisation will shrink (device-map planning)."""
    from accelerate.utils import CustomDtype

    small = CustomDtype.INT4 if mode == "4bit" else torch.int8
    return {prefix + n: small for n in quantized_weight_names(model.llm)}
