"""The evaluator's metrics: a perfect answer file scores 1.0 and a wrong one 0.0 on every metric."""
from __future__ import annotations

import json

import pytest

from train.evaluate import METRICS, Question, main as evaluate_main, make_questions, reference_answer, score, summarise
from train.synthetic import write_world
from train.world.tasks import TaskWriter
from train.world.vocab import COLOUR_NAMES, SHAPES


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("eval_world"), 120, seed=1234, progress=False)


def wrong_answer(q: Question) -> str:
    """An answer that is wrong for `q` in the way a weak model is wrong (plausible format)."""
    t, w = q.truth, TaskWriter(q.scene)
    far = lambda b: [q.scene.width - b[2], q.scene.height - b[3], q.scene.width - b[0], q.scene.height - b[1]]  # noqa: E731
    if q.metric == "grounding":
        x0, y0, x1, y1 = t["box"]
        return w.box([x0, y0, x0 + (x1 - x0) * 0.3, y0 + (y1 - y0) * 0.3])  # IoU 0.09
    if q.metric == "detection":
        return ", ".join(f"<p>{name}</p> " + w.box([b[0], b[1], b[0] + (b[2] - b[0]) * 0.3, b[1] + (b[3] - b[1]) * 0.3])
                         for name, b in t["objects"])
    if q.metric == "counting":
        return str(t["count"] + 1)
    if q.metric == "attribute":
        vocab = COLOUR_NAMES if t["answer"] in COLOUR_NAMES else SHAPES
        return next(v for v in vocab if v != t["answer"])
    if q.metric == "ocr":
        return "qqq"
    if q.metric == "spotting":
        word, box = t["words"][0]
        return f"<p>qqq</p> {w.box(box)}, <p>{word}</p> {w.box(far(box))}"  # wrong word; right word, wrong place
    other_colour = next(c for c in COLOUR_NAMES if c != t["colour"])
    return f"{other_colour} {t['shape']}"


def test_questions_cover_every_metric(world):
    questions = make_questions(world)
    assert {q.metric for q in questions} == set(METRICS)


def test_perfect_answers_score_one_and_wrong_answers_zero(world):
    questions = make_questions(world)
    perfect = summarise([(q, score(q, reference_answer(q))) for q in questions])
    wrong = summarise([(q, score(q, wrong_answer(q))) for q in questions])
    assert set(perfect) == set(METRICS)
    for metric in METRICS:
        assert perfect[metric]["value"] == 1.0, metric
        assert wrong[metric]["value"] == 0.0, metric


def test_box_scoring_goes_through_canvas_geometry(world):
    """A grounding answer for a tall image must be read relative to the padded square canvas."""
    q = next(q for q in make_questions(world) if q.metric == "grounding" and q.scene.height > 1.5 * q.scene.width)
    x0, y0, x1, y1 = q.truth["box"]
    side = max(q.scene.width, q.scene.height)
    as_width_fraction = f"[{x0 / q.scene.width:.2f},{y0 / q.scene.height:.2f},{x1 / q.scene.width:.2f},{y1 / q.scene.height:.2f}]"
    assert score(q, f"[{x0 / side:.3f},{y0 / side:.3f},{x1 / side:.3f},{y1 / side:.3f}]")["correct"] == 1.0
    assert score(q, as_width_fraction)["correct"] == 0.0


def test_cli_scores_an_answer_file_and_writes_records_and_card(world, tmp_path, capsys):
    questions = make_questions(world)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": q.id, "answer": reference_answer(q)}) + "\n" for q in questions))
    card = tmp_path / "README.md"
    card.write_text("# card\n")
    records = tmp_path / "records.jsonl"
    assert evaluate_main(["--data", str(world), "--answers", str(answers), "--records", str(records),
                          "--card", str(card)]) == 0
    out = capsys.readouterr().out
    assert "grounding acc@0.5 | 1.000" in out
    assert len(records.read_text().splitlines()) == len(questions)
    assert "1.000" in card.read_text()


def test_cli_refuses_a_folder_that_is_not_a_world(tmp_path, capsys):
    assert evaluate_main(["--data", str(tmp_path), "--answers", str(tmp_path / "x.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error:")
