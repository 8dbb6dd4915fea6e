"""The continuous-batching engine: batched answers equal one-by-one answers (started together,
joining mid-way, with one cancelled), caches on equal caches off over a multi-turn
conversation with a mid-conversation image, per-request sampling, and the engine keeping its
caches in their bounds (the caches themselves: test_caches.py).

The demo model (assets/demo, 11M parameters) answers differently for each image and question,
so a row mixed up with another, a misplaced position or a stale cache shows in the text; the
one-by-one reference is `Generator` (transformers' own `generate`)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import from_pretrained
from sphinx_model.serving import ContinuousBatcher, EngineConfig
from sphinx_model.serving.generation import GenerationSettings, Generator

sys.path.insert(0, str(Path(__file__).parent))
from serving_support import DEMO, GREEDY, QUESTIONS, SCENES, ask, one_by_one


@pytest.fixture(scope="module")
def gen() -> Generator:
    torch.set_num_threads(2)
    model, processor = from_pretrained(DEMO, device="cpu")
    return Generator(model, processor)


@pytest.fixture
def engine(gen):
    eng = ContinuousBatcher(gen, EngineConfig(max_batch=8))
    yield eng
    eng.close()


def test_requests_started_together_decode_as_one_batch_and_answer_as_one_by_one(gen, engine):
    text_only = (Conversation([Message.user("Hello, what can you do?")]), [])   # a short prompt: much padding
    cases = [ask(k) for k in range(5)] + [text_only]
    jobs = [engine.prepare(c, ims, GREEDY) for c, ims in cases]
    engine.submit(*jobs)
    answers = ["".join(engine.read(j)) for j in jobs]
    assert answers == one_by_one(gen, cases)
    assert len(set(answers)) > 3                       # the answers differ: rows cannot hide a mix-up
    assert engine.stats["max_rows"] == 6 and engine.stats["images_encoded"] == 3   # 3 scenes, each once


def test_a_request_joining_mid_way_answers_as_alone(gen, engine):
    long = GenerationSettings(max_new_tokens=48)
    (ca, ia), (cb, ib) = ask(0), ask(3)
    a = engine.prepare(ca, ia, long)
    b = engine.prepare(cb, ib, GREEDY)
    pieces = engine.stream(a)
    head = [next(pieces) for _ in range(3)]            # a is decoding...
    engine.submit(b)                                    # ...when b arrives
    text_b = "".join(engine.read(b))
    text_a = "".join(head) + "".join(pieces)
    assert text_a == one_by_one(gen, [(ca, ia)], long)[0]
    assert text_b == one_by_one(gen, [(cb, ib)])[0]
    assert engine.stats["max_rows"] == 2                # b decoded alongside a


def test_cancelling_one_request_leaves_the_others_unchanged(gen, engine):
    cases = [ask(k) for k in (1, 4, 5)]                 # the middle one answers at length
    jobs = [engine.prepare(c, ims, GREEDY) for c, ims in cases]
    engine.submit(*jobs)
    victim = engine.read(jobs[1])
    got = next(victim)
    jobs[1].cancel.set()
    got += "".join(victim)
    kept = ["".join(engine.read(jobs[k])) for k in (0, 2)]
    ref = one_by_one(gen, cases)
    assert kept == [ref[0], ref[2]]
    assert jobs[1].reason == "cancelled" and ref[1].startswith(got) and len(got) < len(ref[1])


def test_each_request_samples_with_its_own_seed_whoever_shares_the_batch(gen, engine):
    sampled = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    conv, ims = ask(2)
    alone = "".join(engine.stream(engine.prepare(conv, ims, sampled)))
    others = [engine.prepare(*ask(k), GREEDY) for k in (0, 4)]
    mine = engine.prepare(conv, ims, sampled)
    engine.submit(others[0], mine, others[1])
    together = "".join(engine.read(mine))
    for job in others:
        assert "".join(engine.read(job)) == one_by_one(gen, [ask(0 if job is others[0] else 4)])[0]
    assert together == alone


def _prefixes_hold_what_they_say(engine: ContinuousBatcher) -> bool:
    """Every prefix cache entry holds KV for exactly the positions its keys name."""
    return all(len(e.keys) == e.kv[0][0].shape[2] for _, e in engine.prefixes.items())


def test_a_prompt_asked_again_joins_the_batch_at_once_and_answers_the_same(gen, engine):
    long = GenerationSettings(max_new_tokens=48)
    again = ask(1)
    first = "".join(engine.stream(engine.prepare(*again, GREEDY)))
    busy = engine.stream(engine.prepare(*ask(0), long))
    head = next(busy)                                   # a row is decoding...
    prefilled = engine.stats["prefilled"]
    job = engine.prepare(*again, GREEDY)
    engine.submit(job)                                  # ...when the same prompt comes again
    assert "".join(engine.read(job)) == first == one_by_one(gen, [again])[0]
    assert head + "".join(busy) == one_by_one(gen, [ask(0)], long)[0]
    assert engine.stats["prefilled_in_step"] == 1       # its last position ran as a row of a step
    assert engine.stats["prefilled"] == prefilled       # no prefill of its own
    assert engine.stats["max_rows"] == 2 and _prefixes_hold_what_they_say(engine)


def test_a_request_reuses_the_prompt_kv_of_a_row_still_decoding(gen, engine):
    long = GenerationSettings(max_new_tokens=48)
    conv, ims = ask(0)
    a = engine.stream(engine.prepare(conv, ims, long))
    head = next(a)                                      # nothing cached yet: a's prompt is only in the batch
    same_picture = ask(1)                               # the same scene, another question
    jobs = [engine.prepare(conv, ims, GREEDY), engine.prepare(*same_picture, GREEDY)]
    engine.submit(*jobs)
    assert ["".join(engine.read(j)) for j in jobs] == one_by_one(gen, [(conv, ims), same_picture])
    assert head + "".join(a) == one_by_one(gen, [(conv, ims)], long)[0]
    assert engine.stats["reused_in_flight"] > 2 * 95   # both took a's system prompt and picture
    assert engine.stats["images_encoded"] == 1 and _prefixes_hold_what_they_say(engine)


def conversation_turns(engine: ContinuousBatcher) -> list[str]:
    """Four turns; a second image arrives at turn 3 (the demo preset takes up to four)."""
    turns = [(QUESTIONS[0], SCENES[0]), (QUESTIONS[3], None), (QUESTIONS[1], SCENES[2]), (QUESTIONS[2], None)]
    messages, images, answers = [], [], []
    for question, image in turns:
        messages.append(Message.user(question, image=image is not None))
        images += [image] if image else []
        answer = "".join(engine.stream(engine.prepare(Conversation(list(messages)), images, GREEDY)))
        messages.append(Message.assistant(answer))
        answers.append(answer)
    return answers


def test_caches_on_give_the_answers_of_caches_off_over_a_multi_turn_conversation(gen):
    on = ContinuousBatcher(gen, EngineConfig())
    off = ContinuousBatcher(gen, EngineConfig(image_cache_bytes=0, prefix_cache_bytes=0))
    try:
        assert conversation_turns(on) == conversation_turns(off)
        assert on.stats["images_encoded"] == 2 and off.stats["images_encoded"] == 1 + 1 + 2 + 2
        assert len(on.canvases) == 2 and len(off.canvases) == 0     # each image preprocessed once, too
        assert on.stats["reused"] > on.stats["prefilled"]           # later turns prefill only their suffix
        assert off.stats["reused"] == 0
    finally:
        on.close()
        off.close()


def test_the_engines_caches_stay_within_their_bounds_and_still_answer_the_same(gen):
    # the demo's images give 95 and 59 visual tokens of 256 floats (97 / 60 kB): one fits at a time;
    # a prefix costs 12 kB a position: the later turns' (over 330 positions) do not fit
    image_bound, prefix_bound = 100_000, 4_000_000
    small = ContinuousBatcher(gen, EngineConfig(image_cache_bytes=image_bound, prefix_cache_bytes=prefix_bound))
    off = ContinuousBatcher(gen, EngineConfig(image_cache_bytes=0, prefix_cache_bytes=0))
    try:
        assert conversation_turns(small) == conversation_turns(off)
    finally:
        small.close()                                   # joins the scheduler: its last row is stored
        off.close()
    assert 0 < small.images.nbytes <= image_bound and len(small.images) == 1
    assert small.canvases.nbytes <= image_bound       # a 256 px canvas (786 kB) does not fit: none kept
    assert small.stats["images_encoded"] > 2            # evicted images were encoded again
    assert 0 < small.prefixes.nbytes <= prefix_bound and small.stats["reused"] > 0


# --- the caches on their own ---------------------------------------------------------------------
