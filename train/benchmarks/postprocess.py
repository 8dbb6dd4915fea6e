"""Model answers -> what a task's metric reads: boxes moved off the padded canvas.

SPHINX-X writes boxes as fractions of the padded square canvas (`sphinx_model.boxes`).
Benchmarks score boxes in the original image: RefCOCO in lmms-eval as fractions of its width
and height, others in pixels. The answer is read with `sphinx_model.boxes.parse_regions`, each
box or point mapped with `canvas_to_pixels` through the processor's geometry of that image
(`SphinxProcessor.geometry`), and the answer becomes its regions in the task's space:
`<p>name</p> [x0,y0,x1,y1];[x,y]` — fractions through `sphinx_model.boxes.format_coords`, pixels
with three decimals. An answer without boxes is returned as it is.
"""
from __future__ import annotations

from collections.abc import Sequence

from sphinx_model.boxes import Region, canvas_to_pixels, format_coords, parse_regions
from sphinx_model.tiling import Canvas

from .prompts import BoxSpace

FRACTION_DECIMALS = 6  # ~0.001 px on a 1000 px image: IoU thresholds see the model's box, not rounding


def to_image_space(region: Region, canvas: Canvas, space: BoxSpace) -> tuple[float, ...]:
    """One region's coordinates in original pixels, or as fractions of the original image."""
    px = canvas_to_pixels(region.coords, canvas)
    if space == "pixels":
        return px
    size = (canvas.width, canvas.height)
    return tuple(v / size[i % 2] for i, v in enumerate(px))


def format_labelled(items: Sequence[tuple[str | None, Sequence[float]]], fractions: bool = True) -> str:
    """`<p>name</p> [..];[..]` for (label, coordinates) pairs; a label is written once per run.

    `fractions`: coordinates in [0, 1] (of an image or a canvas), written by `format_coords`;
    else pixels, three decimals.
    """
    pieces: list[str] = []
    previous: str | None = None
    for label, coords in items:
        text = (format_coords(coords, FRACTION_DECIMALS) if fractions
                else "[" + ",".join(f"{v:.3f}" for v in coords) + "]")
        if label and label != previous:
            text = f"<p>{label}</p> {text}"
        pieces.append(text)
        previous = label
    return ";".join(pieces)


def map_answer(text: str, canvas: Canvas, space: BoxSpace | None) -> str:
    """The answer as the task's metric should read it (see the module docstring)."""
    if space is None:
        return text
    regions = parse_regions(text)
    if not regions:
        return text
    return format_labelled([(r.label, to_image_space(r, canvas, space)) for r in regions], space == "image_fraction")


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the first of the task's stop strings (lmms-eval's `until`)."""
    cut = len(text)
    for stop in until:
        if stop:
            idx = text.find(stop)
            if 0 <= idx < cut:
                cut = idx
    return text[:cut].strip() if cut < len(text) else text
