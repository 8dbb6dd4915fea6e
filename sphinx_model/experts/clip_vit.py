"""CLIP ViT expert: the vision tower of an open_clip ViT, every token after `ln_post`, no `proj`.

As released in the four-expert SPHINX members (key `clip`, LLaMA2-Accessory `llama_ens*` and
`mixtral_sparse_ens*`): open_clip `ViT-L-14` (OpenAI weights), text tower dropped. At 224 px:
conv1 patches -> class embedding prepended -> + positional embedding (257 x 1024) -> `ln_pre`
-> transformer -> `ln_post` on all 257 tokens -> (N, 257, 1024). The projection `proj` is
never applied. open_clip >= 2.26 runs its transformer batch-first, so nothing is permuted.

Activation: OpenAI trained CLIP with QuickGELU (open_clip's registry marks the `openai` tag
`quick_gelu=True`), while the released inference builds `ViT-L-14` with `pretrained=None`,
i.e. open_clip's plain `nn.GELU`, and loads the weights from the checkpoint. The released
outputs are what that inference computes, so `quick_gelu` defaults to False here (see
tests/sphinx_model/test_experts_four.py, which builds open_clip's tower the authors' way and
compares); `options={"quick_gelu": true}` gives the activation CLIP was trained with.

Module keys are the tower's own (`conv1.*`, `class_embedding`, ...); the released ones sit
under `visual.` beside text-side leftovers that no expert uses.
"""
from __future__ import annotations

from typing import Any

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transformer import VisionTransformer

from ..config import ExpertConfig
from .clip_convnext import CLIP_MEAN, CLIP_STD, resolve_open_clip_checkpoint
from .registry import VisualExpert, register_expert

_VISUAL = "visual."
_KEPT = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
_TOWER_OPTIONS = frozenset({"width", "layers", "head_width", "mlp_ratio", "patch_size"})


@register_expert("clip_vit")
class ClipViTExpert(VisualExpert):
    mean = CLIP_MEAN
    std = CLIP_STD
    # The released `clip.*` keys this expert has no use for: the projection and the text tower's leftovers.
    unused_released_keys = ("visual.proj", "positional_embedding", "text_projection", "logit_scale",
                            "token_embedding.weight", "ln_final.weight", "ln_final.bias")

    def __init__(self, tower: VisionTransformer, image_size: int) -> None:
        if not isinstance(tower, VisionTransformer) or tower.attn_pool is not None:
            raise TypeError(f"expected an open_clip VisionTransformer without attention pooling, got {type(tower).__name__}")
        patch = tower.patch_size[0]
        if image_size % patch or tower.grid_size != (image_size // patch,) * 2:
            raise ValueError(f"clip_vit image_size {image_size} does not fit the tower's {tower.grid_size} grid "
                             f"of {patch}-px patches")
        if not tower.transformer.batch_first:
            raise ValueError("clip_vit needs open_clip's batch-first transformer (open_clip >= 2.26)")
        super().__init__(image_size, out_dim=tower.transformer.width, grid_size=image_size // patch)
        for name in _KEPT:
            setattr(self, name, getattr(tower, name))

    @classmethod
    def from_config(cls, cfg: ExpertConfig, load_weights: bool = False) -> "ClipViTExpert":
        options = dict(cfg.options)
        quick_gelu = options.pop("quick_gelu", False)
        if not isinstance(quick_gelu, bool):
            raise ValueError(f"clip_vit option quick_gelu must be true or false, got {quick_gelu!r}")
        if unknown := sorted(set(options) - _TOWER_OPTIONS):
            raise ValueError(f"clip_vit takes options {sorted(_TOWER_OPTIONS | {'quick_gelu'})}, got {unknown}")
        checkpoint = resolve_open_clip_checkpoint(cfg) if load_weights else None  # fail fast, before building
        expert = cls(build_tower(cfg.model_name, cfg.image_size, quick_gelu, options), cfg.image_size)
        if checkpoint is not None:
            mapped, _ = cls.map_released_state_dict(_read_visual_state(checkpoint))
            expert.load_state_dict(mapped, strict=True)
        return expert

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)                                  # (N, 3, S, S), CLIP-normalised
        x = self.conv1(pixels)                                     # (N, C, g, g)
        x = x.flatten(2).transpose(1, 2)                           # (N, g*g, C), row-major
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, 1 + g*g, C)
        x = self.transformer(self.ln_pre(x))                       # batch-first, no permutes
        return self.ln_post(x)                                     # (N, 1 + g*g, C): every token, no proj

    @staticmethod
    def map_released_state_dict(
        sd: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Released `visual.<name>` -> `<name>` for the kept parts; the rest comes back unmapped."""
        mapped = {k[len(_VISUAL):]: v for k, v in sd.items()
                  if k.startswith(_VISUAL) and k[len(_VISUAL):].split(".")[0] in _KEPT}
        return mapped, sorted(k for k in sd if not (k.startswith(_VISUAL) and k[len(_VISUAL):] in mapped))

    @staticmethod
    def to_released_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our keys -> released `visual.*` (the projection and text leftovers are not ours to write)."""
        return {_VISUAL + k: v for k, v in sd.items()}


def build_tower(model_name: str, image_size: int, quick_gelu: bool = False,
                overrides: dict[str, Any] | None = None) -> VisionTransformer:
    """Random-init vision tower of the open_clip model `model_name` (never downloads);
    `overrides` change its width/layers/head_width/mlp_ratio/patch_size (tiny test experts)."""
    known = open_clip.get_model_config(model_name)
    if known is None:
        raise ValueError(f"{model_name!r} is not an open_clip model")
    vision: dict[str, Any] = {**known["vision_cfg"], **(overrides or {}), "image_size": image_size}
    if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
        raise ValueError(f"open_clip model {model_name!r} has no plain ViT vision tower")
    return _build_vision_tower(known["embed_dim"], CLIPVisionCfg(**vision), quick_gelu=quick_gelu)


def _read_visual_state(path: str) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of a full open_clip CLIP checkpoint (a file of the tower alone gets the prefix)."""
    from open_clip.factory import load_state_dict

    sd = load_state_dict(path)
    return sd if any(k.startswith(_VISUAL) for k in sd) else {_VISUAL + k: v for k, v in sd.items()}
