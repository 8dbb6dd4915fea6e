"""The engine in a process of its own: the same answers as in this process (together, sampled,
with one cancelled, with an image whose tokens it let go), bad prompts refused before anything
is sent, a loader that fails reported here, and a killed engine process started again.

The reference is transformers' own `generate` through `Generator`, in this process, on the demo
model (its answers differ per image and question, so a mix-up shows in the text)."""
from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import CheckpointError, from_pretrained
from sphinx_model.processor import PromptTooLongError
from sphinx_model.serving import ContinuousBatcher, EngineConfig
from sphinx_model.serving.engine_process import EngineProcess
from sphinx_model.serving.generation import GenerationSettings, Generator

sys.path.insert(0, str(Path(__file__).parent))
from serving_support import DEMO, GREEDY, ROOT, ask, one_by_one

LOAD = functools.partial(from_pretrained, DEMO, device="cpu")


@pytest.fixture(scope="module")
def gen() -> Generator:
    torch.set_num_threads(2)
    return Generator(*from_pretrained(DEMO, device="cpu"))


@pytest.fixture(scope="module")
def remote():
    engine = EngineProcess(LOAD, EngineConfig(max_batch=8), threads=1)
    yield engine
    engine.close()


def test_requests_sent_together_answer_as_one_by_one_here(gen, remote):
    cases = [ask(k) for k in range(5)] + [(Conversation([Message.user("Hello, what can you do?")]), [])]
    jobs = [remote.prepare(c, ims, GREEDY) for c, ims in cases]
    remote.submit(*jobs)
    answers = ["".join(remote.read(j)) for j in jobs]
    assert answers == one_by_one(gen, cases)
    assert len(set(answers)) > 3 and all(j.reason in ("eos", "stop", "length") for j in jobs)
    stats = remote.stats
    assert stats["max_rows"] > 1 and stats["images_encoded"] == 3        # decoded together; each scene once
    # a later question about a scene it was sent goes without the pixels, and answers the same
    again = remote.prepare(*ask(1), GREEDY)
    assert again.image_keys[0] in remote._sent
    assert "".join(remote.stream(again)) == answers[1]
    assert remote.stats["images_encoded"] == 3 and remote.idle


def test_cancelling_one_leaves_the_others_and_sampling_keeps_its_seed(gen, remote):
    cases = [ask(k) for k in (1, 4, 5)]
    jobs = [remote.prepare(c, ims, GREEDY) for c, ims in cases]
    remote.submit(*jobs)
    victim = remote.read(jobs[1])
    got = next(victim)
    jobs[1].cancel.set()                                 # sent to the engine process at once
    got += "".join(victim)
    ref = one_by_one(gen, cases)
    assert ["".join(remote.read(jobs[k])) for k in (0, 2)] == [ref[0], ref[2]]
    assert jobs[1].reason == "cancelled" and ref[1].startswith(got) and len(got) < len(ref[1])

    sampled = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    here = ContinuousBatcher(gen, EngineConfig())
    try:
        want = "".join(here.stream(here.prepare(*ask(2), sampled)))
    finally:
        here.close()
    assert "".join(remote.stream(remote.prepare(*ask(2), sampled))) == want


def test_an_image_the_engine_process_let_go_is_sent_again(gen):
    small = EngineProcess(LOAD, EngineConfig(image_cache_bytes=100_000), threads=1)   # one image's tokens fit
    try:
        "".join(small.stream(small.prepare(*ask(0), GREEDY)))
        "".join(small.stream(small.prepare(*ask(2), GREEDY)))    # another scene: the first one's tokens go
        # the first scene again, another question: its pixels must cross again to be encoded
        assert "".join(small.stream(small.prepare(*ask(1), GREEDY))) == one_by_one(gen, [ask(1)])[0]
        assert small.stats["images_encoded"] == 3
    finally:
        small.close()


def test_a_prompt_too_long_is_refused_before_anything_is_sent(remote):
    words = Conversation([Message.user("many words " * 2000)])
    with pytest.raises(PromptTooLongError):
        remote.prepare(words, [], GREEDY)


def test_a_loader_that_fails_is_reported_here():
    with pytest.raises(CheckpointError):
        EngineProcess(functools.partial(from_pretrained, ROOT / "no-such-model", device="cpu"), threads=1)


def test_a_killed_engine_process_fails_its_requests_and_the_next_one_starts_it_again(gen):
    engine = EngineProcess(LOAD, EngineConfig(), threads=1)
    try:
        job = engine.prepare(*ask(1), GREEDY)
        engine.submit(job)
        os.kill(engine.pid, signal.SIGKILL)              # while it prefills (or before it has read the job)
        with pytest.raises(RuntimeError, match="stopped"):
            "".join(engine.read(job, timeout=30))
        assert job.reason == "error"
        assert "".join(engine.stream(engine.prepare(*ask(3), GREEDY))) == one_by_one(gen, [ask(3)])[0]
        assert engine.restarts == 1
    finally:
        engine.close()
