"""Frozen visual experts (mixture of visual experts). Importing this package registers the
built-ins: `clip_convnext` (CLIP-ConvNeXt via open_clip), `dinov2` (DINOv2 via timm), and for
the four-expert released members `clip_vit` (CLIP ViT-L/14 via open_clip) and `blip2_qformer`
(the BLIP-2 Q-Former via transformers), and `timm_cnn` (a timm CNN
with its stride-16 detail folded into each token: the demo model's).

    expert = build_expert(cfg)          # cfg: ExpertConfig; frozen, eval, random init
    tokens = expert(pixels)             # (N, 3, S, S) CLIP-normalised -> (N, expert.num_tokens, expert.out_dim)

A new expert: subclass `VisualExpert`, implement `from_config` / `forward`, decorate with
`@register_expert("kind")`, and import its module before building.
"""
from .registry import (
    ExpertWeightsUnavailable,
    VisualExpert,
    build_expert,
    get_expert_class,
    list_experts,
    register_expert,
)
from .clip_convnext import CLIP_MEAN, CLIP_STD, ClipConvNeXtExpert  # registers
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, DINOv2Expert, hub_interpolate_pos_embed  # registers
from .clip_vit import ClipViTExpert  # registers
from .qformer import QFormerExpert  # registers
from .timm_cnn import TimmCNNExpert  # registers

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipConvNeXtExpert",
    "ClipViTExpert",
    "DINOv2Expert",
    "ExpertWeightsUnavailable",
    "QFormerExpert",
    "TimmCNNExpert",
    "VisualExpert",
    "build_expert",
    "get_expert_class",
    "hub_interpolate_pos_embed",
    "list_experts",
    "register_expert",
]
