"""Boxes reach the metric in the coordinates it reads: a model answer of known canvas boxes, mapped
through the processor's geometry, scored by lmms-eval's own RefCOCO metrics."""
from __future__ import annotations

import importlib.util

import pytest
from PIL import Image

from sphinx_model.boxes import box_to_text, format_named
from sphinx_model.config import get_preset
from sphinx_model.processor import SphinxProcessor
from sphinx_model.tokenizer import byte_tokenizer
from train.benchmarks.postprocess import cut_at_stops, map_answer

needs_lmms_eval = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed")

# (width, height, truth box in pixels): wide, tall, square
CASES = [(200, 100, (20, 10, 120, 90)), (60, 180, (5, 100, 55, 170)), (90, 90, (30, 30, 60, 80))]


def processor(anchor: str) -> SphinxProcessor:
    return SphinxProcessor(get_preset("sphinx-test-tiny").replace(anchor=anchor), byte_tokenizer())


@needs_lmms_eval
@pytest.mark.parametrize("anchor", ["top-left", "center"])
def test_refcoco_rec_metric_reads_image_fractions(anchor):
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_acc05, refcoco_bbox_rec_process_result

    proc, items, raw_items = processor(anchor), [], []
    for w, h, box in CASES:
        canvas = proc.geometry(w, h)
        model_says = "It is here: " + box_to_text(box, canvas, decimals=4)   # the model's own format
        doc = {"question_id": f"{w}x{h}", "answer": "it", "bbox": [box[0] / w, box[1] / h, box[2] / w, box[3] / h]}
        mapped = map_answer(model_says, canvas, "image_fraction")
        items.append(refcoco_bbox_rec_process_result(doc, [mapped])["refcoco_ACC@0.5"])
        raw_items.append(refcoco_bbox_rec_process_result(doc, [model_says])["refcoco_ACC@0.5"])
        assert items[-1]["pred"] == pytest.approx(doc["bbox"], abs=2e-4)
    assert refcoco_bbox_rec_acc05(items) == 1.0
    assert refcoco_bbox_rec_acc05(raw_items) < 1.0   # unmapped canvas fractions miss on non-square images


@needs_lmms_eval
def test_refcoco_grounding_metric_reads_pixels():
    from lmms_eval.tasks.refcoco_grounding.utils import refcoco_grounding_acc09, refcoco_grounding_process_result

    proc, items = processor("center"), []
    for w, h, (x0, y0, x1, y1) in CASES:
        canvas = proc.geometry(w, h)
        doc = {"question_id": 1, "answer": ["it"], "bbox": [x0, y0, x1 - x0, y1 - y0], "image": Image.new("RGB", (w, h))}
        mapped = map_answer(box_to_text((x0, y0, x1, y1), canvas, decimals=4), canvas, "pixels")
        items.append(refcoco_grounding_process_result(doc, [mapped])["refcoco_grounding_ACC@0.9"])
    assert refcoco_grounding_acc09(items) == 1.0


def test_named_regions_points_and_text_without_boxes():
    canvas = processor("top-left").geometry(100, 50)         # canvas side 100: fractions of the side
    text = format_named("cat", [(0.1, 0.0, 0.5, 0.4)]) + " and " + format_named("dot", [(0.5, 0.25)])
    assert map_answer(text, canvas, "image_fraction") == \
        "<p>cat</p> [0.100000,0.000000,0.500000,0.800000];<p>dot</p> [0.500000,0.500000]"
    assert map_answer(text, canvas, "pixels") == "<p>cat</p> [10.000,0.000,50.000,40.000];<p>dot</p> [50.000,25.000]"
    assert map_answer("two cats", canvas, "pixels") == "two cats"
    assert map_answer(text, canvas, None) == text


def test_until_cuts_at_the_first_stop():
    assert cut_at_stops("yes ASSISTANT: more\n\nUSER:", ["\n\n", "ASSISTANT:"]) == "yes"
    assert cut_at_stops("no stop here", ["###"]) == "no stop here"
