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

from .base import CommonOptions, ConvertError, Stats, image_size, label_text, load_json, record_key, size_ok

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@dataclass
class CocoIndex:
    images: dict[Any, dict[str, Any]]  # id -> image record, in file order
    categories: dict[Any, str] = field(default_factory=dict)  # id -> name
    bad_categories: dict[Any, str] = field(default_factory=dict)  # id -> why its objects are skipped
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
        key = record_key(img.get("id")) if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if key is not None and isinstance(name, str) and name and "\x00" not in name:
            images[key] = img
        else:
            stats.skip("malformed image record")
    categories, bad = _categories(data.get("categories"), stats)
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    by_id: dict[Any, dict[str, Any]] = {}
    annotations = data.get("annotations") or []
    for ann in annotations if isinstance(annotations, list) else []:
        image_id = record_key(ann.get("image_id")) if isinstance(ann, dict) else None
        if image_id is None:
            stats.skip("malformed annotation")
        elif image_id not in images:
            stats.skip("annotation of unknown image")
        else:
            by_image[image_id].append(ann)
            if record_key(ann.get("id")) is not None:
                by_id[ann["id"]] = ann
    return CocoIndex(images, categories, bad, dict(by_image), by_id)


def _categories(raw: Any, stats: Stats) -> tuple[dict[Any, str], dict[Any, str]]:
    """(id -> name) of the usable categories, and (id -> skip reason) of the others."""
    good: dict[Any, str] = {}
    bad: dict[Any, str] = {}
    for c in raw if isinstance(raw, list) else []:
        key = record_key(c.get("id")) if isinstance(c, dict) else None
        if key is None:
            stats.skip("malformed category")
            continue
        name = label_text(c.get("name"))
        if name is not None:
            good[key] = name
        else:
            bad[key] = "category name with box markup" if isinstance(c.get("name"), str) and c["name"].strip() \
                else "malformed category"
    return good, bad


def category_of(coco: CocoIndex, ann: dict[str, Any]) -> tuple[str | None, str]:
    """(name, "") of an annotation's category, or (None, why it is skipped)."""
    key = record_key(ann.get("category_id"))
    if key in coco.categories:
        return coco.categories[key], ""
    return None, coco.bad_categories.get(key, "unknown category")


def load_coco(path: Path, stats: Stats, need_annotations: bool = True) -> CocoIndex:
    return index_coco(load_json(path), stats, str(path), need_annotations)


def image_canvas(img: dict[str, Any], ref: str, common: CommonOptions) -> Canvas | None:
    """The canvas of an image: size from the record, else from the file under the image root;
    None when neither gives a plausible size (see `size_ok`)."""
    w, h = img.get("width"), img.get("height")
    if not size_ok(w, h) and common.image_root is not None:
        size = image_size(common.image_root / ref)
        if size is not None:
            w, h = size
    if not size_ok(w, h):  # not two positive integers, or a canvas larger than the model takes
        return None
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
