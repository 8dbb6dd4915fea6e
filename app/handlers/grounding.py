"""Grounding: image + phrase -> box(es), or "detect everything" -> all boxes, on the original image."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..regions import TABLE_HEADERS, regions_table
from ..render import draw_regions
from .common import AppContext, OneShot, UserError, ask_image, check_prompt, owner_of, store_upload

# The SPHINX wordings (the demo model was trained on them, the released models too).
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {phrase}."
DETECT_PROMPT = "Detect all objects shown in the image."


@dataclass
class GroundingResult:
    shot: OneShot
    annotated: Image.Image
    rows: list[list[Any]]
    payload: dict[str, Any]
    json_path: Path

    headers = TABLE_HEADERS

    @property
    def summary(self) -> str:
        n = len(self.shot.regions)
        if not n:
            return "The answer names no box (see the model's text)."
        return f"{n} region{'s' * (n != 1)} found in {(self.shot.latency_ms or 0) / 1000:.1f} s."


def ground(ctx: AppContext, owner_key: str, image_value: Any, phrase: Any, detect_all: bool) -> GroundingResult:
    """Ask for the phrase's box(es) (or every object's); draw them; a table and a JSON download."""
    owner = owner_of(owner_key)
    if detect_all:
        prompt, label = DETECT_PROMPT, None
    else:
        phrase = check_prompt(phrase, "phrase").rstrip(".")
        prompt, label = GROUNDING_PROMPT.format(phrase=phrase), phrase
    if image_value is None:
        raise UserError("no image: upload one first")
    stored, image = store_upload(ctx, owner, image_value)
    shot = ask_image(ctx, owner, image, stored, prompt, task="detection" if detect_all else "grounding")
    if label is not None:   # a grounding answer is bare boxes: they are the phrase's
        shot.regions = [r if r.label else type(r)(label, r.pixels, r.canvas) for r in shot.regions]
    payload = grounding_payload(ctx, shot, stored.sha256)
    return GroundingResult(shot, draw_regions(image, shot.regions), regions_table(shot.regions), payload,
                           write_json(payload, "grounding"))


def grounding_payload(ctx: AppContext, shot: OneShot, sha256: str) -> dict[str, Any]:
    """What the JSON download and the /ground endpoint give: pixels and the model's text format."""
    info = ctx.service.info
    return {"model": {"id": info.model_id, "version": info.version, "anchor": info.anchor},
            "prompt": shot.prompt, "answer": shot.text,
            "image": {"width": shot.image.width, "height": shot.image.height, "sha256": sha256},
            "canvas": {"side": shot.canvas.side, "offset_x": shot.canvas.offset_x, "offset_y": shot.canvas.offset_y},
            "regions": [r.to_dict() for r in shot.regions], "latency_ms": shot.latency_ms,
            "conversation_id": shot.conversation_id}


def write_json(payload: dict[str, Any], prefix: str) -> Path:
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"{prefix}-", delete=False,
                                     encoding="utf-8") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False)
        return Path(f.name)
