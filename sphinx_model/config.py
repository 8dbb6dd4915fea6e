"""Typed, JSON-serialisable model config and the registry of named presets.

A config names everything needed to *build* a model: the LLM backbone (a hub id / local
folder, or an explicit transformers config for random init), the visual experts, the
canvas and grid, the padding anchor, whether padded sub-images become skip tokens, the
projector and the chat template. Building a config never downloads anything; weights
load only when a model is built with `load_weights=True`.

Presets are plain JSON files in `sphinx_model/presets/` (one per name).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .tiling import ANCHORS, Anchor, num_views

PRESET_DIR = Path(__file__).parent / "presets"
CONFIG_FILE = "sphinx_config.json"


@dataclass
class ExpertConfig:
    """One frozen visual expert, found by `kind` in the expert registry."""

    kind: str                      # registry name: "clip_convnext", "dinov2"
    model_name: str                # open_clip / timm architecture name
    image_size: int                # side of the square view this expert sees
    key: str                       # attribute / state-dict prefix, e.g. "openclip_convnext_xxl"
    pretrained: str | None = None  # open_clip tag or timm hub id; None = random init
    options: dict[str, Any] = field(default_factory=dict)  # architecture overrides (tiny test experts)


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


@dataclass
class ProjectorConfig:
    type: str = "linear_ln"  # Linear(sum of expert dims, d) -> LayerNorm(d), as released
    norm_eps: float = 1e-5


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

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.grid < 1:
            raise ValueError("grid must be >= 1")
        if not self.experts:
            raise ValueError("at least one visual expert is required")
        if self.canvas_size % self.grid:
            raise ValueError("canvas_size must be divisible by grid")

    @property
    def num_views(self) -> int:
        return num_views(self.grid)

    # --- JSON round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "SphinxConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(SphinxConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        d["llm"] = LLMConfig(**d["llm"])
        d["experts"] = [ExpertConfig(**e) for e in d["experts"]]
        d["projector"] = ProjectorConfig(**d.get("projector", {}))
        return SphinxConfig(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "SphinxConfig":
        return SphinxConfig.from_dict(json.loads(text))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @staticmethod
    def load(folder_or_file: str | Path) -> "SphinxConfig":
        p = Path(folder_or_file)
        if p.is_dir():
            p = p / CONFIG_FILE
        return SphinxConfig.from_json(p.read_text(encoding="utf-8"))

    def replace(self, **changes: Any) -> "SphinxConfig":
        return SphinxConfig.from_dict({**self.to_dict(), **changes})


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def get_preset(name: str) -> SphinxConfig:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(list_presets())}")
    cfg = SphinxConfig.from_json(path.read_text(encoding="utf-8"))
    if cfg.name != name:
        raise ValueError(f"preset file {path.name} declares name {cfg.name!r}")
    return cfg
