"""CLIP-ConvNeXt expert: the timm ConvNeXt trunk of an open_clip vision tower.

As released (SPHINX-Tiny / -MoE, key `openclip_convnext_xxl`): open_clip `convnext_xxlarge`
(tag `laion2b_s34b_b82k_augreg_soup`), text tower and pooling/projection head dropped. The
map after the trunk's final 2-D LayerNorm `head.norm` is the output; token 0 is its mean.
At 512 px: (N, 1 + 16*16, 3072).

The four-expert members that see 224-px views (SPHINX, SPHINX-1k, SPHINX-v2-1k) resize each
view to 256 px before the trunk (nearest-neighbour: the release calls `F.interpolate` without a
mode) and repeat every cell of its 8 x 8 map twice along both axes to get a 16 x 16 grid like
the other experts': options `run_size` (side fed to the trunk) and `upsample` (repeat factor).
The mean token is the same before or after repeating.

Only the trunk parts that make that map are kept (`stem`, `stages`, `head.norm`), so this
module's state_dict keys are exactly the bare trunk keys and the released ones map 1:1.
"""
from __future__ import annotations

import os
import re
from typing import Any

import open_clip
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import EntryNotFoundError
from open_clip.factory import load_state_dict as load_open_clip_state_dict
from open_clip.model import CLIPVisionCfg
from open_clip.timm_model import TimmModel
from timm.layers import NormMlpClassifierHead
from timm.models.convnext import ConvNeXt
from torch import nn

from ..config import ExpertConfig
from .registry import ExpertWeightsUnavailable, VisualExpert, offline_note, register_expert

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_TRUNK_PREFIX = "visual.trunk."  # where the trunk sits in an open_clip CLIP checkpoint
_RELEASED_KEY = re.compile(r"^(stem\..+|stages\..+|head\.norm\.(weight|bias))$")


@register_expert("clip_convnext")
class ClipConvNeXtExpert(VisualExpert):
    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(self, trunk: ConvNeXt, image_size: int, run_size: int | None = None, upsample: int = 1) -> None:
        if not isinstance(trunk, ConvNeXt) or not isinstance(trunk.head, NormMlpClassifierHead):
            raise TypeError(f"expected a timm ConvNeXt with a norm head, got {type(trunk).__name__}")
        reduction = trunk.feature_info[-1]["reduction"]  # 32: stem /4, three downsamples /2
        run_size = image_size if run_size is None else run_size
        if run_size % reduction:
            raise ValueError(f"clip_convnext run_size (default: image_size) must be a multiple of {reduction}, "
                             f"got {run_size}")
        super().__init__(image_size, out_dim=trunk.num_features, grid_size=run_size // reduction * upsample)
        self.run_size = run_size    # side of the input the trunk sees (views are resized to it)
        self.upsample = upsample    # each map cell repeated this often along both axes
        self.stem = trunk.stem
        self.stages = trunk.stages
        self.norm_pre = trunk.norm_pre  # Identity for norm-head ConvNeXts; kept for fidelity
        self.head = nn.ModuleDict({"norm": trunk.head.norm})  # 2-D LayerNorm; pooling and fc dropped

    @classmethod
    def from_config(cls, cfg: ExpertConfig, load_weights: bool = False) -> "ClipConvNeXtExpert":
        if unknown := sorted(set(cfg.options) - {"run_size", "upsample"}):
            raise ValueError(f"clip_convnext takes the options run_size and upsample, got {unknown}")
        run_size, upsample = cfg.options.get("run_size", cfg.image_size), cfg.options.get("upsample", 1)
        for name, value in (("run_size", run_size), ("upsample", upsample)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"clip_convnext option {name} must be a positive integer, got {value!r}")
        checkpoint = resolve_open_clip_checkpoint(cfg) if load_weights else None  # fail fast, before building
        expert = cls(build_trunk(cfg.model_name, run_size), cfg.image_size, run_size, upsample)
        if checkpoint is not None:
            expert.load_state_dict(_read_trunk_state(checkpoint), strict=True)
        return expert

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)                # (N, 3, S, S), CLIP-normalised
        if self.run_size != self.image_size:     # (N, 3, R, R): the 224-px members feed 256 px, nearest
            pixels = F.interpolate(pixels, size=(self.run_size,) * 2, mode="nearest")
        x = self.stem(pixels)                    # (N, C0, R/4, R/4)
        x = self.stages(x)                       # (N, C, R/32, R/32)
        x = self.head["norm"](self.norm_pre(x))  # (N, C, R/32, R/32), LayerNorm over channels
        if self.upsample > 1:                    # (N, C, g, g): each cell repeated on both axes
            x = x.repeat_interleave(self.upsample, dim=2).repeat_interleave(self.upsample, dim=3)
        grid = x.flatten(2).transpose(1, 2)      # (N, g*g, C), row-major
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)  # (N, 1 + g*g, C)

    @staticmethod
    def map_released_state_dict(
        sd: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Released keys are the bare trunk's (`stem.*`, `stages.*`, `head.norm.*`): identity."""
        mapped = {k: v for k, v in sd.items() if _RELEASED_KEY.match(k)}
        return mapped, sorted(k for k in sd if k not in mapped)


def open_clip_vision_cfg(model_name: str, image_size: int) -> CLIPVisionCfg:
    """open_clip's own vision config for names it knows; otherwise a custom one around the
    timm model `model_name` (how the tiny test experts are built)."""
    known = open_clip.get_model_config(model_name)
    if known is not None:
        vision: dict[str, Any] = dict(known["vision_cfg"])
        if not vision.get("timm_model_name"):
            raise ValueError(f"open_clip model {model_name!r} has no timm vision trunk")
    elif timm.is_model(model_name):
        vision = {"timm_model_name": model_name, "timm_pool": "", "timm_proj": "linear"}
    else:
        raise ValueError(f"{model_name!r} is neither an open_clip model nor a timm model")
    vision["image_size"] = image_size
    return CLIPVisionCfg(**vision)


def build_trunk(model_name: str, image_size: int) -> ConvNeXt:
    """Random-init open_clip vision tower -> its timm trunk (never downloads)."""
    vision = open_clip_vision_cfg(model_name, image_size)
    tower = TimmModel(
        vision.timm_model_name,
        embed_dim=8,  # size of the CLIP projection, which is dropped
        image_size=vision.image_size,
        pool=vision.timm_pool,
        proj=vision.timm_proj,
        drop_path=vision.timm_drop_path,
        pretrained=False,
    )
    return tower.trunk


def resolve_open_clip_checkpoint(cfg: ExpertConfig) -> str:
    """Local path of the open_clip checkpoint `cfg.pretrained` names (a tag or a file)."""
    tag = cfg.pretrained
    if tag is None:
        raise ValueError(f"load_weights=True but expert {cfg.key!r} has no `pretrained` tag")
    if os.path.isfile(tag):
        return tag
    source = open_clip.get_pretrained_cfg(cfg.model_name, tag)
    if not source:
        known = open_clip.list_pretrained_tags_by_model(cfg.model_name)
        raise ValueError(f"unknown open_clip tag {tag!r} for {cfg.model_name!r}; known: {known}")
    try:
        return open_clip.download_pretrained(source)
    except (OSError, EntryNotFoundError) as err:
        where = source.get("hf_hub") or source.get("url")
        raise ExpertWeightsUnavailable(
            f"weights of visual expert {cfg.key!r} (open_clip {cfg.model_name}, tag {tag!r}, from "
            f"{where}) are not in the local cache and cannot be downloaded"
            f"{offline_note()}. Download them once with network "
            f"access, or set `pretrained` to a local checkpoint file. Cause: {err}"
        ) from err


def _read_trunk_state(path: str) -> dict[str, torch.Tensor]:
    """The `visual.trunk.*` tensors of a full open_clip checkpoint, prefix stripped (a file that
    holds only a bare trunk is taken as is). With safetensors the text tower is never read."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            prefix = _TRUNK_PREFIX if any(k.startswith(_TRUNK_PREFIX) for k in f.keys()) else ""
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    sd = load_open_clip_state_dict(path)  # unwraps "state_dict" / "module." like open_clip does
    prefix = _TRUNK_PREFIX if any(k.startswith(_TRUNK_PREFIX) for k in sd) else ""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
