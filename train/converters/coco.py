"""Reading the COCO annotation layout shared by COCO, Objects365, LVIS and RefCOCO's instances.

The layout: `{"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id",
"image_id", "category_id", "bbox": [x, y, w, h] (pixels), "iscrowd"?, "segmentation"?}],
"categories": [{"id", "name"}]}`. Not a format of its own (no converter is registered here).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphinx_model.tiling import Canvas, canvas_geometry

from .base import CommonOptions, ConvertError, Stats, image_size, load_json

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@dataclass
class CocoIndex:
    images: dict[Any, dict[str, Any]]  # id -> image record, in file order
    categories: dict[Any, str] = field(default_factory=dict)  # id -> name
    anns_by_image: dict[Any, list[dict[str, Any]]] = field(default_factory=dict)  # in file order
    anns_by_id: dict[Any, dict[str, Any]] = field(default_factory=dict)


def index_coco(data: Any, stats: Stats, where: str, need_annotations: bool = True) -> CocoIndex:
    """Index a loaded COCO-layout object; malformed images/annotations are skipped and counted."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ConvertError(f"{where}: not a COCO-style annotation file (needs an 'images' list)")
    if need_annotations and not isinstance(data.get("annotations"), list):
        raise ConvertError(f"{where}: not a COCO-style annotation file (needs an 'annotations' list)")
    images: dict[Any, dict[str, Any]] = {}
    for img in data["images"]:
        if isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str):
            images[img["id"]] = img
        else:
            stats.skip("malformed image record")
    categories = {c["id"]: str(c["name"]) for c in data.get("categories") or []
                  if isinstance(c, dict) and "id" in c and "name" in c}
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    by_id: dict[Any, dict[str, Any]] = {}
    for ann in data.get("annotations") or []:
        if not isinstance(ann, dict) or "image_id" not in ann:
            stats.skip("malformed annotation")
        elif ann["image_id"] not in images:
            stats.skip("annotation of unknown image")
        else:
            by_image[ann["image_id"]].append(ann)
            if "id" in ann:
                by_id[ann["id"]] = ann
    return CocoIndex(images, categories, dict(by_image), by_id)


def load_coco(path: Path, stats: Stats, need_annotations: bool = True) -> CocoIndex:
    return index_coco(load_json(path), stats, str(path), need_annotations)


def image_canvas(img: dict[str, Any], ref: str, common: CommonOptions) -> Canvas | None:
    """The canvas of an image: size from the record, else from the file under the image root."""
    w, h = img.get("width"), img.get("height")
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        size = image_size(common.image_root / ref) if common.image_root is not None else None
        if size is None:
            return None
        w, h = size
    return canvas_geometry(w, h, common.anchor)


def clip_box(bbox: Any, width: int, height: int, min_side: float = 1.0) -> Box | None:
    """COCO [x, y, w, h] -> (x0, y0, x1, y1) clipped to the image; None when degenerate.

    Degenerate: not four finite numbers, or a side under `min_side` pixels after clipping
    (such a box collapses to a point at two decimals anyway).
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < min_side or y1 - y0 < min_side:
        return None
    return (x0, y0, x1, y1)


def reading_order(box: Box) -> tuple[float, float]:
    """Sort key: top to bottom, then left to right."""
    return (box[1], box[0])
