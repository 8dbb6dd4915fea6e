"""DINOv2 expert: a timm DINOv2 ViT run the way the released SPHINX models run torch-hub's.

As released (key `dinov2_vitg14`): ViT-g/14 at 224 px -> last-layer normed CLS + 16*16 patch
tokens, 1536-d. Two details make it match the hub implementation rather than timm's defaults:
  * input arrives CLIP-normalised and is re-normalised to ImageNet mean/std inside `forward`;
  * the 37x37 position table is resized with the hub's bicubic `scale_factor=(g + 0.1) / 37`,
    not with `size=(g, g)` (different numbers), and used as is when the grid already matches.

Only the parts the forward uses are kept, so state_dict keys are timm's bare ViT keys
(`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..config import ExpertConfig
from .clip_convnext import CLIP_MEAN, CLIP_STD
from .registry import ExpertWeightsUnavailable, VisualExpert, offline_note, register_expert

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_INTERPOLATE_OFFSET = 0.1  # torch-hub DINOv2 adds this to the target grid before scaling

# torch-hub name -> timm name, for the keys whose names differ (packed SwiGLU of ViT-g).
_RENAMES = ((re.compile(r"^(blocks\.\d+\.mlp)\.w12\.(weight|bias)$"), r"\1.fc1.\2"),
            (re.compile(r"^(blocks\.\d+\.mlp)\.w3\.(weight|bias)$"), r"\1.fc2.\2"))
_SAME = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma)$"
)
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_interpolate_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(1, 1 + M*M, C) table -> (1, 1 + g*g, C), as torch-hub DINOv2's interpolate_pos_encoding."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patch_pos.shape[1])
    if side == grid_size:
        return pos_embed
    dim = pos_embed.shape[-1]
    scale = (grid_size + HUB_INTERPOLATE_OFFSET) / side
    table = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, C, M, M)
    table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if table.shape[-2:] != (grid_size, grid_size):
        raise RuntimeError(f"hub interpolation gave {tuple(table.shape[-2:])}, wanted {grid_size}")
    patch_pos = table.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim)  # (1, g*g, C)
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=1)


@register_expert("dinov2")
class DINOv2Expert(VisualExpert):
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    unused_released_keys = ("mask_token",)  # hub's masked-image-modelling token; unused at inference

    def __init__(self, vit: VisionTransformer, image_size: int) -> None:
        if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class:
            raise ValueError("dinov2 expert needs a class token, no register tokens, pos_embed over CLS")
        if not isinstance(vit.norm_pre, nn.Identity):
            raise ValueError("dinov2 expert does not support a pre-norm ViT")
        patch = vit.patch_embed.patch_size[0]
        if image_size % patch:
            raise ValueError(f"dinov2 image_size must be a multiple of the patch size {patch}")
        super().__init__(image_size, out_dim=vit.embed_dim, grid_size=image_size // patch)
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.patch_embed = vit.patch_embed
        self.blocks = vit.blocks
        self.norm = vit.norm

    @classmethod
    def from_config(cls, cfg: ExpertConfig, load_weights: bool = False) -> "DINOv2Expert":
        weights = _resolve_weights(cfg) if load_weights else None  # fail fast, before building
        vit = timm.create_model(
            cfg.model_name,
            pretrained=weights is not None,
            pretrained_cfg_overlay=dict(file=weights) if weights else None,
            num_classes=0,
            dynamic_img_size=True,  # non-strict patch embed; the pos-embed resize is ours
            **cfg.options,
        )
        return cls(vit, cfg.image_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)                  # (N, 3, S, S), CLIP-normalised
        x = clip_to_imagenet(pixels)
        x = self.patch_embed(x)                    # (N, g, g, C)
        x = x.flatten(1, 2) if x.ndim == 4 else x  # (N, g*g, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)             # (N, 1 + g*g, C)
        x = x + hub_interpolate_pos_embed(self.pos_embed, self.grid_size).to(x.dtype)
        x = self.blocks(x)
        return self.norm(x)                        # (N, 1 + g*g, C): normed CLS + patches

    @staticmethod
    def map_released_state_dict(
        sd: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """torch-hub DINOv2 names -> timm names. `mask_token` has no place and comes back in
        `unmapped` (listed in `unused_released_keys`). Plain-MLP `mlp.fc1/fc2` pass through."""
        mapped: dict[str, torch.Tensor] = {}
        unmapped: list[str] = []
        for key, value in sd.items():
            new = key
            for pattern, repl in _RENAMES:
                new = pattern.sub(repl, new)
            if _SAME.match(new):
                mapped[new] = value
            else:
                unmapped.append(key)
        return mapped, sorted(unmapped)

    @staticmethod
    def to_released_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm names -> torch-hub names (the inverse of `map_released_state_dict`).

        A packed SwiGLU (ViT-g) is recognised by shape: its fc1 produces twice the hidden
        width that fc2 consumes; there the hub calls them `w12` / `w3`.
        """
        out: dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            m = re.match(r"^(blocks\.\d+\.mlp)\.(fc1|fc2)\.(weight|bias)$", key)
            if m:
                fc1, fc2 = sd[f"{m[1]}.fc1.weight"], sd[f"{m[1]}.fc2.weight"]
                if fc1.shape[0] == 2 * fc2.shape[1]:
                    key = f"{m[1]}.{'w12' if m[2] == 'fc1' else 'w3'}.{m[3]}"
            out[key] = value
        return out


def clip_to_imagenet(pixels: torch.Tensor) -> torch.Tensor:
    """Undo the CLIP normalisation, apply ImageNet's (as the released models do)."""
    def channel(values: tuple[float, float, float]) -> torch.Tensor:
        return torch.tensor(values, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)

    raw = pixels * channel(CLIP_STD) + channel(CLIP_MEAN)
    return (raw - channel(IMAGENET_MEAN)) / channel(IMAGENET_STD)


def _resolve_weights(cfg: ExpertConfig) -> str:
    """Local file for `cfg.pretrained`: a file path, or a timm Hugging Face repo id."""
    ref = cfg.pretrained
    if ref is None:
        raise ValueError(f"load_weights=True but expert {cfg.key!r} has no `pretrained` hub id")
    if Path(ref).is_file():
        return ref
    repo = ref.removeprefix("hf-hub:")
    errors: list[str] = []
    for filename in _HUB_WEIGHT_FILES:
        try:
            return hf_hub_download(repo, filename)
        except (OSError, EntryNotFoundError) as err:
            errors.append(f"{filename}: {type(err).__name__}")
    raise ExpertWeightsUnavailable(
        f"weights of visual expert {cfg.key!r} ({cfg.model_name}, Hugging Face repo {repo!r}, "
        f"files {' or '.join(_HUB_WEIGHT_FILES)}) are not in the local cache and cannot be "
        f"downloaded{offline_note()}. Download them "
        f"once with network access, or set `pretrained` to a local file. Tried: {'; '.join(errors)}"
    )
