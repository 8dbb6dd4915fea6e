"""The `sphinx_x` model in-process, on lmms-eval's own request objects: registered through the
entry point, batched answers equal one-by-one answers, likelihoods equal the LLM's own loss, bad
documents are reported and skipped, boxes are mapped through the geometry of the image it saw."""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from PIL import Image

from benchmark_helpers import SIZES, box_of, lmms_eval_ready, needs_lmms_eval, scene

pytestmark = needs_lmms_eval

# Without lmms-eval the whole module is skipped before anything below names its objects (a default
# argument or a decorator would otherwise be evaluated at collection and fail with a NameError).
if lmms_eval_ready() is not None:
    pytest.skip(str(lmms_eval_ready()), allow_module_level=True)

from lmms_eval.api.instance import GenerationResult, Instance  # noqa: E402

from sphinx_model.boxes import box_to_text  # noqa: E402
from sphinx_model.processor import Encoded  # noqa: E402
from train.benchmarks.docs import doc_to_visual  # noqa: E402
from train.benchmarks.lmms_model import SphinxX  # noqa: E402
from train.benchmarks.prompts import TaskProfile  # noqa: E402
from train.benchmarks.requests import prepare  # noqa: E402

TASK, SPLIT = "local_task", "test"
GREEDY = {"max_new_tokens": 12, "temperature": 0, "do_sample": False, "until": ["\n\n"]}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("imgs")
    return [scene(root / f"{k}.png", w, h, k) for k, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return SphinxX(pretrained=str(tiny_checkpoint), device="cpu", batch_size=4)


def request(kind: str, doc_id: int, ctx, extra, doc_to_visual=doc_to_visual, task: str = TASK):
    return Instance(request_type=kind, arguments=(ctx, extra, doc_to_visual, doc_id, task, SPLIT), idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def docs_for(images: list[str]) -> list[dict]:
    return ([{"question": f"What is in picture {k}?", "image": p} for k, p in enumerate(images)]
            + [{"question": "Say a word.", "image": ""},                                  # text only
               {"question": "Compare the two pictures.", "images": images[:2]}])          # two images


def answers(lm, docs, gen_kwargs, batch_size):
    lm.task_dict = {TASK: {SPLIT: docs}}
    lm._batch_size = batch_size
    try:
        return lm.generate_until([request("generate_until", i, d["question"], dict(gen_kwargs))
                                  for i, d in enumerate(docs)])
    finally:
        lm._batch_size = 4


def test_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    assert get_model("sphinx_x") is SphinxX


def test_batched_generation_equals_one_by_one(lm, images):
    docs = docs_for(images)
    batched = answers(lm, docs, GREEDY, 4)
    assert batched == answers(lm, docs, GREEDY, 1)
    assert len(batched) == len(docs) and all(isinstance(a, str) for a in batched)
    assert not lm.bad_documents


def test_until_and_max_new_tokens_are_honoured(lm, images):
    docs = docs_for(images)[:3]
    long = answers(lm, docs, {**GREEDY, "until": [], "max_new_tokens": 24}, 4)
    short = answers(lm, docs, {**GREEDY, "until": [], "max_new_tokens": 3}, 4)
    assert all(len(lm.tokenizer.encode(s, add_special_tokens=False)) <= 3 + 1 for s in short)
    stops = [a[1:3] for a in long if len(a) >= 3]   # a piece each answer does contain
    assert stops, long
    cut = answers(lm, docs, {**GREEDY, "until": stops, "max_new_tokens": 24}, 4)
    for full, c in zip(long, cut):
        assert not any(s in c for s in stops) and full.startswith(c)


def test_loglikelihood_batched_equals_single_and_equals_the_llm_loss(lm, images):
    docs = [{"question": "Which colour is the box?", "image": p, "choices": ["red", "green", "a blue box"]}
            for p in images[:3]]
    lm.task_dict = {TASK: {SPLIT: docs}}
    reqs = [request("loglikelihood", i, d["question"], " " + c) for i, d in enumerate(docs) for c in d["choices"]]
    reqs += [Instance(request_type="loglikelihood", arguments=("", c), idx=0,        # acc_mutual_info's form
                      metadata={"task": TASK, "doc_id": 0, "repeats": 1}) for c in ("red", "green")]
    lm._batch_size = 4
    wrapped = lm.loglikelihood(reqs)
    assert all(isinstance(r, GenerationResult) for r in wrapped)      # survives lmms-eval 0.7.3's unwrap
    batched = [r.text for r in wrapped]
    lm._batch_size = 1
    single = lm.loglikelihood_pairs(reqs)
    lm._batch_size = 4
    assert [g for _, g in batched] == [g for _, g in single]
    assert [n for n, _ in batched] == pytest.approx([n for n, _ in single], abs=1e-4)
    assert all(0 < n < 50 for n, _ in single) and not lm.bad_documents
    # the first request, through the LLM's own cross-entropy
    prepared = prepare(lm.processor, docs[0], docs[0]["question"], doc_to_visual, TaskProfile(), lm.context_length)
    cont = lm._continuation_ids(" red")
    batch = lm.processor.collate([Encoded(prepared.input_ids + cont, [-100] * len(prepared.input_ids) + cont,
                                          prepared.images)])
    with torch.inference_mode():
        loss = lm.model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                        view_skip=batch["view_skip"], labels=batch["labels"]).loss
    assert single[0][0] == pytest.approx(float(loss), abs=1e-4)


def test_bad_documents_are_reported_not_fatal(lm, images, tmp_path):
    good = docs_for(images)[:2]

    def broken(doc):
        raise KeyError("image")

    docs = good + [{"question": "Is there a cat?", "image": str(tmp_path / "missing.png")},
                   {"question": "   ", "image": images[0]},
                   {"question": "Too many?", "images": images + images[:1]},
                   {"question": "A video?", "image": images[0]},
                   {"question": "Broken task code", "image": images[0]}]
    visual_fns = [doc_to_visual] * 5 + [lambda d: ["clip.mp4"], broken]
    lm.task_dict = {TASK: {SPLIT: docs}}
    lm.bad_documents.clear()
    reqs = [request("generate_until", i, d["question"], {**GREEDY, "sphinx_family": "short_answer",
                                                          "sphinx_field": "question"}, fn)
            for i, (d, fn) in enumerate(zip(docs, visual_fns))]
    out = lm.generate_until(reqs)
    assert out[2:] == [""] * 5
    reasons = {b["doc_id"]: b["reason"] for b in lm.bad_documents}
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert "missing.png" in reasons[2] and "empty" in reasons[3] and "at most 4" in reasons[4]
    assert "images only" in reasons[5] and "KeyError" in reasons[6]
    lm.bad_documents.clear()
    assert out[:2] == answers(lm, good, {**GREEDY, "sphinx_family": "short_answer", "sphinx_field": "question"}, 4)
    lm.bad_documents.clear()


def test_referring_prompt_and_boxes_through_the_seen_image(lm, images):
    """The adapter asks SPHINX's REC question and maps a canvas box with the geometry of the image it processed."""
    k = 1                                                    # the tall picture: canvas fractions != image fractions
    w, h = SIZES[k]
    doc = {"phrase": "the red box", "image": images[k]}
    profile = TaskProfile("referring", "phrase", "image_fraction")
    prepared = prepare(lm.processor, doc, "the task's own prompt", doc_to_visual, profile, lm.context_length)
    assert prepared.conversation.messages[0].text == \
        "Please provide the bounding box coordinate of the region this sentence describes: the red box."
    box = box_of(w, h)
    model_says = box_to_text(box, prepared.canvas, decimals=4)
    mapped = lm._finish(model_says + "\n\nmore", prepared, ("\n\n",))
    got = [float(v) for v in mapped.strip("[]").split(",")]
    assert got == pytest.approx([box[0] / w, box[1] / h, box[2] / w, box[3] / h], abs=2e-4)


def test_multi_round_asks_each_round_afresh(lm, images):
    doc = {"question": "First question?", "image": images[0]}
    lm.task_dict = {TASK: {SPLIT: [doc]}}

    def doc_to_text(d, previous_output=None, round_idx=None, previous_round_info=None):
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [Image.open(images[2])], "Second question?", False, previous_output, {"round": round_idx}

    req = Instance(request_type="generate_until_multi_round",
                   arguments=("First question?", dict(GREEDY), doc_to_visual, doc_to_text, 0, TASK, SPLIT), idx=0,
                   metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    rounds = lm.generate_until_multi_round([req])[0]
    assert len(rounds) == 2
    lm.task_dict = {TASK: {SPLIT: [doc, {"question": "Second question?", "image": images[2]}]}}
    assert rounds[0] == answers(lm, [doc], GREEDY, 1)[0]
    assert rounds[1] == answers(lm, [{"question": "Second question?", "image": images[2]}], GREEDY, 1)[0]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs pretrained"), ({"batch_size": "auto"}, "batch_size"), ({"batch_size": 0}, "batch_size"),
    ({"prompts": "mine"}, "prompts"), ({"quantize": "3bit"}, "quantize"), ({"temperature": 1}, "unknown model_args"),
])
def test_bad_model_args_are_one_clear_error(tiny_checkpoint, kwargs, message):
    args = {"pretrained": str(tiny_checkpoint), **kwargs} if kwargs else {}
    with pytest.raises(ValueError, match=message):
        SphinxX(**args)


def test_a_missing_checkpoint_is_the_loaders_one_line_error(tmp_path):
    from sphinx_model.loading import CheckpointError

    with pytest.raises(CheckpointError, match="local folder"):
        SphinxX(pretrained=str(tmp_path / "nope"), device="cpu")


def test_quantize_reaches_the_loader_or_is_refused_in_one_line(tiny_checkpoint, images):
    """Passed through when `sphinx_model`'s loader offers quantisation (bitsandbytes runs on CPU), else refused."""
    from sphinx_model.loading import load_model

    if "quantize" not in inspect.signature(load_model).parameters:
        with pytest.raises(ValueError, match="does not offer"):
            SphinxX(pretrained=str(tiny_checkpoint), device="cpu", quantize="8bit")
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    lm8 = SphinxX(pretrained=str(tiny_checkpoint), device="cpu", quantize="8bit")
    assert any(type(m).__module__.startswith("bitsandbytes") for m in lm8.model.llm.modules())
    out = answers(lm8, docs_for(images)[:2], GREEDY, 2)
    assert len(out) == 2 and all(isinstance(a, str) for a in out)
