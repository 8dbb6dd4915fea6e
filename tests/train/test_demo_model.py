"""The shipped demo model (assets/demo): small, loads by default, and on held-out scenes it has
never seen (another seed) does what its model card measures, far above chance.

What it measurably does (assets/demo/README.md): names the colour of a named shape, writes
well-formed boxes for grounding questions and answers every task in its format. What it does
not yet do (shapes, counts, words, precise boxes) is stated in the card, not asserted here.
Thresholds sit below the measured values and far above chance (colour: 1 in 12).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from sphinx_model.boxes import parse_regions
from train.evaluate import generate_answers, make_questions, score
from train.synthetic import write_world

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo"
MIN_COLOUR_OF = 0.30      # measured 0.54 (v2; v1 0.51) on 80 + 80 held-out scenes; chance 0.083
MIN_BOX_FORMAT = 0.90     # share of grounding answers that are exactly one well-formed box


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    world = write_world(tmp_path_factory.mktemp("demo_heldout"), 40, seed=777, progress=False)
    questions = [q for q in make_questions(world)
                 if q.metric == "grounding" or (q.metric == "attribute" and q.prompt.startswith("What color"))]
    return questions, generate_answers(str(DEMO), questions, batch_size=16, max_new_tokens=24)


def test_demo_checkpoint_is_shipped_small_and_loads():
    from sphinx_model.loading import from_pretrained

    size = sum(f.stat().st_size for f in DEMO.iterdir() if f.is_file())
    assert size <= 50 * 2**20
    model, processor = from_pretrained(DEMO)
    assert processor.config.skip_tokens and processor.config.anchor == "top-left"
    assert processor.max_images > 1
    assert (DEMO / "README.md").is_file() and (DEMO / "curves.png").is_file()


def test_demo_model_names_colours_far_above_chance(heldout):
    questions, answers = heldout
    scored = [score(q, a)["correct"] for q, a in zip(questions, answers) if q.metric == "attribute"]
    assert len(scored) >= 15
    assert sum(scored) / len(scored) >= MIN_COLOUR_OF


def test_demo_model_answers_grounding_with_one_well_formed_box(heldout):
    questions, answers = heldout
    boxes = [parse_regions(a) for q, a in zip(questions, answers) if q.metric == "grounding"]
    ok = [len(b) == 1 and b[0].is_box and b[0].coords[0] < b[0].coords[2] for b in boxes]
    assert sum(ok) / len(ok) >= MIN_BOX_FORMAT


def test_demo_answers_are_deterministic(heldout):
    questions, answers = heldout
    again = generate_answers(str(DEMO), questions[:6], batch_size=3, max_new_tokens=24)
    assert again == answers[:6]
