"""Dense training targets for the visual experts, per view, from a scene's truth.

A view is a square region of the model's canvas (`sphinx_model.tiling.view_boxes`); an
expert cuts it into a g x g grid of tokens. Each object, word and mark is assigned to the
token that holds its box centre (the largest wins a shared token); that token learns what
it is (shape, colour, size / word / mark number) and where its box edges are, twice: relative
to the token's own cell (easy for a convolution), and in the view's own frame, 0-1 from its
top-left corner (what the LLM must write: in the global view that frame is the canvas the
box coordinates are given in). Reading is taught per cell: each token learns the letters whose
centres fall in its own cell on the word's row (`cell_chars`, left to right), so a word is read
by walking the cells it spans, and no token has to hold letters far outside its cell. Token 0 (global) learns how many objects of each shape and colour
the view holds. This is the stand-in for CLIP/DINOv2 pretraining: it teaches the experts to
see this world before they are frozen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sphinx_model.boxes import pixels_to_canvas
from sphinx_model.tiling import Anchor, canvas_geometry, view_boxes

from .letters import letter_centres
from .scene import Scene, WorldWord
from .vocab import COLOUR_NAMES, SHAPES, SIZES, WORDS

WORD_INDEX = {w: i + 1 for i, w in enumerate(WORDS)}  # 0 = no word
MAX_MARK = 8
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_CHARS = 10                  # longer than any word of the world (a test checks)
CASES = ("lower", "upper", "capitalised")
CELL_SLOTS = 4                  # letters a token cell holds; a cell with more is left out of the loss


@dataclass
class ViewTargets:
    """Targets of N views of grid g (tensors shaped (N, g*g) or (N, g*g, 4) / (N, C))."""

    obj: torch.Tensor      # (N, G) 1 where an object's centre falls
    shape: torch.Tensor    # (N, G) class, -100 where no object
    colour: torch.Tensor   # (N, G)
    size: torch.Tensor     # (N, G)
    obj_box: torch.Tensor  # (N, G, 4) box edges relative to the cell, in cell units
    obj_where: torch.Tensor  # (N, G, 4) box edges in the view's frame, 0-1
    word: torch.Tensor     # (N, G) word index (case-folded), 0 = none
    word_box: torch.Tensor  # (N, G, 4)
    word_where: torch.Tensor  # (N, G, 4)
    mark: torch.Tensor     # (N, G) mark number, 0 = none
    chars: torch.Tensor    # (N, G, MAX_CHARS) the word's letters (1..26, case-folded), 0 after its end, -100 no word
    case: torch.Tensor     # (N, G) index in CASES, -100 where no word
    cell_chars: torch.Tensor  # (N, G, CELL_SLOTS) letters (1..26) whose centre is in the cell, on the word's row,
                              # left to right, 0 after the last; -100 where the cell holds no letter (or too many)
    counts: torch.Tensor   # (N, len(SHAPES) + len(COLOURS)) objects per shape and colour whose centre is in view


def _assign(items: list[tuple[tuple[float, ...], dict]], view: tuple[float, ...], grid: int) -> dict[int, tuple]:
    """item centre -> token index within `view`; the largest item wins a token."""
    vx0, vy0, vx1, vy1 = view
    side = vx1 - vx0
    out: dict[int, tuple] = {}
    for box, payload in items:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if not (vx0 <= cx < vx1 and vy0 <= cy < vy1):
            continue
        c, r = int((cx - vx0) / side * grid), int((cy - vy0) / side * grid)
        k = r * grid + c
        area = (box[2] - box[0]) * (box[3] - box[1])
        if k not in out or area > out[k][0]:
            cell = (vx0 + c * side / grid, vy0 + r * side / grid)
            rel = tuple(((box[i] - cell[i % 2]) / (side / grid)) for i in range(4))  # cell units
            where = tuple((box[i] - view[i % 2]) / side for i in range(4))           # view frame, 0-1
            out[k] = (area, rel, where, payload)
    return out


def spell(text: str) -> tuple[np.ndarray, int]:
    """A word -> (its letters as 1..26, 0-padded to MAX_CHARS; its case as an index in CASES)."""
    letters = np.zeros(MAX_CHARS, dtype=np.int64)
    folded = text.lower()[:MAX_CHARS]
    letters[:len(folded)] = [LETTERS.index(c) + 1 if c in LETTERS else 0 for c in folded]
    case = 1 if text.isupper() and len(text) > 1 else 2 if text[:1].isupper() else 0
    return letters, case


def view_targets(scene: Scene, anchor: Anchor, grid_views: int, tokens_grid: int) -> ViewTargets:
    """Targets for every view of the scene's canvas (global first, then the cells)."""
    canvas = canvas_geometry(scene.width, scene.height, anchor)
    objects = [(pixels_to_canvas(o.box, canvas), {"shape": SHAPES.index(o.shape), "colour": COLOUR_NAMES.index(o.colour),
                                                   "size": SIZES.index(o.size), "mark": o.mark or 0})
               for o in scene.objects]
    words = [(pixels_to_canvas(w.box, canvas), {"word": WORD_INDEX.get(w.text.lower(), 0), "text": w.text})
             for w in scene.words]
    views = view_boxes(grid_views)
    n, g2 = len(views), tokens_grid * tokens_grid
    t = {k: np.full((n, g2), -100, dtype=np.int64) for k in ("shape", "colour", "size")}
    obj = np.zeros((n, g2), dtype=np.float32)
    obj_box = np.zeros((n, g2, 4), dtype=np.float32)
    obj_where = np.zeros((n, g2, 4), dtype=np.float32)
    word = np.zeros((n, g2), dtype=np.int64)
    word_box = np.zeros((n, g2, 4), dtype=np.float32)
    word_where = np.zeros((n, g2, 4), dtype=np.float32)
    mark = np.zeros((n, g2), dtype=np.int64)
    chars = np.full((n, g2, MAX_CHARS), -100, dtype=np.int64)
    case = np.full((n, g2), -100, dtype=np.int64)
    counts = np.zeros((n, len(SHAPES) + len(COLOUR_NAMES)), dtype=np.float32)
    cell_chars = np.full((n, g2, CELL_SLOTS), -100, dtype=np.int64)
    letters = [(_letters_in_canvas(w, cbox), cbox) for w, (cbox, _) in zip(scene.words, words)]
    for v, view in enumerate(views):
        _fill_cells(cell_chars[v], letters, view, tokens_grid)
        for k, (_, rel, where, p) in _assign(objects, view, tokens_grid).items():
            obj[v, k] = 1.0
            for name in ("shape", "colour", "size"):
                t[name][v, k] = p[name]
            obj_box[v, k], obj_where[v, k] = rel, where
            mark[v, k] = min(p["mark"], MAX_MARK)
        for k, (_, rel, where, p) in _assign(words, view, tokens_grid).items():
            word[v, k] = p["word"]
            chars[v, k], case[v, k] = spell(p["text"])
            word_box[v, k], word_where[v, k] = rel, where
        for box, p in objects:
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            if view[0] <= cx < view[2] and view[1] <= cy < view[3]:
                counts[v, p["shape"]] += 1
                counts[v, len(SHAPES) + p["colour"]] += 1
    as_t = torch.from_numpy
    return ViewTargets(as_t(obj), as_t(t["shape"]), as_t(t["colour"]), as_t(t["size"]), as_t(obj_box),
                       as_t(obj_where), as_t(word), as_t(word_box), as_t(word_where), as_t(mark), as_t(chars),
                       as_t(case), as_t(cell_chars), as_t(counts))


def _letters_in_canvas(word: WorldWord, cbox: tuple[float, ...]) -> list[tuple[float, int]]:
    """(x centre in canvas units, letter 1..26) for each a-z letter of the word (case folded)."""
    x0, _, x1, _ = word.box
    scale = (cbox[2] - cbox[0]) / max(1e-6, x1 - x0)
    return [(cbox[0] + (x - x0) * scale, LETTERS.index(ch) + 1)
            for x, ch in zip(letter_centres(word), word.text.lower()) if ch in LETTERS]


def _fill_cells(out: np.ndarray, letters: list, view: tuple[float, ...], grid: int) -> None:
    """Each letter -> the cell of `view` holding its centre (column) on its word's centre line (row)."""
    vx0, vy0, vx1, vy1 = view
    side = vx1 - vx0
    cells: dict[int, list[tuple[float, int]]] = {}
    for word_letters, cbox in letters:
        cy = (cbox[1] + cbox[3]) / 2
        if not vy0 <= cy < vy1:
            continue
        r = int((cy - vy0) / side * grid)
        for x, letter in word_letters:
            if vx0 <= x < vx1:
                cells.setdefault(r * grid + int((x - vx0) / side * grid), []).append((x, letter))
    for k, held in cells.items():
        if len(held) <= CELL_SLOTS:
            out[k] = 0
            out[k, :len(held)] = [letter for _, letter in sorted(held)]
