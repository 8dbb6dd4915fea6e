"""Set-of-Mark: numbered marks on an image (automatic or clicked), questions about them.

Marks are drawn into the picture the model reads (that is what Set-of-Mark prompting is),
numbered 1..n; an answer that names a mark ("3", "mark 2", or a box over it) highlights it.
Automatic marks come from the model's own detections, from OpenCV region proposals, or both
(merged: a proposal that overlaps a detection is dropped).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..grounded import Grounded, grounded
from ..records import StoredImage
from ..regions import PixelRegion
from ..render import HIGHLIGHT, Mark, draw_marks
from ..proposals import propose_regions
from .common import AppContext, OneShot, UserError, ask_image, check_prompt, load_stored, owner_of, store_image, \
    keep_upload
from ..validation import click_point, marks_list
from .grounding import DETECT_PROMPT

MAX_MARKS = 30
SOURCES = ("model", "opencv", "both")
_NUMBER = re.compile(r"(?<!\d)(?<!\d\.)(\d{1,3})(?!\d|\.\d)")
MATCH_IOU = 0.5


@dataclass
class MarksState:
    """One page's Set-of-Mark image and marks (plain data; Gradio copies it per session)."""

    image: StoredImage | None = None
    marks: list[Mark] = field(default_factory=list)
    corner: tuple[float, float] | None = None     # first corner of a box being drawn by two clicks
    highlight: list[int] = field(default_factory=list)


@dataclass
class SomAnswer:
    shot: OneShot
    named: list[int]
    marked: Image.Image


def load(ctx: AppContext, owner_key: str, image_value: Any) -> MarksState:
    """A new image: stored, no marks yet."""
    if image_value is None:
        return MarksState()
    stored = keep_upload(ctx, owner_of(owner_key), image_value)
    return MarksState(image=stored)


def _image(ctx: AppContext, state: MarksState) -> Image.Image:
    if state.image is None:
        raise UserError("no image: upload one first")
    return load_stored(state.image, ctx.service.max_pixels)


def picture(ctx: AppContext, state: MarksState) -> Image.Image | None:
    """The image with its marks (highlighted ones in yellow)."""
    if state.image is None:
        return None
    return draw_marks(_image(ctx, state), state.marks, set(state.highlight))


def _renumber(marks: list[Mark]) -> list[Mark]:
    return [Mark(i + 1, m.pixels, m.source) for i, m in enumerate(marks[:MAX_MARKS])]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def auto_marks(ctx: AppContext, owner_key: str, state: MarksState, source: str) -> MarksState:
    """Marks from the model's detections and/or OpenCV proposals (replacing automatic ones)."""
    if source not in SOURCES:
        raise UserError(f"source must be one of {', '.join(SOURCES)}")
    image = _image(ctx, state)
    found: list[Mark] = []
    if source in ("model", "both"):
        shot = ask_image(ctx, owner_of(owner_key), image, state.image, DETECT_PROMPT, task="som-detection")
        found += [Mark(0, r.box, "model") for r in shot.regions if r.is_box and r.box[2] > r.box[0]
                  and r.box[3] > r.box[1]]
    if source in ("opencv", "both"):
        for box in propose_regions(image):
            if all(iou(box, m.pixels) < MATCH_IOU for m in found):
                found.append(Mark(0, tuple(float(v) for v in box), "opencv"))
    user = [m for m in state.marks if m.source == "user"]
    state.marks, state.highlight, state.corner = _renumber(user + found), [], None
    return state


def click_event(ctx: AppContext, state: MarksState, evt: Any, mode: str) -> MarksState:
    """A click as the image's select event sends it (its position checked first)."""
    x, y = click_point(evt)
    return click(ctx, state, x, y, mode)


def click(ctx: AppContext, state: MarksState, x: Any, y: Any, mode: str) -> MarksState:
    """A click on the image: a point mark, or (mode 'box') one corner of a box mark."""
    if state.image is None:
        raise UserError("no image: upload one first")
    try:
        px, py = float(x), float(y)
    except (TypeError, ValueError):
        raise UserError("that click has no position on the image") from None
    w, h = state.image.width, state.image.height
    if not (-1.0 <= px <= w + 1.0 and -1.0 <= py <= h + 1.0):  # the margin around a letterboxed image
        raise UserError("that click is outside the image: click on the picture itself")
    px, py = min(max(px, 0.0), w), min(max(py, 0.0), h)
    if len(state.marks) >= MAX_MARKS:
        raise UserError(f"at most {MAX_MARKS} marks")
    if mode == "box":
        if state.corner is None:
            state.corner = (px, py)
            return state
        (cx, cy), state.corner = state.corner, None
        box = (min(cx, px), min(cy, py), max(cx, px), max(cy, py))
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            raise UserError("that box is too small: click two opposite corners")
        state.marks.append(Mark(len(state.marks) + 1, box, "user"))
    else:
        state.marks.append(Mark(len(state.marks) + 1, (px, py), "user"))
    state.highlight = []
    return state


def clear(state: MarksState) -> MarksState:
    return MarksState(image=state.image)


def marks_named(answer: str, marks: list[Mark], regions_boxes: list[tuple[float, ...]] = ()) -> list[int]:
    """The marks an answer names: by number, or by a box that covers a mark."""
    numbers = {m.number for m in marks}
    named = {int(n) for n in _NUMBER.findall(answer or "") if int(n) in numbers}
    for box in regions_boxes:
        for m in marks:
            if m.is_box and iou(box, m.pixels) >= MATCH_IOU:
                named.add(m.number)
            elif not m.is_box and box[0] <= m.pixels[0] <= box[2] and box[1] <= m.pixels[1] <= box[3]:
                named.add(m.number)
    return sorted(named)


def ask(ctx: AppContext, owner_key: str, state: MarksState, question: Any) -> SomAnswer:
    """Ask about the marked image; highlight the marks the answer names."""
    question = check_prompt(question)
    if not state.marks:
        raise UserError("no marks yet: place some automatically or click on the image")
    owner = owner_of(owner_key)
    plain = _image(ctx, state)
    marked = draw_marks(plain, state.marks)
    stored = store_image(ctx, owner, marked)
    shot = ask_image(ctx, owner, marked, stored, question, task="som",
                     extra={"marks": [{"number": m.number, "pixels": list(m.pixels), "source": m.source}
                                      for m in state.marks]})
    named = marks_named(shot.text, state.marks, [r.box for r in shot.regions if r.is_box])
    state.highlight = named
    return SomAnswer(shot, named, draw_marks(plain, state.marks, set(named)))


def marks_from_spec(spec: Any, width: int, height: int) -> list[Mark]:
    """API marks: a JSON list (text) of [x, y] points or [x0, y0, x1, y1] boxes in pixels,
    read by `validation.marks_list`; clamped to the image."""
    out = []
    lim = (width, height)
    for i, item in enumerate(marks_list(spec, MAX_MARKS)):
        vals = tuple(float(min(max(v, 0.0), lim[k % 2])) for k, v in enumerate(item))
        if len(vals) == 4:
            vals = (min(vals[0], vals[2]), min(vals[1], vals[3]), max(vals[0], vals[2]), max(vals[1], vals[3]))
        out.append(Mark(i + 1, vals, "user"))
    return out


NOT_DRAWN = "#9ca3af"   # a box of the answer over no mark: not in the picture, shown grey


def answer_view(answer: str, marks: list[Mark], regions: list[PixelRegion]) -> Grounded:
    """The answer as a person reads it: the marks it names (by number, or by a box over a mark)
    tagged "mark N" in the yellow they turn in the picture; other boxes tagged in grey (the
    Set-of-Mark picture draws only marks). The text itself is the model's, unchanged."""
    g = grounded(answer)
    numbers = {m.number for m in marks}
    boxes = [r.box for r in regions if r.is_box]
    yellow = HIGHLIGHT.as_hex()
    out = Grounded()
    for text, tag in g.segments:
        if tag is None:
            pos = 0
            for found in _NUMBER.finditer(text):
                n = int(found.group(1))
                if n not in numbers:
                    continue
                if found.start() > pos:
                    out.segments.append((text[pos:found.start()], None))
                out.segments.append((found.group(1), f"mark {n}"))
                out.colors[f"mark {n}"] = yellow
                pos = found.end()
            if pos < len(text):
                out.segments.append((text[pos:], None))
            continue
        k = int(tag.split()[1]) - 1
        covered = marks_named("", marks, [boxes[k]]) if tag.startswith("box ") and k < len(boxes) else []
        shown = f"mark {covered[0]}" if covered else tag
        out.colors[shown] = yellow if covered else NOT_DRAWN
        out.segments.append((text, shown))
    return out
