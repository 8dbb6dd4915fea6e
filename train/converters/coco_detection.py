"""COCO-style detection (COCO, Objects365, LVIS instances files) -> textualised detection.

One dialogue per image: "Detect all objects shown in the image." -> one line per category,
`<p>name</p> [box];[box]`, boxes in reading order (top to bottom, left to right) and
categories in the order of their first box. Boxes are fractions of the square canvas the
model sees (`--anchor`), formatted by `sphinx_model.boxes`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sphinx_model.boxes import format_named, pixels_to_canvas
from sphinx_model.conversation import Conversation
from sphinx_model.tiling import Canvas

from .base import CommonOptions, Stats, check_option, dialogue, register
from .coco import Box, CocoIndex, category_of, clip_box, image_canvas, load_coco, reading_order

DETECT_PROMPT = "Detect all objects shown in the image."


@dataclass(frozen=True)
class DetectionOptions:
    max_objects: int = field(default=100, metadata={
        "help": "most objects per image (first in reading order); the rest are counted as skipped"})

    def __post_init__(self) -> None:
        check_option(self.max_objects >= 1, "--max-objects must be >= 1")


@register("coco-detection", task="detection", options=DetectionOptions)
def convert_coco_detection(source: Path, common: CommonOptions, options: DetectionOptions,
                           stats: Stats) -> Iterator[Conversation]:
    """COCO/Objects365/LVIS detection JSON -> "Detect all objects" dialogues."""
    coco = load_coco(source, stats)
    for image_id, img in coco.images.items():
        ref = common.image_ref(img["file_name"])
        if common.image_missing(ref):
            stats.skip("missing image")
            continue
        canvas = image_canvas(img, ref, common)
        if canvas is None:
            stats.skip("unknown image size")
            continue
        objects = _objects(coco, image_id, canvas, stats)
        if not objects:
            stats.skip("image without objects")
            continue
        stats.skip("object over --max-objects", max(0, len(objects) - options.max_objects))
        answer = detection_answer(objects[:options.max_objects], canvas)
        yield dialogue([(DETECT_PROMPT, answer)], ref, id=f"detection-{image_id}")


def _objects(coco: CocoIndex, image_id: object, canvas: Canvas, stats: Stats) -> list[tuple[str, Box]]:
    """Valid (category name, pixel box) pairs of an image, in reading order."""
    out = []
    for ann in coco.anns_by_image.get(image_id, []):
        if ann.get("iscrowd"):
            stats.skip("crowd annotation")
            continue
        name, why = category_of(coco, ann)
        if name is None:
            stats.skip(why)
            continue
        box = clip_box(ann.get("bbox"), canvas.width, canvas.height)
        if box is None:
            stats.skip("degenerate box")
            continue
        out.append((name, box))
    return sorted(out, key=lambda nb: reading_order(nb[1]))


def detection_answer(objects: list[tuple[str, Box]], canvas: Canvas) -> str:
    """`<p>name</p> [..];[..]` per category, one line each, categories by first appearance."""
    by_name: dict[str, list[tuple[float, ...]]] = {}
    for name, box in objects:
        by_name.setdefault(name, []).append(pixels_to_canvas(box, canvas))
    return "\n".join(format_named(name, boxes) for name, boxes in by_name.items())
