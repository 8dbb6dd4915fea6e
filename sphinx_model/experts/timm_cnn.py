"""A timm CNN trunk as a visual expert, with its finer map folded into each token.

Built for the demo model (EfficientNet-Lite0 through timm's `tf_efficientnet_lite0`), whose
world holds letters and mark digits a few pixels wide: a stride-32 map alone loses them. Each
output token is the stride-32 feature of its cell concatenated with the 2 x 2 stride-16
features inside that cell (space-to-depth), so the LLM still gets one token per cell but each
carries four times the detail. Token 0 is the mean of the grid tokens.

    pixels (N, 3, S, S) CLIP-normalised --renormalise--> trunk --> s16 (N, C16, 2g, 2g), s32 (N, C32, g, g)
    --s16 space-to-depth--> (N, 4*C16, g, g) --concat--> (N, C32 + 4*C16, g, g) --> (N, 1 + g*g, C)

Random init unless `load_weights` with `pretrained` a local weights file (safetensors or a
plain state dict) in timm's key names.
"""
from __future__ import annotations

import os

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExpertConfig
from .clip_convnext import CLIP_MEAN, CLIP_STD
from .registry import ExpertWeightsUnavailable, VisualExpert, register_expert


@register_expert("timm_cnn")
class TimmCNNExpert(VisualExpert):
    mean = (0.5, 0.5, 0.5)  # timm's tf_efficientnet_lite* normalisation; re-set from the trunk's config
    std = (0.5, 0.5, 0.5)

    def __init__(self, trunk: nn.Module, image_size: int, fine: bool = True) -> None:
        channels, reductions = trunk.feature_info.channels(), trunk.feature_info.reduction()
        if reductions != [16, 32]:
            raise ValueError(f"timm_cnn needs the trunk's stride-16 and stride-32 maps, got strides {reductions}")
        if image_size % 32:
            raise ValueError(f"timm_cnn image_size must be a multiple of 32, got {image_size}")
        out_dim = channels[1] + (4 * channels[0] if fine else 0)
        super().__init__(image_size, out_dim=out_dim, grid_size=image_size // 32)
        self.trunk = trunk
        self.fine = fine
        cfg = getattr(trunk, "pretrained_cfg", {}) or {}
        own_mean, own_std = tuple(cfg.get("mean", self.mean)), tuple(cfg.get("std", self.std))
        # CLIP-normalised in -> the trunk's own normalisation: x_own = x_clip * a + b (per channel)
        a = torch.tensor(CLIP_STD) / torch.tensor(own_std)
        b = (torch.tensor(CLIP_MEAN) - torch.tensor(own_mean)) / torch.tensor(own_std)
        self.register_buffer("renorm_scale", a.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("renorm_shift", b.view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: ExpertConfig, load_weights: bool = False) -> "TimmCNNExpert":
        if unknown := sorted(set(cfg.options) - {"fine"}):
            raise ValueError(f"timm_cnn takes the option fine, got {unknown}")
        fine = cfg.options.get("fine", True)
        if not isinstance(fine, bool):
            raise ValueError(f"timm_cnn option fine must be true or false, got {fine!r}")
        if not timm.is_model(cfg.model_name):
            raise ValueError(f"{cfg.model_name!r} is not a timm model")
        trunk = timm.create_model(cfg.model_name, pretrained=False, features_only=True, out_indices=(3, 4))
        expert = cls(trunk, cfg.image_size, fine)
        if load_weights:
            expert.trunk.load_state_dict(read_trunk_weights(cfg), strict=True)
        return expert

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)                                        # (N, 3, S, S), CLIP-normalised
        x = pixels * self.renorm_scale.to(pixels.dtype) + self.renorm_shift.to(pixels.dtype)
        s16, s32 = self.trunk(x)                                         # (N, C16, 2g, 2g), (N, C32, g, g)
        maps = [s32, F.pixel_unshuffle(s16, 2)] if self.fine else [s32]  # (N, 4*C16, g, g)
        grid = torch.cat(maps, dim=1).flatten(2).transpose(1, 2)         # (N, g*g, C), row-major
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)  # (N, 1 + g*g, C)


def read_trunk_weights(cfg: ExpertConfig) -> dict[str, torch.Tensor]:
    """The local weights file `cfg.pretrained` names (timm key names of the features-only trunk)."""
    path = cfg.pretrained
    if not path or not os.path.isfile(path):
        raise ExpertWeightsUnavailable(f"visual expert {cfg.key!r} (timm {cfg.model_name}) needs `pretrained` "
                                       f"to be a local weights file; got {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
