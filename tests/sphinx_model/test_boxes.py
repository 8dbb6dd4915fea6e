from hypothesis import given, settings
from hypothesis import strategies as st

from sphinx_model.boxes import (box_to_text, canvas_to_pixels, decimals_for_pixel_accuracy,
                                format_named, format_regions, parse_regions)
from sphinx_model.tiling import canvas_geometry


def test_format_matches_released_style():
    assert format_regions([(0.256, 0.23, 0.52, 0.8199)]) == "[0.26,0.23,0.52,0.82]"
    assert format_regions([(0.1, 0.2), (0.5, 0.5, 0.7, 0.8)]) == "[0.10,0.20];[0.50,0.50,0.70,0.80]"
    assert format_named("dog", [(0.1, 0.2, 0.4, 0.9)]) == "<p>dog</p> [0.10,0.20,0.40,0.90]"


def test_parse_named_lists_and_points():
    text = "There is <p>a dog</p> [0.10,0.20,0.40,0.90];[0.5,0.5,0.6,0.6] and <p>ball</p> [0.3,0.4]."
    regions = parse_regions(text)
    assert [r.label for r in regions] == ["a dog", "a dog", "ball"]
    assert regions[0].coords == (0.1, 0.2, 0.4, 0.9) and regions[2].is_point


def test_parse_is_lenient_on_model_garbage():
    assert parse_regions("[0.1,0.2,0.3]") == []           # wrong arity ignored
    assert parse_regions("[0.1, 0.2 ,1.7, -3]")[0].coords == (0.1, 0.0, 1.0, 0.2)  # clamped + reordered
    assert parse_regions("[0.5,0.6,0.1,0.2]")[0].coords == (0.1, 0.2, 0.5, 0.6)
    for junk in ["", "[", "[]", "[,]", "[0.1,,0.2]", "<p>x</p>", "[nan,0,0,0]", "[1e999,0]", None, "[0.1.2,0.3]"]:
        parse_regions(junk)  # never raises


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 4000), h=st.integers(1, 4000), anchor=st.sampled_from(["top-left", "center"]),
       fx=st.tuples(*[st.floats(0, 1)] * 4))
def test_pixel_text_pixel_round_trip_within_1px(w, h, anchor, fx):
    canvas = canvas_geometry(w, h, anchor)
    x0, x1 = sorted((fx[0] * w, fx[2] * w))
    y0, y1 = sorted((fx[1] * h, fx[3] * h))
    d = decimals_for_pixel_accuracy(canvas.side)
    text = box_to_text((x0, y0, x1, y1), canvas, decimals=d)
    back = canvas_to_pixels(parse_regions(text)[0].coords, canvas)
    assert all(abs(a - b) <= 1.0 for a, b in zip(back, (x0, y0, x1, y1)))


def test_two_decimals_are_pixel_exact_up_to_200px():
    assert decimals_for_pixel_accuracy(200) == 2
    assert decimals_for_pixel_accuracy(1000) == 3


def test_centre_anchor_offsets_are_removed():
    canvas = canvas_geometry(200, 100, "center")   # 50 px of padding above
    assert box_to_text((0, 0, 200, 100), canvas) == "[0.00,0.25,1.00,0.75]"
    assert canvas_to_pixels((0.0, 0.0, 1.0, 1.0), canvas) == (0.0, 0.0, 200.0, 100.0)  # clipped to the image
