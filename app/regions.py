"""Boxes and points named in model text, mapped onto the original image's pixels.

The model writes coordinates as fractions of its padded square canvas (`sphinx_model.boxes`);
`canvas_to_pixels` with the canvas of the *oriented* image (EXIF applied, as the model saw
it) takes them back to pixels of that image, for either anchor. Nothing else in the app
converts coordinates.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sphinx_model.boxes import canvas_to_pixels, format_coords, parse_regions
from sphinx_model.tiling import Canvas


@dataclass(frozen=True)
class PixelRegion:
    """A box (x0, y0, x1, y1) or a point (x, y) in original-image pixels, with its phrase."""

    label: str | None
    pixels: tuple[float, ...]
    canvas: tuple[float, ...]     # the same region in the model's text format (canvas fractions)

    @property
    def is_box(self) -> bool:
        return len(self.pixels) == 4

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The region as a box (a point becomes a zero-size box)."""
        if self.is_box:
            return tuple(self.pixels)  # type: ignore[return-value]
        x, y = self.pixels
        return (x, y, x, y)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": "box" if self.is_box else "point",
                "pixels": [round(v, 1) for v in self.pixels], "text": format_coords(self.canvas)}


def regions_in_pixels(text: str, canvas: Canvas) -> list[PixelRegion]:
    """Every box and point in `text`, on the original image of `canvas` (lenient: never raises)."""
    return [PixelRegion(r.label, canvas_to_pixels(r.coords, canvas), tuple(r.coords))
            for r in parse_regions(text)]


def regions_table(regions: Sequence[PixelRegion]) -> list[list[Any]]:
    """Rows for a table: label, kind, x0, y0, x1, y1 (points repeat x, y), model text."""
    rows = []
    for r in regions:
        x0, y0, x1, y1 = (round(v) for v in r.box)
        rows.append([r.label or "", "box" if r.is_box else "point", x0, y0, x1, y1, format_coords(r.canvas)])
    return rows


TABLE_HEADERS = ["label", "kind", "x0", "y0", "x1", "y1", "model text"]
