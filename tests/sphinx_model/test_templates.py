import pytest

from sphinx_model.conversation import Conversation, Message
from sphinx_model.templates import IGNORE_INDEX, get_template, tokenize_segments
from sphinx_model.tokenizer import byte_tokenizer

IMG = -200


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def conv2():
    return Conversation([Message.user("What is it?", image=True), Message.assistant("A red car."),
                         Message.user("Where?"), Message.assistant("On a road.")])


def trained_text(tok, ids, labels):
    return tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_released_template_renders_the_documented_prompt(tok):
    t = get_template("sphinx")
    conv = conv2()
    conv.messages.append(Message.user("Any people?"))
    text = "".join(s.text for s in t.segments(conv, add_generation_prompt=True))
    assert text == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the human's questions.\n\n"
                    "### Human: What is it?\n### Assistant: A red car.\n### Human: Where?\n### Assistant: "
                    "On a road.\n### Human: Any people?\n### Assistant:")


def test_released_labels_cover_answers_and_end_marker_only(tok):
    t = get_template("sphinx")
    ids, labels = tokenize_segments(t.segments(conv2(), False), tok, num_visual_tokens=7, image_token_id=IMG)
    assert ids[0] == tok.bos_token_id and ids[1:8] == [IMG] * 7 and ids[8] != IMG
    assert len(ids) == len(labels)
    assert all(l == IGNORE_INDEX for l in labels[:8])
    assert trained_text(tok, ids, labels) == " A red car.\n### On a road.\n###"


def test_new_template_trains_eos(tok):
    t = get_template("sphinx-x")
    ids, labels = tokenize_segments(t.segments(conv2(), False), tok, 0, IMG)
    trained = [l for l in labels if l != IGNORE_INDEX]
    assert trained.count(tok.eos_token_id) == 2 and trained[-1] == tok.eos_token_id
    assert trained_text(tok, ids, labels).replace("</s>", "|") == " A red car.| On a road.|"


def test_text_only_and_system_prompt(tok):
    t = get_template("sphinx")
    conv = Conversation([Message.system("Be brief."), Message.user("Hi")])
    ids, labels = tokenize_segments(t.segments(conv, True), tok, 0, IMG)
    assert IMG not in ids and set(labels) == {IGNORE_INDEX}
    assert tok.decode(ids[1:]).startswith("Be brief.\n\n### Human: Hi")


def test_generation_prompt_needs_user_turn():
    with pytest.raises(ValueError, match="user turn"):
        get_template("sphinx").segments(conv2(), add_generation_prompt=True)


def test_clean_output_strips_stop_string():
    assert get_template("sphinx").clean_output(" A car.\n### Human: more") == "A car."


def test_turn_by_turn_ids_equal_a_whole_string_encode_with_sentencepiece(tmp_path, train_sentencepiece):
    """Llama's SentencePiece adds a word-boundary marker to every encode call; segments must not."""
    import sentencepiece as spm

    from sphinx_model.tokenizer import sentencepiece_tokenizer

    text = ["A chat between a curious human and an artificial intelligence assistant.",
            "### Human: What is in the image? ### Assistant: A red car on a road. Where is it?"]
    tok = sentencepiece_tokenizer(train_sentencepiece(tmp_path / "tokenizer.model", text, 320))
    t = get_template("sphinx")
    segments = t.segments(conv2(), add_generation_prompt=False)
    ids, labels = tokenize_segments(segments, tok, 0, IMG)
    whole = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).encode(
        "".join(s.text for s in segments))
    assert ids[1:] == whole
    trained = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert trained.lstrip() == "A red car.\n### On a road.\n###"   # SentencePiece drops a leading space
