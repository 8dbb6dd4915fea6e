"""Rotary positions of a sequence that holds images (`SphinxConfig.shared_image_position`).

By default a causal LM numbers its positions one by one, so an image's visual tokens span
hundreds of rotary positions and a word of the answer is nearer to the last views' tokens
than to the first ones. With `shared_image_position` on, every visual token of one image (one
run of placeholders) takes the position of the run's first token and the text after the image
goes on from there, as Qwen2-VL's M-RoPE does for an image's time axis. An answer is then
equally far from every visual token: which one it attends to is a matter of content and of the
token's canvas code (`canvas_positions`), which is what pointing needs (Gate A of the demo
recipe measured it). Off in every released preset: their checkpoints were trained with
sequential positions, and nothing changes for them.

The shift is a function of the prompt's ids alone, so a prefix of the same ids has the same
positions and its KV can be reused (serving's prefix caches rely on that).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .processor import IMAGE_TOKEN_ID


def rotary_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     shared_image: bool = False) -> torch.Tensor:
    """(B, L) position ids: counted over the attended tokens (left padding takes 0); with
    `shared_image`, a placeholder that follows a placeholder does not advance the count."""
    step = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    if shared_image:
        is_image = input_ids == IMAGE_TOKEN_ID
        repeats = torch.zeros_like(is_image)
        repeats[:, 1:] = is_image[:, 1:] & is_image[:, :-1]
        step = step * ~repeats
    return (step.cumsum(1) - 1).clamp(min=0)


def position_shift(ids: Sequence[int], shared_image: bool) -> int:
    """How far a prompt's rotary positions fall behind its indices (after its last image): the
    placeholders that did not advance the count. Decoding token i of the cache runs at i - shift."""
    if not shared_image:
        return 0
    return sum(1 for prev, cur in zip(ids, ids[1:]) if cur == IMAGE_TOKEN_ID and prev == IMAGE_TOKEN_ID)
