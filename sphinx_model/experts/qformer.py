"""BLIP-2 Q-Former expert: a fixed set of learned queries read the image through cross-attention.

As released in the four-expert SPHINX members (key `qformer`): transformers' `Blip2Model` of
`Salesforce/blip2-opt-2.7b` with `language_projection` and `language_model` dropped, so
`vision_model` (EVA ViT-g: hidden 1408, 39 layers, patch 14, 224 px), `query_tokens`
(1, 32, 768) and `qformer` (12 layers, hidden 768, cross-attention every 2nd layer) remain.
The features are the Q-Former's last hidden state for the 32 queries, (N, 32, 768), from the
same CLIP-normalised 224 views the CLIP expert sees (BLIP-2 normalises with CLIP's mean/std).

Unlike the other experts its tokens are no global + grid: they are not fused on channels but
projected by their own `Linear(768, d) -> LayerNorm(d)` (`qformer_proj`) and placed first in
each view (`fused = False`, see registry.VisualExpert).

Module keys are `Blip2Model`'s own (`vision_model.*`, `query_tokens`, `qformer.*`), so the
released keys map 1:1; older transformers also saved the text-input FFN of each Q-Former layer
(`intermediate.*`, `output.*`), which queries never use.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

from ..config import ExpertConfig
from .clip_convnext import CLIP_MEAN, CLIP_STD
from .registry import ExpertWeightsUnavailable, VisualExpert, offline_note, register_expert

_OPTIONS = frozenset({"vision", "qformer", "num_query_tokens"})
_OWN = re.compile(r"^(vision_model\.|qformer\.|query_tokens$)")
_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
_INDEX = "model.safetensors.index.json"


@register_expert("blip2_qformer")
class QFormerExpert(VisualExpert):
    mean = CLIP_MEAN
    std = CLIP_STD
    fused = False

    def __init__(self, vision: Blip2VisionConfig, qformer: Blip2QFormerConfig, num_query_tokens: int,
                 image_size: int) -> None:
        if vision.image_size != image_size or image_size % vision.patch_size:
            raise ValueError(f"blip2_qformer image_size {image_size} must equal the vision tower's "
                             f"{vision.image_size} and be a multiple of its patch size {vision.patch_size}")
        if qformer.encoder_hidden_size != vision.hidden_size:
            raise ValueError(f"the Q-Former reads {qformer.encoder_hidden_size}-d image features but the "
                             f"vision tower gives {vision.hidden_size}")
        if num_query_tokens < 1:
            raise ValueError(f"blip2_qformer needs at least one query token, got {num_query_tokens}")
        super().__init__(image_size, out_dim=qformer.hidden_size, grid_size=image_size // vision.patch_size)
        self.vision_model = Blip2VisionModel(vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer.hidden_size))
        self.qformer = Blip2QFormerModel(qformer)

    @property
    def num_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @classmethod
    def from_config(cls, cfg: ExpertConfig, load_weights: bool = False) -> "QFormerExpert":
        if unknown := sorted(set(cfg.options) - _OPTIONS):
            raise ValueError(f"blip2_qformer takes options {sorted(_OPTIONS)}, got {unknown}")
        vision_opts, qformer_opts = cfg.options.get("vision", {}), cfg.options.get("qformer", {})
        queries = cfg.options.get("num_query_tokens", 32)
        if not isinstance(vision_opts, dict) or not isinstance(qformer_opts, dict):
            raise ValueError("blip2_qformer options vision and qformer must be JSON objects")
        if not isinstance(queries, int) or isinstance(queries, bool):
            raise ValueError(f"blip2_qformer option num_query_tokens must be an integer, got {queries!r}")
        files = _resolve_weights(cfg) if load_weights else None  # fail fast, before building
        try:
            vision = Blip2VisionConfig(**{**vision_opts, "image_size": cfg.image_size})
            qformer = Blip2QFormerConfig(**{"encoder_hidden_size": vision.hidden_size, **qformer_opts})
        except (TypeError, ValueError) as e:
            raise ValueError(f"blip2_qformer options do not make a BLIP-2 config: {' '.join(str(e).split())[:200]}") \
                from e
        expert = cls(vision, qformer, queries, cfg.image_size)
        if files is not None:
            expert.load_state_dict(_read_state(files), strict=True)
        return expert

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)                                         # (N, 3, S, S), CLIP-normalised
        image = self.vision_model(pixel_values=pixels).last_hidden_state  # (N, 1 + g*g, Cv), post-LayerNorm
        queries = self.query_tokens.expand(image.shape[0], -1, -1)        # (N, Q, C)
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask)
        return out.last_hidden_state                                      # (N, Q, C)

    @staticmethod
    def map_released_state_dict(
        sd: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """`Blip2Model`'s names are ours; the text-input FFN and anything else come back unmapped."""
        mapped = {k: v for k, v in sd.items() if _OWN.match(k) and not _TEXT_FFN.match(k)}
        return mapped, sorted(k for k in sd if k not in mapped)

    @classmethod
    def is_unused_released_key(cls, key: str) -> bool:
        return bool(_TEXT_FFN.match(key))


def _resolve_weights(cfg: ExpertConfig) -> list[str]:
    """Local safetensors files holding the expert's tensors: a file, or a Hugging Face repo's
    shards (only those its index names for `vision_model.*`, `query_tokens`, `qformer.*`)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    ref = cfg.pretrained
    if ref is None:
        raise ValueError(f"load_weights=True but expert {cfg.key!r} has no `pretrained` hub id or file")
    if Path(ref).is_file():
        return [ref]
    try:
        index = json.loads(Path(hf_hub_download(ref, _INDEX)).read_text(encoding="utf-8"))
        names = sorted({f for k, f in index["weight_map"].items() if _OWN.match(k)})
        return [hf_hub_download(ref, name) for name in names]
    except (OSError, EntryNotFoundError, KeyError, ValueError) as err:
        raise ExpertWeightsUnavailable(
            f"weights of visual expert {cfg.key!r} (BLIP-2 Q-Former from the Hugging Face repo {ref!r}) are not "
            f"in the local cache and cannot be downloaded{offline_note()}. Download them once with network "
            f"access, or set `pretrained` to a local safetensors file. Cause: {type(err).__name__}: {err}"
        ) from err


def _read_state(files: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(name, framework="pt", device="cpu") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if _OWN.match(k)})
    return state
