"""Canvas geometry, views, skip decisions and THE visual-token count. Pure functions, no torch.

An image of W x H pixels is padded to a square canvas of side S = max(W, H) (anchored
top-left for SPHINX-X training so that padding collects right/bottom, or centred as the
released checkpoints do), then resized to the model's canvas size. The canvas is cut into
`grid x grid` sub-images (row-major: TL, TR, BL, BR for 2x2); with grid > 1 a downsampled
global view of the whole canvas comes first. A sub-image that lies wholly in padding is
*skipped*: it is never encoded and stands in the LLM sequence as one skip token.

Both the processor (to lay out placeholder tokens) and the model (to check and fill them)
call `visual_token_count`; nothing else may compute that number.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Anchor = Literal["top-left", "center"]
ANCHORS: tuple[str, ...] = ("top-left", "center")

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1)


@dataclass(frozen=True)
class Canvas:
    """Where an image of `width` x `height` pixels sits on its square canvas (original pixels)."""

    width: int
    height: int
    side: int
    offset_x: int
    offset_y: int

    @property
    def content_box(self) -> Box:
        return (self.offset_x, self.offset_y, self.offset_x + self.width, self.offset_y + self.height)


def canvas_geometry(width: int, height: int, anchor: Anchor) -> Canvas:
    """The square canvas of an image; integer offsets so that padding is exact in pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor {anchor!r} (expected one of {ANCHORS})")
    side = max(width, height)
    if anchor == "top-left":
        return Canvas(width, height, side, 0, 0)
    return Canvas(width, height, side, (side - width) // 2, (side - height) // 2)


def cell_boxes(grid: int) -> list[Box]:
    """Sub-image boxes as fractions of the canvas, row-major."""
    if grid < 1:
        raise ValueError("grid must be >= 1")
    return [(c / grid, r / grid, (c + 1) / grid, (r + 1) / grid) for r in range(grid) for c in range(grid)]


def view_boxes(grid: int) -> list[Box]:
    """All views in sequence order: the global view first when grid > 1, then the cells."""
    cells = cell_boxes(grid)
    return cells if grid == 1 else [(0.0, 0.0, 1.0, 1.0), *cells]


def num_views(grid: int) -> int:
    return 1 if grid == 1 else 1 + grid * grid


def skipped_views(canvas: Canvas, grid: int, skip_tokens: bool = True) -> list[bool]:
    """Per view (in `view_boxes` order): True when it holds only padding and is skipped.

    Decided from geometry alone: a cell is skipped when it does not overlap the image's
    content rectangle with positive area. The global view is never skipped.
    """
    views = view_boxes(grid)
    if not skip_tokens or grid == 1:
        return [False] * len(views)
    x0, y0, x1, y1 = canvas.content_box
    s = canvas.side
    out = [False]  # global view
    for bx0, by0, bx1, by1 in views[1:]:
        overlap_w = min(x1, bx1 * s) - max(x0, bx0 * s)
        overlap_h = min(y1, by1 * s) - max(y0, by0 * s)
        out.append(not (overlap_w > 0 and overlap_h > 0))
    return out


def token_cells(grid: int, tokens_per_view: int) -> list[Box]:
    """The canvas box (fractions) of every visual-token slot of one image, views in sequence order.

    Within a view, token 0 is the expert's pooled token (its box is the whole view) and tokens
    1..g*g the expert's g x g map, row-major, each covering one cell of the view. Only layouts of
    that shape have places on the canvas (`tokens_per_view - 1` must be a square).
    """
    g = math.isqrt(tokens_per_view - 1) if tokens_per_view > 1 else 0
    if g < 1 or g * g != tokens_per_view - 1:
        raise ValueError(f"tokens_per_view {tokens_per_view} is not 1 + g*g: its tokens have no canvas cells")
    out: list[Box] = []
    for vx0, vy0, vx1, vy1 in view_boxes(grid):
        side = vx1 - vx0
        out.append((vx0, vy0, vx1, vy1))
        for r in range(g):
            for c in range(g):
                out.append((vx0 + c * side / g, vy0 + r * side / g, vx0 + (c + 1) * side / g, vy0 + (r + 1) * side / g))
    return out


def visual_token_count(tokens_per_view: int, skipped: Sequence[bool]) -> int:
    """THE number of LLM positions an image occupies.

    An encoded view costs `tokens_per_view` plus its start/end markers; a skipped view
    costs exactly one skip token.
    """
    return sum(1 if s else tokens_per_view + 2 for s in skipped)
