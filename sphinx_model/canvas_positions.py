"""Canvas positions of visual tokens: what lets the LLM *point*.

A convolutional expert's token says what is in its cell, not where the cell is; in the LLM's
sequence a visual token's place on the canvas is known only through its index. A box answer,
though, must write canvas coordinates. With `SphinxConfig.canvas_positions` on, every visual
token gets a learned embedding of its slot (view, cell) added after the projector, initialised
with sine-cosine features of the slot's canvas box (`tiling.token_cells`), four groups of d/4
channels, one per box edge (x0, y0, x1, y1). The coordinate tokens `0.00`..`1.00` can start from
the same features of their value (`coordinate_features`), so "which token sits here" and "which
coordinate to write" are the same direction in the residual stream from step 0.

With `box_positions` too, a linear read-out of each token's expert features gives the box edges of
what the token holds relative to its cell (cell units; it starts at the cell itself, and the expert
pretraining's own box head can initialise it); placed in the cell, the box's sin-cos features are
added as well. A token then carries the very coordinates an answer writes about its object.

Off in every released preset (their checkpoints have no such table, and parity is untouched).
"""
from __future__ import annotations

import torch
from torch import nn

from .tiling import token_cells

MIN_FREQ, MAX_FREQ = 1.0, 400.0  # radians per canvas side: from the whole canvas down to ~1/60 of it


def sincos(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) values in [0, 1] -> (..., dim) [sin(w_k v), cos(w_k v)] over dim/2 geometric frequencies."""
    if dim % 2:
        raise ValueError(f"sincos needs an even width, got {dim}")
    k = dim // 2
    freqs = MIN_FREQ * (MAX_FREQ / MIN_FREQ) ** (torch.arange(k, dtype=torch.float64) / max(k - 1, 1))
    angles = values[..., None] * freqs.to(values.dtype)                   # (..., k)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)                # (..., dim)


def box_features(boxes: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., 4) boxes -> (..., dim): one sincos group of dim/4 channels per edge."""
    if dim % 8:
        raise ValueError(f"canvas positions need a hidden size divisible by 8, got {dim}")
    return torch.cat([sincos(boxes[..., i], dim // 4) for i in range(4)], dim=-1)


def coordinate_features(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) coordinate values -> (N, dim): the value in all four edge groups, so a coordinate token
    lines up with a slot whose edge (whichever the answer is writing) has that value."""
    return box_features(values[:, None].expand(-1, 4), dim) / 2.0  # four groups: keep the norm near a slot's


class CanvasPositions(nn.Module):
    """One learned vector per visual-token slot: (views * tokens_per_view, d); with `readout_dim`, also
    the sin-cos code of the box a linear read-out of the token's features places in its cell."""

    def __init__(self, grid: int, tokens_per_view: int, dim: int, readout_dim: int | None = None,
                 readout_hidden: int = 0):
        super().__init__()
        cells = torch.tensor(token_cells(grid, tokens_per_view), dtype=torch.float64)  # (V*T, 4)
        self.tokens_per_view = tokens_per_view
        self.table = nn.Parameter(box_features(cells, dim).float())           # (V*T, d)
        self.register_buffer("cells", cells.float().view(-1, tokens_per_view, 4), persistent=False)
        self.readout = None
        self.box_scale = None
        if readout_dim is not None:
            # cell-relative edges, in cell units: linear, or through a GELU hidden layer (`readout_hidden`)
            self.readout = nn.Linear(readout_dim, 4) if not readout_hidden else nn.Sequential(
                nn.Linear(readout_dim, readout_hidden), nn.GELU(), nn.Linear(readout_hidden, 4))
            # the box code's size in the residual stream (sin-cos has norm ~sqrt(d/2)); learned, so a
            # recipe can start it at the text embeddings' scale
            self.box_scale = nn.Parameter(torch.ones(()))
            last = self.readout if readout_hidden == 0 else self.readout[-1]
            nn.init.zeros_(last.weight)
            with torch.no_grad():
                last.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))           # starts at the cell itself

    def forward(self, views: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) view index of each encoded view [, (K, T, c) their features] -> (K, T, d), in float32:
        under bf16 autocast the read-out box would lose the precision its high frequencies need."""
        with torch.autocast(views.device.type, enabled=False):
            return self._positions(views, features)

    def _positions(self, views: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        d = self.table.shape[-1]
        pos = self.table.view(-1, self.tokens_per_view, d)[views]             # (K, T, d)
        if self.readout is None:
            return pos
        if features is None:
            raise ValueError("box positions need the tokens' expert features")
        return pos.float() + self.box_scale.float() * box_features(self.boxes(views, features), d)

    def boxes(self, views: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The read-out boxes in canvas fractions -> (K, T, 4)."""
        rel = self.readout(features.float()).float()                          # (K, T, 4) in cell units
        cell = self.cells[views]                                              # (K, T, 4)
        size = torch.cat([cell[..., 2:] - cell[..., :2]] * 2, dim=-1)         # (w, h, w, h)
        origin = torch.cat([cell[..., :2]] * 2, dim=-1)                       # (x0, y0, x0, y0)
        return origin + rel * size


def init_coordinate_embeddings(weight: torch.Tensor, token_ids: list[int], values: list[float]) -> None:
    """Overwrite the rows of the coordinate tokens (input embeddings or LM head) with their value's
    features, scaled to the rows' current norm."""
    if len(token_ids) != len(values):
        raise ValueError("one value per coordinate token")
    with torch.no_grad():
        feats = coordinate_features(torch.tensor(values, dtype=torch.float64), weight.shape[1]).float()
        scale = weight[token_ids].norm(dim=1).mean() / feats.norm(dim=1).mean()
        weight[token_ids] = (feats * scale).to(weight.dtype)
