from hypothesis import given, settings
from hypothesis import strategies as st

from sphinx_model.tiling import (canvas_geometry, num_views, skipped_views, view_boxes,
                                 visual_token_count)

ratios = st.sampled_from([(1, 4), (1, 3), (1, 2), (2, 3), (1, 1), (3, 2), (2, 1), (3, 1), (4, 1)])


def test_top_left_2to1_skips_bottom_row():
    canvas = canvas_geometry(200, 100, "top-left")
    assert skipped_views(canvas, 2) == [False, False, False, True, True]
    assert visual_token_count(257, skipped_views(canvas, 2)) == 3 * 259 + 2


def test_centred_2to1_touches_all_quadrants():
    canvas = canvas_geometry(200, 100, "center")
    assert (canvas.offset_x, canvas.offset_y) == (0, 50)
    assert skipped_views(canvas, 2) == [False] * 5


def test_skip_off_encodes_everything():
    canvas = canvas_geometry(400, 100, "top-left")
    assert skipped_views(canvas, 2, skip_tokens=False) == [False] * 5


def test_single_view_grid():
    assert view_boxes(1) == [(0.0, 0.0, 1.0, 1.0)]
    assert skipped_views(canvas_geometry(400, 100, "top-left"), 1) == [False]
    assert visual_token_count(257, [False]) == 259  # released SPHINX-Tiny: 257 + start/end


@settings(max_examples=200, deadline=None)
@given(ratio=ratios, scale=st.integers(1, 300), grid=st.sampled_from([2, 3]),
       anchor=st.sampled_from(["top-left", "center"]))
def test_skip_layout_over_aspect_ratios(ratio, scale, grid, anchor):
    w, h = ratio[0] * scale, ratio[1] * scale
    canvas = canvas_geometry(w, h, anchor)
    skipped = skipped_views(canvas, grid)
    assert len(skipped) == num_views(grid) == 1 + grid * grid
    assert skipped[0] is False  # the global view is always encoded
    # a cell is skipped iff it holds no image pixel: check against the pixel-level definition
    side = canvas.side
    cell = side // grid
    for i, s in enumerate(skipped[1:]):
        if side % grid:
            break  # cells split pixels; the pixel-level definition below needs whole pixels
        r, c = divmod(i, grid)
        has_content = any(canvas.offset_x <= x < canvas.offset_x + w for x in range(c * cell, (c + 1) * cell)) \
            and any(canvas.offset_y <= y < canvas.offset_y + h for y in range(r * cell, (r + 1) * cell))
        assert s == (not has_content)
    n_skip = sum(skipped)
    assert visual_token_count(257, skipped) == (len(skipped) - n_skip) * 259 + n_skip
    if anchor == "top-left" and w == h:
        assert n_skip == 0
    if anchor == "top-left" and w >= h:
        # rows entirely below the image are skipped: exactly grid * (grid - ceil(grid*h/w)) cells
        import math
        assert n_skip == grid * (grid - math.ceil(grid * h / w))


def test_bad_geometry_raises_clearly():
    import pytest
    with pytest.raises(ValueError, match="no pixels"):
        canvas_geometry(0, 10, "center")
    with pytest.raises(ValueError, match="anchor"):
        canvas_geometry(10, 10, "middle")
