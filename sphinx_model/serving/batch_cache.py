"""The batch's KV cache layer: room for the next positions, and left padding to join rows.

DynamicCache lacks two things the batcher needs: a decode step that does not copy the whole
batch's keys and values (`RoomyLayer`), and a row's cache left-padded to the batch's width
before the rows are stacked (`pad_left`; the batch's attention mask hides the padding).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """The batch's cache layer: a decode step writes its position into room kept after the
    last one instead of concatenating (DynamicLayer's `torch.cat` copies the whole batch's
    keys and values every step: half of a batch-8 step's time for the demo model on CPU).
    `keys` / `values` stay what DynamicLayer's are, (rows, heads, positions, head_dim) tensors
    (views of the buffers); whatever replaces them (a join, rows leaving, trimmed columns) gets
    new buffers at the next step."""

    ROOM = 64                                    # positions of room made at each regrowth

    @classmethod
    def taking(cls, layer: DynamicLayer) -> RoomyLayer:
        roomy = cls()
        roomy.__dict__.update(layer.__dict__)
        roomy._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        roomy._view: torch.Tensor | None = None  # the `keys` it handed out last (replaced: new buffers)
        return roomy

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        used, n = self.keys.shape[-2], key_states.shape[-2]
        bufs = self._buffers
        if bufs is None or self.keys is not self._view or used + n > bufs[0].shape[-2]:
            rows, heads, _, dim = self.keys.shape
            bufs = tuple(t.new_empty(rows, heads, used + n + self.ROOM, dim) for t in (self.keys, self.values))
            bufs[0][:, :, :used].copy_(self.keys)
            bufs[1][:, :, :used].copy_(self.values)
            self._buffers = bufs
        bufs[0][:, :, used:used + n].copy_(key_states)
        bufs[1][:, :, used:used + n].copy_(value_states)
        self.keys, self.values = bufs[0][:, :, :used + n], bufs[1][:, :, :used + n]
        self._view = self.keys
        return self.keys, self.values


def pad_left(cache: DynamicCache, n: int) -> None:
    """n zero positions before every row's keys and values (masked out by the caller)."""
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, n, 0))
        layer.values = F.pad(layer.values, (0, 0, n, 0))
