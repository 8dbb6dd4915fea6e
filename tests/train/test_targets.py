"""The experts' dense targets: each object lands on the token that holds its centre, and its box
is given twice, relative to that token's cell and in the view's own frame (in the global view:
the canvas frame the answers' boxes are written in)."""
from __future__ import annotations

import pytest

from sphinx_model.boxes import pixels_to_canvas
from sphinx_model.tiling import canvas_geometry, view_boxes
from train.world.scene import render_scene
from train.world.targets import view_targets

GRID_VIEWS, TOKENS = 2, 4


def _scene_with_objects():
    for i in range(50):
        scene, _ = render_scene(5, i)
        if len(scene.objects) >= 3:
            return scene
    raise AssertionError("no scene with three objects")


def test_each_object_is_read_at_its_centre_token_with_its_box_in_the_view_frame():
    scene = _scene_with_objects()
    t = view_targets(scene, "top-left", GRID_VIEWS, TOKENS)
    canvas = canvas_geometry(scene.width, scene.height, "top-left")
    views = view_boxes(GRID_VIEWS)
    assert t.obj_where.shape == (len(views), TOKENS * TOKENS, 4)
    checked = 0
    for v, (x0, y0, x1, y1) in enumerate(views):
        side = x1 - x0
        at: dict[int, list] = {}
        for obj in scene.objects:
            box = pixels_to_canvas(obj.box, canvas)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            if x0 <= cx < x1 and y0 <= cy < y1:
                at.setdefault(int((cy - y0) / side * TOKENS) * TOKENS + int((cx - x0) / side * TOKENS), []).append(box)
        assert int(t.obj[v].sum()) == len(at)                     # a token per occupied cell, none elsewhere
        for k, boxes in at.items():
            if len(boxes) > 1:
                continue                                           # the largest wins a shared token
            box = boxes[0]
            cell = (x0 + (k % TOKENS) * side / TOKENS, y0 + (k // TOKENS) * side / TOKENS)
            assert [float(c) for c in t.obj_where[v, k]] == pytest.approx(
                [(box[i] - (x0, y0)[i % 2]) / side for i in range(4)], abs=1e-5)
            assert [float(c) for c in t.obj_box[v, k]] == pytest.approx(
                [(box[i] - cell[i % 2]) / (side / TOKENS) for i in range(4)], abs=1e-4)
            if v == 0:                                             # the global view's frame is the canvas
                assert [float(c) for c in t.obj_where[v, k]] == pytest.approx(list(box), abs=1e-5)
            checked += 1
    assert checked >= len(scene.objects)


def test_empty_tokens_have_no_box():
    scene = _scene_with_objects()
    t = view_targets(scene, "top-left", GRID_VIEWS, TOKENS)
    empty = t.obj == 0
    assert (t.obj_where[empty] == 0).all() and (t.obj_box[empty] == 0).all()


def test_words_are_spelt_letter_by_letter_with_their_case_on_their_token():
    from train.world.targets import CASES, LETTERS, MAX_CHARS, spell
    from train.world.vocab import WORDS

    assert max(map(len, WORDS)) <= MAX_CHARS
    letters, case = spell("Mother")
    assert "".join(LETTERS[i - 1] for i in letters if i) == "mother" and CASES[case] == "capitalised"
    assert CASES[spell("CITY")[1]] == "upper" and CASES[spell("city")[1]] == "lower"
    for i in range(80):
        scene, _ = render_scene(11, i)
        if scene.words:
            break
    t = view_targets(scene, "top-left", GRID_VIEWS, TOKENS)
    has_word = t.word > 0
    assert has_word.any()
    assert (t.chars[has_word] >= 0).all() and (t.chars[~has_word] == -100).all()
    spelt = {"".join(LETTERS[i - 1] for i in row if i) for row in t.chars[has_word].tolist()}
    assert spelt <= {w.text.lower() for w in scene.words}
