"""Grounding: boxes land on the original image's pixels for any aspect ratio, EXIF orientation
and canvas anchor; the tab's handler stores its exchange and writes the JSON download."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.handlers import grounding
from app.handlers.common import UserError
from app.regions import regions_in_pixels
from app.render import draw_regions
from apptest_support import ALICE, scene
from sphinx_model.boxes import box_to_text, decimals_for_pixel_accuracy, format_named
from sphinx_model.image_processing import load_image
from sphinx_model.tiling import canvas_geometry
from storage.models import MessageRow

RED = (255, 64, 64)  # supervision's palette colour of the second region


def _exif_rotated(path, w: int, h: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A w x h picture stored sideways with EXIF orientation 6; returns the upright picture and
    a box (in upright pixels) around its red rectangle."""
    upright = Image.new("RGB", (w, h), (240, 240, 240))
    box = (w // 5, h // 4, w // 2, (3 * h) // 4)
    upright.paste((200, 0, 0), box)
    stored = upright.transpose(Image.Transpose.ROTATE_90)       # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6                                            # rotate 270 to display upright
    stored.save(path, exif=exif)
    return upright, box


@pytest.mark.parametrize("anchor", ["top-left", "center"])
@pytest.mark.parametrize("size", [(300, 120), (90, 400), (257, 257)])
def test_boxes_are_pixel_aligned_for_any_aspect_exif_and_anchor(tmp_path, anchor, size):
    path = tmp_path / "photo.jpg"
    upright, box = _exif_rotated(path, *size)
    image = load_image(path)                                    # what the app reads: EXIF applied
    assert image.size == upright.size
    canvas = canvas_geometry(*image.size, anchor)
    decimals = decimals_for_pixel_accuracy(canvas.side, 0.5)
    text = format_named("red", [tuple(float(v) for v in
                                      json.loads(box_to_text(box, canvas, decimals)))], decimals)
    (region,) = regions_in_pixels(text, canvas)
    assert region.label == "red" and region.pixels == pytest.approx(box, abs=0.5)
    drawn = np.asarray(draw_regions(image, [region]))
    x0, y0, x1, y1 = box
    outline = drawn[y0 + (y1 - y0) // 2, x0]                     # left edge, half way down
    inside = drawn[(y0 + y1) // 2, (x0 + x1) // 2]
    assert tuple(outline) != tuple(np.asarray(image)[y0 + (y1 - y0) // 2, x0])   # the line is on the edge
    assert tuple(inside) == tuple(np.asarray(image)[(y0 + y1) // 2, (x0 + x1) // 2])
    assert drawn.shape[:2] == (image.height, image.width)


def test_points_and_several_boxes_keep_their_phrases():
    canvas = canvas_geometry(200, 100, "center")
    text = "<p>cat</p> [0.10,0.30,0.20,0.40];[0.60,0.30,0.70,0.40], <p>nose</p> [0.50,0.50]"
    regions = regions_in_pixels(text, canvas)
    assert [(r.label, r.is_box) for r in regions] == [("cat", True), ("cat", True), ("nose", False)]
    assert regions[2].pixels == pytest.approx((100.0, 50.0))   # the centre of a centred canvas


def test_ground_stores_the_exchange_and_writes_json(ctx, image_file):
    result = grounding.ground(ctx, ALICE, str(image_file), "the red box", detect_all=False)
    assert result.annotated.size == Image.open(image_file).size
    payload = json.loads(result.json_path.read_text())
    assert payload["prompt"].endswith("describes: the red box.") and payload["answer"] == result.shot.text
    assert payload["image"]["width"] == 160 and payload["model"]["id"] == ctx.service.info.model_id
    assert all({"label", "pixels", "text"} <= set(r) for r in payload["regions"])
    assert len(result.rows) == len(result.shot.regions)
    everything = grounding.ground(ctx, ALICE, str(image_file), "", detect_all=True)
    assert everything.shot.prompt == grounding.DETECT_PROMPT
    with Session(ctx.store.engine) as s:
        assert s.scalar(select(func.count()).select_from(MessageRow)) == 4
        tasks = [m.settings["task"] for m in s.scalars(select(MessageRow).where(MessageRow.role == "assistant"))]
    assert tasks == ["grounding", "detection"]


def test_ground_bad_input(ctx, tmp_path):
    with pytest.raises(UserError, match="empty"):
        grounding.ground(ctx, ALICE, None, " ", detect_all=False)
    with pytest.raises(UserError, match="no image"):
        grounding.ground(ctx, ALICE, None, "a cat", detect_all=False)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UserError, match="x.png"):
        grounding.ground(ctx, ALICE, str(bad), "a cat", detect_all=False)
    scene().save(tmp_path / "ok.png")
    with pytest.raises(UserError, match="gone"):
        grounding.ground(ctx, ALICE, str(tmp_path / "missing.png"), "a cat", detect_all=False)
