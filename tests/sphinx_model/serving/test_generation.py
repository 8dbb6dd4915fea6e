import threading

import pytest
import torch

from sphinx_model.conversation import Conversation, Message
from sphinx_model.serving.generation import GenerationSettings, Generator


@pytest.fixture(scope="module")
def gen(tiny):
    return Generator(*tiny)


def ask(text, image=True):
    return Conversation([Message.user(text, image=image)])


def test_greedy_with_kv_cache_equals_without(gen, make_image):
    img = make_image(96, 48)
    a = gen.generate([ask("Describe it.")], [img], GenerationSettings(max_new_tokens=12, use_cache=True))
    b = gen.generate([ask("Describe it.")], [img], GenerationSettings(max_new_tokens=12, use_cache=False))
    assert a == b and a[0]


def test_batched_equals_one_by_one(gen, make_image):
    convs = [ask("What is this?"), ask("Tell me about the colours in this picture, please."),
             Conversation([Message.user("Hi there", image=False)]), ask("Where?")]
    imgs = [make_image(64, 64, 1), make_image(40, 160, 2), None, make_image(200, 50, 3)]
    s = GenerationSettings(max_new_tokens=10)
    batched = gen.generate(convs, imgs, s)
    single = [gen.generate([c], [i], s)[0] for c, i in zip(convs, imgs)]
    assert batched == single


def test_streamed_text_equals_non_streamed(gen, make_image):
    img = make_image(80, 120)
    s = GenerationSettings(max_new_tokens=20)
    pieces = list(gen.stream(ask("Describe it."), img, s))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate([ask("Describe it.")], [img], s)[0]


def test_sampling_is_seeded(gen, make_image):
    img = make_image(64, 64)
    s = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert gen.generate([ask("Hi")], [img], s) == gen.generate([ask("Hi")], [img], s)


def test_stop_string_is_cut_and_held_back(gen):
    tok = gen.tokenizer
    ids = tok.encode("A red car.\n### Human: next", add_special_tokens=False)
    text, done = gen.visible_text(ids)
    assert (text, done) == ("A red car.", True)
    partial = tok.encode("A red car.\n#", add_special_tokens=False)
    assert gen.visible_text(partial) == ("A red car.", False)   # "\n#" may begin "\n###": held back
    from sphinx_model.serving.generation import StopOnStrings
    crit = StopOnStrings(tok, ["\n###"], prompt_len=0)
    stopped = tok.encode("A red car.\n###", add_special_tokens=False)   # checked after every new token
    batch = torch.tensor([stopped, tok.encode("no stop here at all, none", add_special_tokens=False)[:len(stopped)]])
    assert crit(batch, None).tolist() == [True, False]


def test_cancellation_from_another_thread(gen, make_image):
    img = make_image(64, 64)
    s = GenerationSettings(max_new_tokens=150)
    full = gen.generate([ask("Talk.")], [img], s)[0]
    cancel = threading.Event()
    pieces = []
    for piece in gen.stream(ask("Talk."), img, s, cancel=cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            threading.Thread(target=cancel.set).start()
    assert len("".join(pieces)) < len(full)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError):
        GenerationSettings(top_p=0)


def test_control_bytes_a_model_writes_never_reach_the_answer(gen):
    # a byte-level model can write any byte: a NUL (which no store keeps in text) or an escape
    tok = gen.tokenizer
    ids = tok.encode("A\x00 red\x1b[2J car.\tOK\n", add_special_tokens=False)
    assert gen.visible_text(ids, final_piece=True) == ("A red[2J car.\tOK", False)
    assert gen._finish(ids) == "A red[2J car.\tOK"
    for k in range(1, len(ids)):                        # every streamed prefix is a prefix of the answer
        assert "A red[2J car.\tOK".startswith(gen.visible_text(ids[:k])[0])
