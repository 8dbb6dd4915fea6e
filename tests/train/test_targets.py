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


def test_letters_sit_left_to_right_inside_their_word_and_match_the_drawn_ink():
    import numpy as np

    from train.world.letters import letter_centres

    scene = next(s for i in range(80) for s in [render_scene(11, i, "heldout")[0]] if s.words)
    _, image = render_scene(11, int(scene.id.rsplit("-", 1)[1]), "heldout")
    ink = np.asarray(image.convert("L"), dtype=np.float32)
    for word in scene.words:
        centres = letter_centres(word)
        x0, y0, x1, y1 = word.box
        assert len(centres) == len(word.text) and centres == sorted(centres)
        assert x0 < centres[0] and centres[-1] < x1
        # halfway between two letters' centres the column holds less ink than at the letters (on average)
        band = ink[y0:y1, :]
        contrast = np.abs(band - np.median(band)).sum(axis=0)
        at = np.mean([contrast[int(c)] for c in centres])
        between = np.mean([contrast[int((a + b) / 2)] for a, b in zip(centres, centres[1:])] or [0.0])
        assert between < at or len(centres) == 1


def test_cells_hold_the_letters_on_their_row_so_walking_a_words_cells_spells_it():
    """The reading target: every word lying wholly inside a sub-view is spelt exactly by the letters of
    the cells under it, left to right (what the expert's per-cell read-out is scored against)."""
    import torch

    from train.experts import cell_reading
    from train.world.targets import CELL_SLOTS, LETTERS

    read = words = 0
    for i in range(40):
        scene, _ = render_scene(1002, i, "heldout", text_rich=True)
        t = view_targets(scene, "top-left", GRID_VIEWS, 8)
        assert t.cell_chars.shape == (len(view_boxes(GRID_VIEWS)), 64, CELL_SLOTS)
        held = t.cell_chars[..., 0] != -100
        assert (t.cell_chars[held] >= 0).all() and (t.cell_chars[held][:, 0] > 0).all()
        assert (t.cell_chars[~held] == -100).all()
        truth = cell_reading(t.cell_chars.clamp(min=0), t, len(view_boxes(GRID_VIEWS)))
        assert truth["letter"] == 1.0
        counted = sum(1 for v, k in (t.word > 0).nonzero().tolist() if v and 0 <= t.word_where[v, k, 0]
                      and t.word_where[v, k, 2] <= 1)
        read += truth["word_read"] * counted
        words += counted
        letters_in_view = sum(len([c for c in w.text.lower() if c in LETTERS]) for w in scene.words)
        assert int((t.cell_chars[0] > 0).sum()) <= letters_in_view        # no letter counted twice
    # a neighbour word on the same row can share a cell at an end (2 of 186 words here): the walk reads its letter too
    assert words >= 40 and read >= 0.98 * words
    wrong = t.cell_chars.clamp(min=0).clone()
    wrong[wrong > 0] = wrong[wrong > 0] % 26 + 1                           # every letter one off
    assert cell_reading(wrong, t, len(view_boxes(GRID_VIEWS)))["letter"] == 0.0
    assert cell_reading(torch.zeros_like(wrong), t, len(view_boxes(GRID_VIEWS)))["word_read"] == 0.0


def test_text_rich_scenes_draw_more_words_and_always_mark_while_the_world_itself_is_unchanged():
    plain = [render_scene(3, i)[0] for i in range(20)]
    rich = [render_scene(3, i, text_rich=True)[0] for i in range(20)]
    assert [s.to_dict() for s in plain] == [render_scene(3, i, text_rich=False)[0].to_dict() for i in range(20)]
    assert sum(len(s.words) for s in rich) >= 3 * sum(len(s.words) for s in plain)
    assert all(s.mark_style for s in rich if s.objects)
    assert all(s.id.endswith("-rich") for s in rich) and not any(s.id.endswith("-rich") for s in plain)
