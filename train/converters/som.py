"""Set-of-Mark data from COCO-style box or polygon annotations.

Per image (at most `--max-marks` objects, the largest first), marks are numbered 1..n in a
seeded random order and drawn on a copy of the image with supervision: the number sits at
an interior point of each object (the point of its polygon farthest from the outline, or
the box centre), plus its box or polygon outline (`--mark point|box|polygon`). The copy is
saved as `OUT-folder/<images-dir>/<name>_som.jpg`. The dialogue (questions chosen per seed):
  * "What is mark 3?" -> "dog"
  * "Which mark is the dog?" -> "3" (several: "3, 5")
  * "Describe the marked regions." -> "1: dog [box]; 2: cat [box]" (always last: it holds
    every answer)
With `--image raw` nothing is drawn: the dialogue uses the original image and its first
question lists the marks in text ("Marks: 1 [x,y]; 2 [...]"), as SPHINX-X trains on it.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sphinx_model.boxes import box_to_text
from sphinx_model.conversation import Conversation
from sphinx_model.tiling import Canvas, canvas_geometry

from .base import (CommonOptions, ConvertError, Stats, check_option, chunked, dialogue, image_size, plain_folder,
                   register, size_ok)
from .coco import Box, CocoIndex, category_of, clip_box, image_canvas, load_coco

DESCRIBE_PROMPT = "Describe the marked regions."
MAX_MASK_SIDE = 1024  # the interior point is found on a mask at most this large
MAX_POLYGON_VALUES = 20_000  # coordinates in one polygon (10,000 vertices)
WHAT_PROMPT = "What is mark {}?"
WHICH_PROMPT = "Which mark is the {}?"


@dataclass(frozen=True)
class SomOptions:
    mark: Literal["point", "box", "polygon"] = field(default="box", metadata={
        "help": "what is drawn besides the number (polygon needs polygon segmentations)"})
    max_marks: int = field(default=20, metadata={"help": "most marks per image (largest objects first)"})
    questions: int = field(default=3, metadata={
        "help": "how many 'What is mark k?' and how many 'Which mark is the X?' turns per image"})
    image: Literal["marked", "raw"] = field(default="marked", metadata={
        "help": "marked: draw marks on a copy; raw: keep the original image and list marks in text"})
    images_dir: str = field(default="images", metadata={"help": "folder for marked images, under OUT's folder"})

    def __post_init__(self) -> None:
        check_option(1 <= self.max_marks <= 1000, "--max-marks must be in [1, 1000]")
        check_option(self.questions >= 0, "--questions must be >= 0")
        check_option(plain_folder(self.images_dir), "--images-dir must be a relative folder inside OUT's folder")


@dataclass(frozen=True)
class Mark:
    number: int
    name: str
    box: Box  # pixels
    point: tuple[float, float]  # where the number is drawn, pixels
    polygons: tuple[tuple[float, ...], ...]  # COCO flat [x, y, x, y, ...] lists; may be empty


@register("som", task="som", options=SomOptions)
def convert_som(source: Path, common: CommonOptions, options: SomOptions, stats: Stats) -> Iterator[Conversation]:
    """COCO-style boxes/polygons -> images with numbered marks + dialogues about the marks."""
    if options.image == "marked" and common.image_root is None:
        raise ConvertError("som needs --image-root (the source images) to draw marks")
    coco = load_coco(source, stats)
    if options.image == "marked":
        (common.out_dir / options.images_dir).mkdir(parents=True, exist_ok=True)
    for image_id, img in coco.images.items():
        conv = _image_dialogues(image_id, img, coco, common, options, stats)
        if conv is not None:
            yield from conv


def _image_dialogues(image_id: Any, img: dict[str, Any], coco: CocoIndex, common: CommonOptions,
                     options: SomOptions, stats: Stats) -> list[Conversation] | None:
    src = common.image_ref(img["file_name"])
    if common.image_missing(src):
        stats.skip("missing image")
        return None
    pixels = None
    if options.image == "marked":
        import cv2

        size = image_size(common.image_root / src)  # type: ignore[operator]
        if size is not None and not size_ok(*size):
            stats.skip("image too large")
            return None
        pixels = cv2.imread(str(common.image_root / src)) if size is not None else None  # type: ignore[operator]
        if pixels is None:
            stats.skip("unreadable image")
            return None
        canvas = canvas_geometry(pixels.shape[1], pixels.shape[0], common.anchor)
    else:
        canvas = image_canvas(img, src, common)
        if canvas is None:
            stats.skip("unknown image size")
            return None
    rng = common.rng("som", image_id)
    marks = _marks(coco.anns_by_image.get(image_id, []), coco, canvas, options, rng, stats)
    if not marks:
        stats.skip("image without objects")
        return None
    ref = src
    if pixels is not None:
        ref = f"{options.images_dir}/{'__'.join(Path(img['file_name']).with_suffix('').parts)}_som.jpg"
        draw_marks(pixels, marks, options.mark, common.out_dir / ref)
    pairs = som_pairs(marks, canvas, options.questions, rng)
    intro = "Marks: " + "; ".join(f"{m.number} {_mark_text(m, options.mark, canvas)}" for m in marks) + "\n"
    out = []
    for k, chunk in enumerate(chunked(pairs, common.max_turns)):
        if options.image == "raw":
            chunk = [(intro + chunk[0][0], chunk[0][1]), *chunk[1:]]
        out.append(dialogue(chunk, ref, id=f"som-{image_id}" + (f"#{k}" if k else ""), meta={"mark": options.mark}))
    return out


def _marks(anns: list[dict[str, Any]], coco: CocoIndex, canvas: Canvas, options: SomOptions,
           rng: Any, stats: Stats) -> list[Mark]:
    """Valid objects as marks: largest `max_marks`, numbered in a seeded random order."""
    objects = []
    for ann in anns:
        name, why = category_of(coco, ann)
        box = clip_box(ann.get("bbox"), canvas.width, canvas.height)
        polygons = _polygons(ann.get("segmentation"))
        reason = _reject(ann, name, why, box, polygons, options.mark)
        if reason:
            stats.skip(reason)
        else:
            objects.append((name, box, polygons))
    objects.sort(key=lambda o: -(o[1][2] - o[1][0]) * (o[1][3] - o[1][1]))
    stats.skip("object over --max-marks", max(0, len(objects) - options.max_marks))
    objects = objects[:options.max_marks]
    numbers = list(range(1, len(objects) + 1))
    rng.shuffle(numbers)
    marks = [Mark(n, name, box, interior_point(box, polys, canvas), polys)
             for n, (name, box, polys) in zip(numbers, objects)]
    return sorted(marks, key=lambda m: m.number)


def _reject(ann: dict[str, Any], name: str | None, why: str, box: Box | None, polygons: tuple,
            kind: str) -> str | None:
    """Why an annotation cannot become a mark, or None."""
    if ann.get("iscrowd"):
        return "crowd annotation"
    if name is None:
        return why
    if box is None:
        return "degenerate box"
    if kind == "polygon" and not polygons:
        return "annotation without polygon"
    return None


def _polygons(seg: Any) -> tuple[tuple[float, ...], ...]:
    """COCO polygon segmentation (list of flat lists); RLE and malformed parts give nothing."""
    if not isinstance(seg, list):
        return ()
    return tuple(tuple(float(v) for v in p) for p in seg
                 if isinstance(p, list) and 6 <= len(p) <= MAX_POLYGON_VALUES and len(p) % 2 == 0
                 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p))


def _mask(polygons: tuple[tuple[float, ...], ...], canvas: Canvas) -> Any:
    """The polygons filled on the whole (size-checked) image: for drawing outlines."""
    import numpy as np
    import supervision as sv

    mask = np.zeros((canvas.height, canvas.width), dtype=bool)
    for p in polygons:
        mask |= sv.polygon_to_mask(np.asarray(p).reshape(-1, 2), (canvas.width, canvas.height)).astype(bool)
    return mask


def interior_point(box: Box, polygons: tuple[tuple[float, ...], ...], canvas: Canvas) -> tuple[float, float]:
    """The polygon pixel farthest from the outline (so the number lands on the object), else the box centre.

    Computed on the polygons' own bounding box (clipped to the image, at most MAX_MASK_SIDE
    pixels a side), so the cost follows the object, never the size an annotation claims.
    """
    import cv2
    import numpy as np
    import supervision as sv

    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    points = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    if not points:
        return centre
    every = np.concatenate(points)
    x0, y0 = (max(0, math.floor(v)) for v in every.min(axis=0))
    x1, y1 = min(canvas.width, math.ceil(every[:, 0].max()) + 1), min(canvas.height, math.ceil(every[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return centre
    scale = min(1.0, MAX_MASK_SIDE / max(x1 - x0, y1 - y0))
    w, h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    mask = np.zeros((h + 2, w + 2), dtype=np.uint8)  # a zero border: distances stop at the crop's edge too
    for p in points:
        local = (p - (x0, y0)) * scale
        mask[1:-1, 1:-1] |= sv.polygon_to_mask(local, (w, h)).astype(np.uint8)
    if not mask.any():
        return centre
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (x0 + (x - 1) / scale, y0 + (y - 1) / scale)


def _mark_text(mark: Mark, kind: str, canvas: Canvas) -> str:
    return box_to_text(mark.point if kind == "point" else mark.box, canvas)


def som_pairs(marks: list[Mark], canvas: Canvas, questions: int, rng: Any) -> list[tuple[str, str]]:
    """Seeded "What is mark k?" / "Which mark is the X?" turns, then the full description."""
    what = rng.sample(marks, min(questions, len(marks)))
    names = list(dict.fromkeys(m.name for m in marks))
    which = rng.sample(names, min(questions, len(names)))
    pairs = [(WHAT_PROMPT.format(m.number), m.name) for m in what]
    pairs += [(WHICH_PROMPT.format(n), ", ".join(str(m.number) for m in marks if m.name == n)) for n in which]
    rng.shuffle(pairs)
    describe = "; ".join(f"{m.number}: {m.name} {box_to_text(m.box, canvas)}" for m in marks)
    return [*pairs, (DESCRIBE_PROMPT, describe)]


def draw_marks(pixels: Any, marks: list[Mark], kind: str, path: Path) -> None:
    """Draw outlines (box/polygon) and numbered labels with supervision; write a JPEG."""
    import cv2
    import numpy as np
    import supervision as sv

    h, w = pixels.shape[:2]
    ids = np.arange(len(marks))
    boxes = sv.Detections(xyxy=np.array([m.box for m in marks], dtype=float), class_id=ids)
    scene = pixels.copy()
    if kind == "box":
        scene = sv.BoxAnnotator(color_lookup=sv.ColorLookup.INDEX, thickness=2).annotate(scene, boxes)
    elif kind == "polygon":
        canvas = canvas_geometry(w, h, "top-left")
        boxes.mask = np.stack([_mask(m.polygons, canvas) for m in marks])
        scene = sv.PolygonAnnotator(color_lookup=sv.ColorLookup.INDEX, thickness=2).annotate(scene, boxes)
    points = sv.Detections(xyxy=np.array([[*m.point, *m.point] for m in marks], dtype=float), class_id=ids)
    scale = max(0.4, min(w, h) / 800)
    labels = sv.LabelAnnotator(color_lookup=sv.ColorLookup.INDEX, text_position=sv.Position.CENTER,
                               text_scale=scale, text_padding=max(2, int(6 * scale)))
    scene = labels.annotate(scene, points, labels=[str(m.number) for m in marks])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), scene, [cv2.IMWRITE_JPEG_QUALITY, 95])
