"""The continuous-batching engine: batched answers equal one-by-one answers (started together,
joining mid-way, with one cancelled), caches on equal caches off over a multi-turn
conversation with a mid-conversation image, per-request sampling, and the caches' bounds.

The demo model (assets/demo, 11M parameters) answers differently for each image and question,
so a row mixed up with another, a misplaced position or a stale cache shows in the text; the
one-by-one reference is `Generator` (transformers' own `generate`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sphinx_model.caches import ImageCache, LRUBytes, PrefixCache, position_keys
from sphinx_model.checkpoint import from_pretrained
from sphinx_model.conversation import Conversation, Message
from sphinx_model.generation import GenerationSettings, Generator
from sphinx_model.processor import IMAGE_TOKEN_ID
from sphinx_model.serving import ContinuousBatcher, EngineConfig

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "assets" / "demo"
EXAMPLES = ROOT / "assets" / "examples"
SCENES = [str(EXAMPLES / n) for n in ("scene-objects.png", "scene-marks.png", "scene-words.png", "scene-tall.png")]
QUESTIONS = ("Describe the image briefly.", "Detect all objects shown in the image.",
             "What is the text in the image?", "How many objects are there?")
GREEDY = GenerationSettings(max_new_tokens=24)


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


def ask(k: int) -> tuple[Conversation, list[str]]:
    return Conversation([Message.user(QUESTIONS[k % 4], image=True)]), [SCENES[(k // 2) % 4]]


def one_by_one(gen: Generator, cases, settings=GREEDY) -> list[str]:
    return [gen.generate([c], [ims], settings)[0] for c, ims in cases]


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
def test_lru_bytes_evicts_the_least_recently_used_and_refuses_what_cannot_fit():
    lru: LRUBytes[str] = LRUBytes(100)
    assert lru.put("a", "A", 40) and lru.put("b", "B", 40)
    assert lru.get("a") == "A"                          # a is now the most recent
    assert lru.put("c", "C", 40)                        # evicts b, not a
    assert "b" not in lru and lru.get("a") == "A" and lru.get("c") == "C" and lru.nbytes == 80
    assert not lru.put("huge", "H", 101) and "huge" not in lru and lru.nbytes == 80


def test_image_cache_is_bounded_by_the_bytes_of_its_tokens():
    cache = ImageCache(2 * 10 * 8 * 4)                  # two (10, 8) float32 sequences
    for k in range(3):
        cache.put_tokens(f"img{k}", torch.full((10, 8), float(k)))
    assert len(cache) == 2 and cache.nbytes == 640 and cache.get("img0") is None
    assert torch.equal(cache.get("img2"), torch.full((10, 8), 2.0))


def _kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4).clone(),
             -torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4).clone()) for _ in range(layers)]


def test_prefix_cache_returns_the_longest_shared_prefix_cut_to_its_length():
    cache = PrefixCache(1 << 20)
    cache.store((1, 2, 3, 4, 5), _kv(5))
    n, kv = cache.longest((1, 2, 3, 9, 9, 9), most=5)
    assert n == 3 and kv.get_seq_length() == 3
    assert torch.equal(kv.layers[0].keys[0, 0, :, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert cache.longest((1, 2, 3, 4, 5), most=4)[0] == 4          # at least one position is left to run
    assert cache.longest((7, 8), most=2) == (0, None)


def test_prefix_cache_keeps_one_entry_per_conversation_and_respects_its_bound():
    one = sum(t.numel() * 4 for pair in _kv(10) for t in pair)
    cache = PrefixCache(2 * one + one // 2)
    cache.store(tuple(range(5)), _kv(5))
    cache.store(tuple(range(10)), _kv(10))             # the next turn: covers the first entry
    assert len(cache) == 1 and cache.nbytes == one
    cache.store(tuple(range(100, 110)), _kv(10))
    cache.store(tuple(range(200, 210)), _kv(10))       # over the bound: the oldest goes
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.longest(tuple(range(10)) + (5,), most=10)[0] == 0


def test_a_different_image_at_the_same_placeholders_is_not_a_shared_prefix():
    ids = [1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7, 8]
    a, b = position_keys(ids, ["cat"], [3]), position_keys(ids, ["dog"], [3])
    cache = PrefixCache(1 << 20)
    cache.store(a, _kv(6))
    assert cache.longest(b, most=5)[0] == 1             # BOS only: the image differs
    assert cache.longest(a, most=5)[0] == 5
    with pytest.raises(ValueError):
        position_keys(ids, ["cat"], [2])


def test_images_are_keyed_by_their_content(tmp_path, make_image):
    import io

    from sphinx_model.caches import source_key

    a, b = make_image(64, 48, 1), make_image(64, 48, 1)
    assert source_key(a) == source_key(b)                    # two objects, one content
    b.putpixel((0, 0), (0, 0, 0))
    assert source_key(a) != source_key(b)                    # one pixel differs
    a.save(tmp_path / "a.png")
    assert source_key(tmp_path / "a.png") == source_key(str(tmp_path / "a.png")) != source_key(a)
    assert source_key(io.BytesIO(b"stream")) is None and source_key(tmp_path / "missing.png") is None
