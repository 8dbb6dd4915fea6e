"""The demo world as lmms-eval tasks: the documents are the evaluator's questions, and its scoring gives
the same numbers as `train.evaluate` for answers in any model's canvas, once mapped to the image."""
from __future__ import annotations

import json

import pytest

from sphinx_model.config import get_preset
from sphinx_model.processor import SphinxProcessor
from sphinx_model.tokenizer import byte_tokenizer
from train.benchmarks.postprocess import map_answer
from train.benchmarks.world_tasks import (BOX_METRICS, aggregate, doc_question, main, process_results, question_doc,
                                          task_name, write_tasks)
from train.evaluate import METRICS, make_questions, reference_answer, score, summarise


@pytest.fixture(scope="module")
def big_world(tmp_path_factory):
    from train.synthetic import write_world

    return write_world(tmp_path_factory.mktemp("world_tasks"), 24, seed=3, renderer="heldout", progress=False)


def test_writer_puts_every_question_in_its_task(big_world, tmp_path):
    counts = write_tasks(big_world, tmp_path / "tasks")
    questions = make_questions(big_world)
    assert sum(counts.values()) == len(questions)
    assert set(counts) == {task_name(m) for m in METRICS}
    group = (tmp_path / "tasks" / "sphinx_world.yaml").read_text()
    assert all(f"  - {t}\n" in group for t in counts)
    docs = [json.loads(line) for line in (tmp_path / "tasks" / "grounding.jsonl").read_text().splitlines()]
    back = doc_question(docs[0])
    first = next(q for q in questions if q.metric == "grounding")
    assert (back.id, back.prompt, back.truth, back.scene) == (first.id, first.prompt, first.truth, first.scene)
    for metric in BOX_METRICS:
        assert "sphinx_boxes: image_fraction" in (tmp_path / "tasks" / f"{task_name(metric)}.yaml").read_text()


@pytest.mark.parametrize("anchor", ["top-left", "center"])
def test_scores_agree_with_train_evaluate_for_either_canvas(big_world, anchor):
    """A perfect answer on the model's canvas scores 1.0 after the adapter's mapping, for both anchors."""
    proc = SphinxProcessor(get_preset("sphinx-test-tiny").replace(anchor=anchor), byte_tokenizer())
    questions = make_questions(big_world)
    by_metric: dict[str, list] = {}
    for q in questions:
        answer = reference_answer(q, anchor)
        if q.metric in BOX_METRICS:
            answer = map_answer(answer, proc.geometry(q.scene.width, q.scene.height), "image_fraction")
        by_metric.setdefault(q.metric, []).append(process_results(question_doc(q), [answer])[q.metric])
    evaluator = summarise([(q, score(q, reference_answer(q, anchor), anchor)) for q in questions])
    assert {m: aggregate(items) for m, items in by_metric.items()} == {m: row["value"] for m, row in evaluator.items()}
    assert all(row["value"] == 1.0 for row in evaluator.values())


def test_wrong_boxes_still_score_zero(big_world):
    q = next(q for q in make_questions(big_world) if q.metric == "grounding")
    x0, y0, x1, y1 = q.truth["box"]
    w, h = q.scene.width, q.scene.height
    far = f"[{1 - x1 / w:.4f},{1 - y1 / h:.4f},{1 - x0 / w:.4f},{1 - y0 / h:.4f}]"  # mirrored: fractions of the image
    near = f"[{x0 / w:.4f},{y0 / h:.4f},{x1 / w:.4f},{y1 / h:.4f}]"
    assert aggregate([process_results(question_doc(q), [near])["grounding"]]) == 1.0
    assert aggregate([process_results(question_doc(q), [far])["grounding"]]) == 0.0


def test_cli_writes_tasks_and_refuses_bad_arguments(big_world, tmp_path, capsys):
    assert main(["--data", str(big_world), "--out", str(tmp_path / "t"), "--limit", "3"]) == 0
    assert "sphinx_world_grounding:" in capsys.readouterr().out
    for argv in (["--data", str(tmp_path), "--out", str(tmp_path / "u")],
                 ["--data", str(big_world), "--out", str(tmp_path / "v"), "--limit", "0"],
                 ["--data", str(big_world), "--out", str(big_world)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err
