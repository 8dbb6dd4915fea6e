"""THE text format of boxes and points, and its mapping to original-image pixels.

Format (as the released SPHINX models read and write it): coordinates are fractions of the
*padded square canvas* (both axes divided by its side), two decimals, no spaces:
`[x1,y1,x2,y2]` for a box, `[x,y]` for a point; several are joined by `;`
(`[0.10,0.20,0.40,0.90];[0.50,0.50,0.70,0.80]`); a named object is written
`<p>dog</p> [0.10,0.20,0.40,0.90]`.

Parsing is lenient: model text is never trusted to be well formed, so `parse_regions`
never raises; it skips what it cannot read and clamps what it can.
Torch-free.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .tiling import Canvas

DECIMALS = 2
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_COORDS = re.compile(r"\[\s*(" + _NUM + r"(?:\s*,\s*" + _NUM + r")*)\s*\]")
_NAME = re.compile(r"<p>(.*?)</p>", re.DOTALL)


@dataclass(frozen=True)
class Region:
    """A box (4 coordinates) or a point (2), in canvas fractions, with an optional name."""

    coords: tuple[float, ...]
    label: str | None = None

    @property
    def is_box(self) -> bool:
        return len(self.coords) == 4

    @property
    def is_point(self) -> bool:
        return len(self.coords) == 2


def _fmt(v: float, decimals: int) -> str:
    return f"{min(max(v, 0.0), 1.0):.{decimals}f}"


def format_coords(coords: Sequence[float], decimals: int = DECIMALS) -> str:
    """`[0.10,0.20,0.40,0.90]` or `[0.50,0.50]`; values clamped to [0, 1].

    Two decimals is the released models' format; its resolution is 1% of the canvas side,
    so a pixel-exact round trip needs more decimals on canvases wider than 100 px.
    """
    if len(coords) not in (2, 4):
        raise ValueError(f"a box has 4 coordinates and a point 2, got {len(coords)}")
    return "[" + ",".join(_fmt(v, decimals) for v in coords) + "]"


def format_regions(regions: Iterable[Sequence[float]], decimals: int = DECIMALS) -> str:
    """Several boxes/points joined by `;`."""
    return ";".join(format_coords(r, decimals) for r in regions)


def format_named(label: str, regions: Sequence[Sequence[float]], decimals: int = DECIMALS) -> str:
    """`<p>dog</p> [..];[..]` — the grounded-object form."""
    return f"<p>{label}</p> {format_regions(regions, decimals)}"


def parse_regions(text: str) -> list[Region]:
    """Every box and point in `text`, in order, with the nearest preceding `<p>name</p>`.

    Never raises: lists of another length are ignored, numbers are clamped to [0, 1],
    boxes with swapped corners are reordered.
    """
    if not isinstance(text, str):
        return []
    names = [(m.end(), m.group(1).strip()) for m in _NAME.finditer(text)]
    out: list[Region] = []
    for m in _COORDS.finditer(text):
        try:
            values = [float(v) for v in m.group(1).split(",")]
        except ValueError:
            continue
        if len(values) not in (2, 4) or any(v != v for v in values):  # NaN check
            continue
        values = [min(max(v, 0.0), 1.0) for v in values]
        if len(values) == 4:
            x0, y0, x1, y1 = values
            values = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        label = None
        for end, name in names:
            if end <= m.start():
                label = name or None
        out.append(Region(tuple(values), label))
    return out


# --- canvas fractions <-> original pixels ---------------------------------------------
def pixels_to_canvas(coords: Sequence[float], canvas: Canvas) -> tuple[float, ...]:
    """Original-image pixel coordinates (x, y pairs) -> fractions of the padded canvas."""
    offs = (canvas.offset_x, canvas.offset_y)
    return tuple((v + offs[i % 2]) / canvas.side for i, v in enumerate(coords))


def canvas_to_pixels(coords: Sequence[float], canvas: Canvas) -> tuple[float, ...]:
    """Canvas fractions -> original-image pixels: scale by the side, remove the offset, clip."""
    offs = (canvas.offset_x, canvas.offset_y)
    limits = (canvas.width, canvas.height)
    return tuple(min(max(v * canvas.side - offs[i % 2], 0.0), float(limits[i % 2]))
                 for i, v in enumerate(coords))


def box_to_text(box_px: Sequence[float], canvas: Canvas, decimals: int = DECIMALS) -> str:
    """A pixel box/point of the original image, in the model's text format."""
    return format_coords(pixels_to_canvas(box_px, canvas), decimals)


def decimals_for_pixel_accuracy(side: int, max_error_px: float = 1.0) -> int:
    """Fewest decimals whose rounding error (half a step) stays within `max_error_px`."""
    d = DECIMALS
    while 0.5 * side * 10.0 ** -d > max_error_px:
        d += 1
    return d
