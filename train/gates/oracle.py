"""Oracle visual features: what perfect experts would hand the LLM, built from a scene's truth.

Per view token (`train.world.targets`, the same assignment the experts are trained on): is an
object there, its shape / colour / size / mark (one-hot) and its box edges relative to the
token's own cell (what a convolution can see locally); is a word there, which one, and its
cell-relative box. Token 0 of each view carries the view's counts per shape and colour. No
canvas position is in them: where a token sits is the model's business (`canvas_positions`).

Text comes in one of two forms (`text`): "word", the word's identity (one-hot) at the token that
holds its centre, which no real expert gives; or "cells", what Gate B's experts are taught to read
(`read_cells`): in every token, the letters whose centres fall in its cell on a word's row (up to
CELL_SLOTS, left to right), and the word's case at its centre token; the word one-hot is then
left empty, so the LLM has to spell a word by walking the cells under it, as it will on real tokens.
The pooled token also gives each count as a thermometer code (channel k of a shape or colour is on when
at least k such objects are in view): the projector's LayerNorm keeps a pattern of channels, where the
plain counts (scaled, in their own channels) come out of it mostly as a direction with little size.
The "cells" and thermometer channels sit after the counts, so a run trained before they existed loads
with them silent (`pointing.load_gate_weights` pads the projector's new columns with zeros).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sphinx_model.tiling import Anchor

from ..world.scene import Scene
from ..world.targets import CASES, CELL_SLOTS, LETTERS, MAX_MARK, ViewTargets, view_targets
from ..world.vocab import COLOUR_NAMES, SHAPES, SIZES, WORDS

COUNTS = len(SHAPES) + len(COLOUR_NAMES)
LETTER_CLASSES = len(LETTERS) + 1                          # per cell slot: 0 after the cell's last letter, 1..26 a-z
TEXT_FORMS = ("word", "cells")
OBJ = 0                                                    # channel of "an object is here"
SHAPE = OBJ + 1                                            # first of its one-hot shape channels
COLOUR = SHAPE + len(SHAPES)                               # ... colour channels
SIZE = COLOUR + len(COLOUR_NAMES)                          # ... size channels
OBJ_BOX = SIZE + len(SIZES)                                # its 4 cell-relative edges
HAS_WORD = OBJ_BOX + 4 + MAX_MARK + 1
WORD = HAS_WORD + 2                                        # first word's one-hot channel (HAS_WORD + 1: no word)
WORD_BOX = HAS_WORD + 1 + len(WORDS) + 1
COUNTS_AT = WORD_BOX + 4                                   # the pooled token's counts per shape and colour
CELL_LETTERS = COUNTS_AT + COUNTS                          # "cells": CELL_SLOTS one-hots of LETTER_CLASSES
CASE = CELL_LETTERS + CELL_SLOTS * LETTER_CLASSES          # "cells": the word's case (CASES) at its centre token
COUNT_LEVELS = 8                                           # a world scene holds at most 8 objects
COUNT_CODE = CASE + len(CASES)                             # the pooled token's counts as thermometer codes
FEATURES = COUNT_CODE + COUNTS * COUNT_LEVELS


def _one_hot(labels: torch.Tensor, n: int) -> torch.Tensor:
    """(N, G) class ids, -100 / out of range where absent -> (N, G, n), zeros where absent."""
    valid = (labels >= 0) & (labels < n)
    return F.one_hot(labels.clamp(0, n - 1), n).float() * valid[..., None]


def oracle_features(t: ViewTargets, text: str = "word") -> torch.Tensor:
    """ViewTargets of N views with a g x g grid -> (N, 1 + g*g, FEATURES); `text` one of TEXT_FORMS."""
    if text not in TEXT_FORMS:
        raise ValueError(f"text={text!r}: one of {TEXT_FORMS}")
    obj = t.obj[..., None]                                               # (N, G, 1)
    has_word = (t.word > 0).float()[..., None]
    cells = text == "cells"
    word = torch.zeros(*t.obj.shape, len(WORDS) + 1) if cells else _one_hot(t.word, len(WORDS) + 1) * has_word
    letters = _one_hot(t.cell_chars, LETTER_CLASSES).flatten(2) if cells else \
        torch.zeros(*t.obj.shape, CELL_SLOTS * LETTER_CLASSES)
    case = _one_hot(t.case, len(CASES)) * has_word if cells else torch.zeros(*t.obj.shape, len(CASES))
    grid = torch.cat([
        obj, _one_hot(t.shape, len(SHAPES)), _one_hot(t.colour, len(COLOUR_NAMES)), _one_hot(t.size, len(SIZES)),
        t.obj_box * obj, _one_hot(t.mark, MAX_MARK + 1) * obj,
        has_word, word, t.word_box * has_word,
        torch.zeros(*t.obj.shape, COUNTS), letters, case, torch.zeros(*t.obj.shape, COUNTS * COUNT_LEVELS),
    ], dim=-1)                                                           # (N, G, F)
    pooled = torch.zeros(t.obj.shape[0], 1, FEATURES)
    pooled[:, 0, COUNTS_AT:COUNTS_AT + COUNTS] = t.counts / 4.0          # counts, roughly unit scale
    levels = torch.arange(1, COUNT_LEVELS + 1, dtype=t.counts.dtype)
    pooled[:, 0, COUNT_CODE:] = (t.counts[..., None] >= levels).float().flatten(1)
    return torch.cat([pooled, grid], dim=1)                              # (N, 1 + G, F)


def scene_features(scene: Scene, anchor: Anchor, grid: int, token_grid: int, text: str = "word") -> torch.Tensor:
    """Every view's oracle tokens of one scene -> (V, 1 + g*g, FEATURES)."""
    return oracle_features(view_targets(scene, anchor, grid, token_grid), text)


def perfect_box_readout(readout: torch.nn.Linear) -> None:
    """Set a `box_positions` read-out to what a perfect expert's linear box head is on these features:
    an object's or word's cell-relative edges where one is, the cell itself elsewhere."""
    with torch.no_grad():
        readout.weight.zero_()
        cell = torch.tensor([0.0, 0.0, 1.0, 1.0])
        readout.bias.copy_(cell)
        for i in range(4):
            readout.weight[i, OBJ_BOX + i] = 1.0
            readout.weight[i, WORD_BOX + i] = 1.0
        readout.weight[:, OBJ] = -cell
        readout.weight[:, HAS_WORD] = -cell
