"""Boxes, points and numbered marks drawn with supervision on the original (oriented) image.

Coordinates arrive in pixels of the image as given (see `regions.py`); drawing never
rescales or pads, so a box lands on the pixels it names for any aspect ratio and anchor.
Line widths and text sizes follow the image size so that marks stay legible on large
photos and do not swamp small scenes.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import supervision as sv
from PIL import Image

from .regions import PixelRegion

MARK_FILL = sv.Color(r=20, g=20, b=20)           # dark disc / tab with a white number, as in training scenes
HIGHLIGHT = sv.Color(r=255, g=200, b=0)
PALETTE = sv.ColorPalette.DEFAULT


@dataclass(frozen=True)
class Mark:
    """A numbered Set-of-Mark: a box, or a point (x, y), in original-image pixels."""

    number: int
    pixels: tuple[float, ...]
    source: str = "user"          # "user", "model" or "opencv"

    @property
    def is_box(self) -> bool:
        return len(self.pixels) == 4

    @property
    def center(self) -> tuple[float, float]:
        if self.is_box:
            x0, y0, x1, y1 = self.pixels
            return ((x0 + x1) / 2, (y0 + y1) / 2)
        return (self.pixels[0], self.pixels[1])


def _ascii(text: str) -> str:
    """OpenCV's fonts draw ASCII only: accents folded, anything else becomes '?'."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(c if c.isprintable() else "?" for c in folded) or "?"


def _scale(image: Image.Image) -> tuple[int, float]:
    side = min(image.size)
    return max(1, round(side / 250)), max(0.35, side / 900)


def _detections(boxes: Sequence[Sequence[float]]) -> sv.Detections:
    xyxy = np.array([[round(v) for v in b] for b in boxes], dtype=float).reshape(-1, 4)
    return sv.Detections(xyxy=xyxy, class_id=np.arange(len(xyxy)))


def draw_regions(image: Image.Image, regions: Sequence[PixelRegion]) -> Image.Image:
    """Boxes with their phrase, points as dots with their phrase; a new image."""
    out = image.convert("RGB").copy()
    if not regions:
        return out
    thickness, text_scale = _scale(out)
    boxes = [r for r in regions if r.is_box]
    points = [r for r in regions if not r.is_box]
    if boxes:
        det = _detections([r.box for r in boxes])
        out = sv.BoxAnnotator(color=PALETTE, thickness=thickness).annotate(out, det)
        labels = [_ascii(r.label or f"box {i + 1}") for i, r in enumerate(boxes)]
        out = sv.LabelAnnotator(color=PALETTE, text_scale=text_scale, text_padding=3 * thickness,
                                smart_position=True).annotate(out, det, labels)
    if points:
        det = _detections([r.box for r in points])
        radius = 3 + 2 * thickness
        out = sv.DotAnnotator(color=PALETTE, radius=radius, outline_thickness=1,
                              outline_color=sv.Color.WHITE).annotate(out, det)
        labels = [_ascii(r.label or f"point {i + 1}") for i, r in enumerate(points)]
        out = sv.LabelAnnotator(color=PALETTE, text_scale=text_scale, text_padding=3 * thickness,
                                text_position=sv.Position.TOP_CENTER, text_offset=(0, -radius - 2),
                                smart_position=True).annotate(out, det, labels)
    return out


def draw_marks(image: Image.Image, marks: Sequence[Mark], highlight: Collection[int] = ()) -> Image.Image:
    """Numbered marks (a dark tab with a white number); marks in `highlight` drawn in yellow."""
    out = image.convert("RGB").copy()
    if not marks:
        return out
    thickness, text_scale = _scale(out)
    boxed = [m for m in marks if m.is_box]
    if boxed:
        lookup = np.array([1 if m.number in highlight else 0 for m in boxed])
        palette = sv.ColorPalette([MARK_FILL, HIGHLIGHT])
        det = _detections([m.pixels for m in boxed])
        out = sv.BoxAnnotator(color=palette, thickness=thickness + 1).annotate(
            out, det, custom_color_lookup=lookup)
    centers = [(*m.center, *m.center) for m in marks]
    det = _detections(centers)
    lookup = np.array([1 if m.number in highlight else 0 for m in marks])
    out = sv.LabelAnnotator(color=sv.ColorPalette([MARK_FILL, HIGHLIGHT]),
                            text_color=sv.ColorPalette([sv.Color.WHITE, sv.Color.BLACK]),
                            text_scale=text_scale * 1.2, text_thickness=max(1, thickness),
                            text_padding=2 + 2 * thickness, text_position=sv.Position.CENTER,
                            border_radius=4 + 2 * thickness).annotate(
        out, det, [str(m.number) for m in marks], custom_color_lookup=lookup)
    return out
