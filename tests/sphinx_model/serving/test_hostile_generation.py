"""Generation settings and budgets against hostile values: refused in one line, and decoding never
runs past the model's context."""
import math

import pytest
import torch

from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import DeviceError, resolve_device
from sphinx_model.processor import PromptTooLongError, SphinxProcessor
from sphinx_model.serving.generation import GenerationSettings, Generator

BAD_SETTINGS = [
    {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": -0.1}, {"temperature": "0.7"},
    {"top_p": math.nan}, {"top_p": 0}, {"top_p": 1.5}, {"top_p": -math.inf},
    {"max_new_tokens": 0}, {"max_new_tokens": -5}, {"max_new_tokens": 2.5}, {"max_new_tokens": True},
    {"max_new_tokens": "10"}, {"top_k": -1}, {"top_k": 1.0}, {"repetition_penalty": 0},
    {"repetition_penalty": math.nan}, {"seed": -1}, {"seed": 2**64}, {"seed": 1.5}, {"seed": True},
    {"seed": "7"}, {"use_cache": "yes"},
]


@pytest.mark.parametrize("change", BAD_SETTINGS, ids=[repr(c) for c in BAD_SETTINGS])
def test_bad_settings_are_refused_in_one_line(change):
    with pytest.raises(ValueError) as err:
        GenerationSettings(**change)
    assert "\n" not in str(err.value) and next(iter(change)) in str(err.value)


def test_edge_settings_are_accepted():
    GenerationSettings(seed=0)
    GenerationSettings(seed=2**64 - 1, temperature=2, top_p=1, top_k=0, max_new_tokens=10**12)


def ask(text="Say something long."):
    return Conversation([Message.user(text)])


@pytest.mark.parametrize("limit_from", ["max_length", "positions"])
def test_new_tokens_are_capped_to_the_context(tiny, monkeypatch, limit_from):
    model, proc = tiny
    if limit_from == "max_length":
        gen = Generator(model, SphinxProcessor(proc.config.replace(max_length=260), proc.tokenizer))
    else:
        monkeypatch.setattr(model.llm.config, "max_position_embeddings", 260)
        gen = Generator(model, proc)
    assert gen.context_length == 260
    batch = gen.processor([ask()], None)
    prompt = batch["input_ids"].shape[1]
    out = gen._generate_ids(batch, GenerationSettings(max_new_tokens=10**9), None)
    assert prompt + out.shape[1] <= 260
    asked = []
    real = model.llm.generate
    monkeypatch.setattr(model.llm, "generate", lambda **kw: asked.append(kw["max_new_tokens"]) or real(**kw))
    list(gen.stream(ask(), None, GenerationSettings(max_new_tokens=10**9)))
    gen.generate([ask(), ask("Hi")], None, GenerationSettings(max_new_tokens=10**9))
    assert asked == [260 - prompt, 260 - prompt]


def test_a_prompt_that_fills_the_context_leaves_no_room(tiny):
    model, proc = tiny
    gen = Generator(model, proc)
    text = "x" * 100
    n = len(proc.encode(ask(text)).input_ids)
    short = Generator(model, SphinxProcessor(proc.config.replace(max_length=n), proc.tokenizer))
    with pytest.raises(PromptTooLongError, match="no room"):
        short.generate([ask(text)], None, GenerationSettings(max_new_tokens=5))
    with pytest.raises(PromptTooLongError, match="no room"):
        list(short.stream(ask(text), None, GenerationSettings(max_new_tokens=5)))
    assert gen.generate([ask(text)], None, GenerationSettings(max_new_tokens=2))


@pytest.mark.parametrize("device,message", [("banana", "unknown device"), ("cuda:x", "unknown device"),
                                            ("", "unknown device"), ("meta", "not available"),
                                            (7, "not available"), (None, "")])
def test_malformed_or_absent_devices(device, message):
    if device is None:
        assert resolve_device(device) is None
        return
    if device == 7 and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(DeviceError, match=message):
        resolve_device(device)


def test_devices_this_machine_lacks():
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) is None
