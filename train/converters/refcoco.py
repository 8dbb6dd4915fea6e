"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions -> grounding dialogues, both ways.

Accepted input (the common JSON export of the `refs(*).p` pickles):
  * IN = a JSON list of refs, with `--instances instances.json` (COCO layout: `images` with
    file_name/width/height, `annotations` with id/bbox); or
  * IN = one JSON object holding `refs` plus `images` (and `annotations`, `categories`).
A ref is `{"image_id", "ann_id"?, "bbox"? [x, y, w, h], "sentences": [{"sent"} | str],
"split"?}`; its box is `bbox` when present, else the bbox of annotation `ann_id`.

Per image, two dialogues (so an answer never appears earlier in its own dialogue):
  * sentence -> box: "Please provide the bounding box coordinate of the region this
    sentence describes: {sent}." -> `[x1,y1,x2,y2]`, one turn per sentence;
  * box -> sentence: "Please provide a short description for this region: [box]." -> one
    sentence of the ref (chosen per seed), one turn per ref.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphinx_model.boxes import box_to_text
from sphinx_model.conversation import Conversation

from .base import CommonOptions, ConvertError, Stats, dialogues, label_text, load_json, record_key, register
from .coco import CocoIndex, clip_box, image_canvas, index_coco

GROUND_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."
REGION_PROMPT = "Please provide a short description for this region: {}."


@dataclass(frozen=True)
class RefcocoOptions:
    instances: Path | None = field(default=None, metadata={
        "help": "COCO instances JSON with the images (and annotations) when IN is a bare list of refs"})
    split: str = field(default="train", metadata={
        "help": "keep refs of this split ('all' keeps every split; refs without a split are kept)"})


@register("refcoco", task="grounding", options=RefcocoOptions)
def convert_refcoco(source: Path, common: CommonOptions, options: RefcocoOptions,
                    stats: Stats) -> Iterator[Conversation]:
    """RefCOCO-style refs (+ instances) -> sentence->box and box->sentence dialogues."""
    refs, coco = _load(source, options, stats)
    by_image: dict[Any, list[tuple[str, list[str]]]] = defaultdict(list)  # image -> (box text, sentences)
    for ref in refs:
        item = _ref_item(ref, coco, common, options, stats)
        if item is not None:
            by_image[record_key(ref["image_id"])].append(item)
    for image_id, items in by_image.items():
        ref_path = common.image_ref(coco.images[image_id]["file_name"])
        ground = [(GROUND_PROMPT.format(s.rstrip(" .")), box) for box, sents in items for s in sents]
        rng = common.rng("refcoco", image_id)
        describe = [(REGION_PROMPT.format(box), rng.choice(sents)) for box, sents in items]
        yield from dialogues(ground, ref_path, common, id=f"refcoco-{image_id}-ground",
                             meta={"direction": "sentence-to-box"})
        yield from dialogues(describe, ref_path, common, id=f"refcoco-{image_id}-describe",
                             meta={"direction": "box-to-sentence"})


def _load(source: Path, options: RefcocoOptions, stats: Stats) -> tuple[list[Any], CocoIndex]:
    data = load_json(source)
    if isinstance(data, dict) and isinstance(data.get("refs"), list):
        return data["refs"], index_coco(data, stats, str(source), need_annotations=False)
    if isinstance(data, list):
        if options.instances is None:
            raise ConvertError(f"{source}: a bare list of refs needs --instances (the COCO instances JSON)")
        instances = load_json(options.instances)
        return data, index_coco(instances, stats, str(options.instances), need_annotations=False)
    raise ConvertError(f"{source}: expected a JSON list of refs or an object with 'refs' and 'images'")


def _ref_item(ref: Any, coco: CocoIndex, common: CommonOptions, options: RefcocoOptions,
              stats: Stats) -> tuple[str, list[str]] | None:
    """(box text, sentences) of one ref, or None (counted) when it cannot be used."""
    if not isinstance(ref, dict) or record_key(ref.get("image_id")) is None:
        stats.skip("malformed ref")
        return None
    if options.split != "all" and ref.get("split", options.split) != options.split:
        stats.skip("ref of another split")
        return None
    img = coco.images.get(record_key(ref["image_id"]))
    if img is None:
        stats.skip("ref of unknown image")
        return None
    ref_path = common.image_ref(img["file_name"])
    if common.image_missing(ref_path):
        stats.skip("missing image")
        return None
    canvas = image_canvas(img, ref_path, common)
    if canvas is None:
        stats.skip("unknown image size")
        return None
    bbox = ref.get("bbox")
    if bbox is None:
        bbox = coco.anns_by_id.get(record_key(ref.get("ann_id")), {}).get("bbox")
    box = clip_box(bbox, canvas.width, canvas.height)
    if box is None:
        stats.skip("degenerate box" if bbox is not None else "ref without box")
        return None
    raw = ref.get("sentences") or []
    sents = [_sentence(s) for s in (raw if isinstance(raw, list) else [])]
    stats.skip("sentence with box markup", sum(1 for s in sents if s is None))
    sents = [s for s in sents if s]
    if not sents:
        stats.skip("ref without sentences")
        return None
    return box_to_text(box, canvas), sents


def _sentence(s: Any) -> str | None:
    """The sentence's text; "" when there is none, None when it would forge box markup."""
    text = (s.get("sent") or s.get("raw")) if isinstance(s, dict) else s
    if not isinstance(text, str) or not text.strip():
        return ""
    return label_text(text)
