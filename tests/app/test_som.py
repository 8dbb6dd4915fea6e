"""Set-of-Mark: automatic marks (OpenCV, the model), clicked points and boxes, questions, highlights."""
from __future__ import annotations

import pytest
from PIL import Image

from app.handlers import som
from app.handlers.common import UserError
from app.proposals import propose_regions
from app.render import Mark
from apptest_support import ALICE
from app.examples import EXAMPLES_DIR

MARKS = EXAMPLES_DIR / "scene-marks.png"


def test_opencv_proposals_find_the_objects_of_a_demo_scene():
    boxes = propose_regions(Image.open(MARKS))
    assert len(boxes) == 5                                   # two big and two small triangles, a cross
    assert all(x1 > x0 and y1 > y0 for x0, y0, x1, y1 in boxes)


def test_auto_marks_clicks_question_and_highlight(ctx, tmp_path):
    state = som.load(ctx, ALICE, str(MARKS))
    state = som.auto_marks(ctx, ALICE, state, "opencv")
    assert [m.number for m in state.marks] == [1, 2, 3, 4, 5] and {m.source for m in state.marks} == {"opencv"}
    state = som.click(ctx, state, 10, 500, "point")
    state = som.click(ctx, state, 200, 10, "box")
    assert state.corner == (200.0, 10.0)
    state = som.click(ctx, state, 240, 40, "box")
    assert state.marks[-1] == Mark(7, (200.0, 10.0, 240.0, 40.0), "user") and state.corner is None
    picture = som.picture(ctx, state)
    assert picture.size == Image.open(MARKS).size
    answer = som.ask(ctx, ALICE, state, "What is the object marked with the number 2?")
    assert answer.shot.text and answer.shot.message_id and answer.marked.size == picture.size
    assert set(answer.named) <= {m.number for m in state.marks}
    both = som.auto_marks(ctx, ALICE, state, "both")         # keeps the user's marks, renumbers
    assert [m.source for m in both.marks[:2]] == ["user", "user"]
    assert [m.number for m in both.marks] == list(range(1, len(both.marks) + 1))


def test_marks_named_by_number_or_by_box():
    marks = [Mark(1, (0, 0, 10, 10)), Mark(2, (50, 50, 90, 90)), Mark(3, (5.0, 5.0))]
    assert som.marks_named("Mark 2 is red; compare it with 1.", marks) == [1, 2]
    assert som.marks_named("at [0.25,0.50] there is 12", marks) == []   # coordinates are not mark numbers
    assert som.marks_named("the box", marks, [(48, 52, 88, 91)]) == [2]
    assert som.marks_named("", marks, [(0, 0, 12, 12)]) == [1, 3]   # IoU 0.69 with 1, and 3 inside


def test_som_bad_input(ctx):
    empty = som.MarksState()
    with pytest.raises(UserError, match="no image"):
        som.click(ctx, empty, 1, 1, "point")
    state = som.load(ctx, ALICE, str(MARKS))
    with pytest.raises(UserError, match="no marks"):
        som.ask(ctx, ALICE, state, "What is 1?")
    with pytest.raises(UserError, match="no position"):
        som.click(ctx, state, None, None, "point")
    with pytest.raises(UserError, match="too small"):
        som.click(ctx, som.click(ctx, state, 5, 5, "box"), 6, 6, "box")
    width, height = Image.open(MARKS).size
    for x, y in ((width + 40, 10), (10, -30)):               # the margin around the shown picture
        with pytest.raises(UserError, match="outside the image"):
            som.click(ctx, state, x, y, "point")
    assert state.marks == []
    assert som.click(ctx, state, width + 0.5, height, "point").marks[-1].pixels == (width, height)
    with pytest.raises(UserError):
        som.marks_from_spec([[1, 2, 3]], 100, 100)
    assert som.marks_from_spec([[120, -5], [30, 40, 10, 20]], 100, 100) == [
        Mark(1, (100.0, 0.0), "user"), Mark(2, (10.0, 20.0, 30.0, 40.0), "user")]
