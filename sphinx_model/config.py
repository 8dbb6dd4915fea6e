"""Typed, JSON-serialisable model config and the registry of named presets.

A config names everything needed to *build* a model: the LLM backbone (a hub id / local
folder, or an explicit transformers config for random init), the visual experts, the
canvas and grid, the padding anchor, whether padded sub-images become skip tokens, the
projector and the chat template. Building a config never downloads anything; weights
load only when a model is built with `load_weights=True`.

Presets are plain JSON files in `sphinx_model/presets/` (one per name).

Validation happens in one place for every caller (presets, checkpoints, `replace`, the CLI,
the trainer's overrides, direct construction): `from_dict` refuses anything but a JSON object
and unknown or missing fields at every level, and each config's `__post_init__` checks every
field's type against its annotation and its range, raising `ConfigError` with the field's
path (`llm.dtype: ...`).
"""
from __future__ import annotations

import dataclasses
import json
import keyword
import math
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .files import UnsafePathError, read_text
from .tiling import ANCHORS, Anchor, num_views

PRESET_DIR = Path(__file__).parent / "presets"
CONFIG_FILE = "sphinx_config.json"
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
PROJECTORS: tuple[str, ...] = ("linear_ln", "mlp_ln")
QUANTIZE_NAMES: tuple[str, ...] = ("8bit", "4bit")  # bitsandbytes modes (sphinx_model.loading.quantize)
MAX_CANVAS = 16384                  # pixels per side; the released models use 512 and 1024
RESERVED_KEYS = frozenset({"llm", "visual_proj", "start_img", "end_img", "skip_img", "canvas_pos", "config",
                           "expert_keys"})


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the field."""


@dataclass
class ExpertConfig:
    """One frozen visual expert, found by `kind` in the expert registry."""

    kind: str                      # registry name: "clip_convnext", "dinov2"
    model_name: str                # open_clip / timm architecture name
    image_size: int                # side of the square view this expert sees
    key: str                       # attribute / state-dict prefix, e.g. "openclip_convnext_xxl"
    pretrained: str | None = None  # open_clip tag or timm hub id; None = random init
    options: dict[str, Any] = field(default_factory=dict)  # architecture overrides (tiny test experts)

    def __post_init__(self) -> None:
        _check_types(self, "expert")
        _at_least(self.image_size, 1, "expert.image_size")
        if not self.key.isidentifier() or keyword.iskeyword(self.key) or self.key in RESERVED_KEYS:
            raise ConfigError(f"expert.key: {self.key!r} must be a Python identifier that names no other part "
                              f"of the model (not one of {sorted(RESERVED_KEYS)})")


@dataclass
class LLMConfig:
    """The causal LM backbone; any `AutoModelForCausalLM` that accepts `inputs_embeds`."""

    name_or_path: str | None = None        # hub id or local folder with weights
    config: dict[str, Any] | None = None   # explicit transformers config (random init); wins over the hub's
    trust_remote_code: bool = False        # InternLM2 ships its modeling code on the hub
    dtype: str = "float32"                 # "bfloat16" / "float16" on GPU
    attn_implementation: str | None = "sdpa"  # "sdpa", "eager", "flash_attention_2"
    device_map: str | dict[str, Any] | None = None  # e.g. "auto" for models larger than one GPU
    router_aux_loss_coef: float = 0.0      # MoE load-balancing loss weight (Mixtral: 0.01-0.1)
    quantize: str | None = None            # "8bit" / "4bit": the stored LLM weights are bitsandbytes'

    def __post_init__(self) -> None:
        _check_types(self, "llm")
        _one_of(self.dtype, DTYPE_NAMES, "llm.dtype")
        if self.quantize is not None:
            _one_of(self.quantize, QUANTIZE_NAMES, "llm.quantize")
        _at_least(self.router_aux_loss_coef, 0, "llm.router_aux_loss_coef")
        if self.config is not None and not isinstance(self.config.get("model_type"), str):
            raise ConfigError("llm.config: an explicit transformers config needs a string 'model_type'")


@dataclass
class ProjectorConfig:
    type: str = "linear_ln"  # Linear(sum of expert dims, d) -> LayerNorm(d), as released;
                             # "mlp_ln": Linear(.., hidden) -> GELU -> Linear(hidden, d) -> LayerNorm(d)
    norm_eps: float = 1e-5
    hidden: int = 0          # mlp_ln's hidden width (> 0); linear_ln has none

    def __post_init__(self) -> None:
        _check_types(self, "projector")
        _one_of(self.type, PROJECTORS, "projector.type")
        if (self.type == "mlp_ln") != (self.hidden > 0) or self.hidden < 0:
            raise ConfigError(f"projector.hidden must be > 0 for mlp_ln and 0 for linear_ln, got {self.type} "
                              f"with hidden {self.hidden!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"projector.norm_eps must be > 0, got {self.norm_eps!r}")


@dataclass
class SphinxConfig:
    name: str
    llm: LLMConfig
    experts: list[ExpertConfig]
    canvas_size: int = 1024           # side (pixels) of the padded square canvas fed to the experts
    grid: int = 2                     # sub-images per side; 1 = the canvas is the only view
    tokens_per_view: int = 257        # tokens each expert gives per view (1 global + g*g grid); checked at build
    anchor: Anchor = "top-left"       # "top-left" (SPHINX-X) or "center" (released checkpoints)
    skip_tokens: bool = True          # padded sub-images -> one learnable skip token
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    template: str = "sphinx"          # chat template name (see templates.py)
    tokenizer: str | None = None      # hub id / folder / "builtin:bytes"; defaults to llm.name_or_path
    max_pixels: int = 64_000_000      # images beyond this are refused before decoding
    max_length: int = 4096            # longest sequence (visual + text tokens) the model accepts
    max_images: int = 1               # images one conversation may hold (released models: 1)
    canvas_positions: bool = False    # a learned embedding of each visual token's canvas cell, added after the
                                      # projector (canvas_positions.py); off in every released preset
    box_positions: bool = False       # with canvas_positions: each token's embedding also codes the box a linear
                                      # read-out of its expert features finds, placed in the token's cell
    box_readout_hidden: int = 0       # with box_positions: 0 = a linear read-out; > 0 = Linear -> GELU -> Linear
                                      # with this hidden width (whether a token holds something is not linear)
    shared_image_position: bool = False  # every visual token of an image at one rotary position (positions.py);
                                         # off in every released preset (trained with sequential positions)

    def __post_init__(self) -> None:
        from .templates import TEMPLATES  # torch-free; imported here, as templates needs the schema only

        _check_types(self, "config")
        if not self.name:
            raise ConfigError("config.name must not be empty")
        _one_of(self.anchor, ANCHORS, "anchor")
        for name in ("grid", "tokens_per_view", "max_pixels", "max_images"):
            _at_least(getattr(self, name), 1, name)
        _at_least(self.max_length, 2, "max_length")
        if not 1 <= self.canvas_size <= MAX_CANVAS:
            raise ConfigError(f"canvas_size must be in 1..{MAX_CANVAS}, got {self.canvas_size}")
        if not self.experts:
            raise ConfigError("experts: at least one visual expert is required")
        if self.canvas_size % self.grid:
            raise ConfigError(f"canvas_size {self.canvas_size} must be divisible by grid {self.grid}")
        keys = [e.key for e in self.experts]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"experts: each expert needs its own key, got {keys}")
        _one_of(self.template, tuple(sorted(TEMPLATES)), "template")
        if self.box_positions and not self.canvas_positions:
            raise ConfigError("box_positions needs canvas_positions")
        if self.box_readout_hidden < 0 or (self.box_readout_hidden and not self.box_positions):
            raise ConfigError(f"box_readout_hidden must be >= 0, and > 0 only with box_positions; "
                              f"got {self.box_readout_hidden!r}")
        if self.canvas_positions:
            g = math.isqrt(self.tokens_per_view - 1)
            if g * g != self.tokens_per_view - 1:
                raise ConfigError(f"canvas_positions needs tokens_per_view = 1 + g*g (a pooled token and a g x g "
                                  f"map per view), got {self.tokens_per_view}")

    @property
    def num_views(self) -> int:
        return num_views(self.grid)

    # --- JSON round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "SphinxConfig":
        """THE way in for config data: structure checked here, types and ranges in `__post_init__`."""
        return _build(SphinxConfig, d, "config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str, source: str = "config") -> "SphinxConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source} is not valid JSON: {e}") from e
        except RecursionError as e:
            raise ConfigError(f"{source} nests too deeply to be a config") from e
        return SphinxConfig.from_dict(data)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @staticmethod
    def load(folder_or_file: str | Path) -> "SphinxConfig":
        p = Path(folder_or_file)
        if p.is_dir():
            p = p / CONFIG_FILE
        try:
            text = read_text(p, "config file", max_bytes=16 << 20)
        except UnsafePathError as e:
            raise ConfigError(str(e)) from e
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from e
        source = f"config file {str(p)!r}"
        try:
            return SphinxConfig.from_json(text, source=source)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None

    def replace(self, **changes: Any) -> "SphinxConfig":
        return SphinxConfig.from_dict({**self.to_dict(), **changes})


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def get_preset(name: str) -> SphinxConfig:
    if name not in list_presets():  # by membership, never by building a path from the name
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(list_presets())}")
    path = PRESET_DIR / f"{name}.json"
    cfg = SphinxConfig.from_json(path.read_text(encoding="utf-8"))
    if cfg.name != name:
        raise ValueError(f"preset file {path.name} declares name {cfg.name!r}")
    return cfg


# --- the one validator ---------------------------------------------------------------------
def _build(cls: type, data: Any, where: str) -> Any:
    """A config dataclass from a JSON object (or an instance, re-validated), nested ones too."""
    if isinstance(data, cls):
        data = asdict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        item = get_args(hint)[0] if get_origin(hint) is list and get_args(hint) else None
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, name)
        elif item is not None and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ConfigError(f"{name} must be a list, got {_describe(value)}")
            value = [_build(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:  # name the field by its place: "experts[1].key", not "expert.key"
        label = {ExpertConfig: "expert"}.get(cls)
        msg = str(e)
        if label and msg.startswith(label + "."):
            raise ConfigError(where + msg[len(label):]) from None
        raise


def _check_types(obj: Any, where: str) -> None:
    """Every field of a config dataclass against its annotation (bools are not ints, floats finite)."""
    for name, hint in get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        if not _matches(value, hint):
            path = name if where == "config" else f"{where}.{name}"
            raise ConfigError(f"{path} must be {_hint_name(hint)}, got {_describe(value)}")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if hint is type(None):
        return "null"
    names = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false",
             list: "a list", dict: "a JSON object"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _one_of(value: Any, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")


def _at_least(value: float, low: float, where: str) -> None:
    if value < low:
        raise ConfigError(f"{where} must be >= {low}, got {value!r}")
