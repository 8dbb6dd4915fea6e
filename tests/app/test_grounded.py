"""Grounded answers as a person reads them: each phrase tagged with its region, in the colour the
overlay draws that region in; the stored text is untouched."""
from __future__ import annotations

import numpy as np
from PIL import Image

from app.grounded import grounded
from app.regions import regions_in_pixels
from app.render import draw_regions
from sphinx_model.tiling import Canvas

ANSWER = ("<p>large yellow square</p> [0.65,0.02,0.85,0.24], <p>small red circles</p> [0.10,0.50,0.20,0.60];"
          "[0.30,0.50,0.40,0.60] and a point [0.5,0.9]. Done.")


def test_each_phrase_is_tagged_with_its_region_in_order():
    g = grounded(ANSWER)
    assert g.segments == [("large yellow square", "box 1"), (", ", None), ("small red circles", "box 2"),
                          ("+", "box 3"), (" and a point ", None), ("", "point 1"), (". Done.", None)]
    assert g.markdown() == ("**large yellow square** ‹box 1›, **small red circles** ‹box 2›‹box 3› "
                            "and a point ‹point 1›. Done.")


def test_tag_colours_are_the_overlays_box_colours():
    """Read the overlay's pixels: each box's outline has its tag's colour."""
    canvas = Canvas(side=200, width=200, height=200, offset_x=0, offset_y=0)
    regions = regions_in_pixels(ANSWER, canvas)
    drawn = np.asarray(draw_regions(Image.new("RGB", (200, 200), (255, 255, 255)), regions))
    colours = grounded(ANSWER).colors
    for k, r in enumerate([r for r in regions if r.is_box]):
        x0, y0, x1, y1 = (round(v) for v in r.box)
        edge = tuple(drawn[(y0 + y1) // 2, x0])          # the left edge, halfway down
        want = colours[f"box {k + 1}"]
        assert "#%02x%02x%02x" % edge == want, (k, edge, want)


def test_text_without_regions_is_escaped_and_unchanged():
    text = "a <b>bold</b> claim <p>unclosed and [1,2,3] numbers"
    g = grounded(text)
    assert g.colors == {} and "".join(t for t, _ in g.segments) == text
    assert "<b>" not in g.markdown() and "&lt;b&gt;" in g.markdown()


def test_bare_boxes_of_a_grounding_answer_take_the_phrase():
    g = grounded("[0.1,0.2,0.3,0.4];[0.2,0.2,0.3,0.4]", phrase="the dog")
    assert g.segments == [("the dog", "box 1"), ("+", "box 2")]


def test_set_of_mark_answers_tag_the_marks_they_name_in_the_yellow_they_turn():
    from app.handlers.som import NOT_DRAWN, answer_view
    from app.render import HIGHLIGHT, Mark

    marks = [Mark(1, (10, 10, 50, 50)), Mark(2, (120, 120)), Mark(3, (150, 20, 190, 60))]
    canvas = Canvas(side=200, width=200, height=200, offset_x=0, offset_y=0)
    text = "Mark 2 is a circle; <p>the square</p> [0.05,0.05,0.25,0.25] and [0.70,0.70,0.80,0.80]. 7 is none."
    from app.regions import regions_in_pixels
    g = answer_view(text, marks, regions_in_pixels(text, canvas))
    yellow = HIGHLIGHT.as_hex()
    assert ("2", "mark 2") in g.segments and ("the square", "mark 1") in g.segments   # by number; by a box on it
    assert ("", "box 2") in g.segments and g.colors["box 2"] == NOT_DRAWN             # a box over no mark
    assert g.colors["mark 1"] == g.colors["mark 2"] == yellow and "mark 7" not in g.colors
    assert "".join(t for t, tag in g.segments if tag is None or tag.startswith("mark")).startswith("Mark 2 is")
