"""lmms-eval end to end through its CLI: `python -m lmms_eval --model sphinx_x` on local tasks in the
forms of SEED-Bench (likelihood), TextVQA, RefCOCO and POPE, plus the demo world; the run completes,
metrics come out, bad documents are reported, and the world's numbers are `train.evaluate`'s."""
from __future__ import annotations

from benchmark_helpers import FORMAT_TASKS, needs_lmms_eval

pytestmark = needs_lmms_eval

METRICS_OUT = {"fmt_seedbench_ppl": ["acc"], "fmt_textvqa": ["exact_match"],
               "fmt_refcoco_rec": ["refcoco_IoU", "refcoco_ACC@0.5", "refcoco_Center_ACC"],
               "fmt_pope": ["pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score"]}


def test_run_completes_with_metrics_for_every_task(cli_run):
    results = cli_run["results"]
    for task in FORMAT_TASKS:
        for metric in METRICS_OUT[task]:
            value = results[task][f"{metric},none"]
            assert isinstance(value, (int, float)) and 0.0 <= value <= 1.0, (task, metric, value)
    assert len(cli_run["samples"]["fmt_pope"]) == 6 and len(cli_run["samples"]["fmt_seedbench_ppl"]) == 4
    assert cli_run["seconds"] < 120


def test_likelihood_task_scored_by_the_models_losses(cli_run):
    """Each SEED-Bench document got four (loss, greedy) pairs and its `acc` follows their argmin."""
    for s in cli_run["samples"]["fmt_seedbench_ppl"]:
        pairs = s["filtered_resps"]
        assert len(pairs) == 4
        losses = [float(p[0]) for p in pairs]
        assert all(0 < v < 100 for v in losses)
        assert float(s["acc"]) == float(losses.index(min(losses)) == 0)  # the answer is choice A


def test_bad_documents_are_reported_and_the_run_goes_on(cli_run):
    out = cli_run["output"]
    assert "fmt_pope document 4 not answered" in out and "no-such-image.png" in out
    assert "fmt_pope document 5 not answered: its question is empty" in out
    answered = {s["doc_id"]: s["filtered_resps"] for s in cli_run["samples"]["fmt_pope"]}
    assert answered[4] in ("", [""]) and answered[5] in ("", [""])


def test_world_numbers_agree_with_train_evaluate(cli_run, tiny_checkpoint, world):
    """Same questions, same greedy answers, same scores: lmms-eval and `python -m train.evaluate` agree."""
    from sphinx_model.loading import from_pretrained
    from train.benchmarks.postprocess import map_answer
    from train.benchmarks.world_tasks import BOX_METRICS, task_name
    from train.evaluate import generate_answers, make_questions, score, summarise

    questions = make_questions(world)
    answers = generate_answers(str(tiny_checkpoint), questions, batch_size=16, max_new_tokens=160)
    table = summarise([(q, score(q, a, "top-left")) for q, a in zip(questions, answers)])
    results = cli_run["results"]
    assert {m: results[task_name(m)][f"{m},none"] for m in table} == {m: row["value"] for m, row in table.items()}
    # and answer by answer (box answers as the adapter maps them for the task)
    _, processor = from_pretrained(str(tiny_checkpoint))
    by_id = {q.id: (q, a) for q, a in zip(questions, answers)}
    for metric in table:
        for s in cli_run["samples"][task_name(metric)]:
            q, a = by_id[s["target"]]
            if metric in BOX_METRICS:
                a = map_answer(a, processor.geometry(q.scene.width, q.scene.height), "image_fraction")
            got = s["filtered_resps"]
            assert (got[0] if isinstance(got, list) else got) == a, (q.id, metric)
