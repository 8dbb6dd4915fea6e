"""The converted models' tokenizer gives SentencePiece's ids and text, checked against
`sentencepiece` itself on the same model file: byte-fallback runs that are not valid UTF-8 keep
their valid bytes (a newline, and with it the `\\n###` stop, survives), a leading space from a byte
token stays, and text that starts with a space (a custom system prompt) gets SentencePiece's ids."""
import random

import pytest
import sentencepiece as spm

from sphinx_model.config import get_preset
from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import build_from_config
from sphinx_model.processor import IMAGE_TOKEN_ID, SphinxProcessor
from sphinx_model.serving.generation import Generator
from sphinx_model.tokenizer import SentencePieceTokenizer, load_tokenizer, sentencepiece_tokenizer

CORPUS = ["A chat between a curious human and an artificial intelligence assistant.",
          "### Human: What is in the image?\n### Assistant: A red square [0.12,0.30,0.55,0.91].",
          "Detect all objects shown in the image. <p>dog</p> [0.10,0.20,0.40,0.90]"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, train_sentencepiece):
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model", CORPUS, 320)


@pytest.fixture(scope="module")
def pair(model_file):
    return sentencepiece_tokenizer(model_file), spm.SentencePieceProcessor(model_file=str(model_file))


def _byte(sp, b: int) -> int:
    return sp.piece_to_id(f"<0x{b:02X}>")


def test_encode_matches_sentencepiece(pair):
    tok, sp = pair
    rng = random.Random(0)
    alphabet = "ab xy\n#[]0.,:é日本😀 \t"
    texts = CORPUS + [" leading space", "  two", " ", "\n### Human:", "ünïcode 日本語 😀", "trailing  "]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)
    assert tok.encode("hi", add_special_tokens=True) == [sp.bos_id()] + sp.encode("hi")


def test_decode_matches_sentencepiece_on_any_ids(pair):
    tok, sp = pair
    rng = random.Random(1)
    plain = [i for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)]
    bytes_ = [i for i in plain if sp.is_byte(i)]
    for n in range(300):
        ids = [rng.choice(bytes_ if rng.random() < 0.5 else plain) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids) == sp.decode(ids), ids
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids), ids


def test_invalid_byte_runs_keep_the_valid_bytes_and_the_stop(pair):
    tok, sp = pair
    ids = [_byte(sp, 0xE6), _byte(sp, 0x97)] + [_byte(sp, 0x0A)] + sp.encode("###")[1:]   # half a 日, then \n###
    text = tok.decode(ids)
    assert text == sp.decode(ids) and "\n###" in text            # transformers' decoder lost the newline here
    assert tok.decode([_byte(sp, 0x20)] + sp.encode("x")) == sp.decode([_byte(sp, 0x20)] + sp.encode("x"))
    model, _ = build_from_config(get_preset("sphinx-test-released"))
    processor = SphinxProcessor(get_preset("sphinx-test-released"), tok)
    shown, stopped = Generator(model, processor).visible_text(sp.encode("A cat.") + ids)
    assert stopped and shown == "A cat.\ufffd\ufffd"


def test_a_custom_system_prompt_that_starts_with_a_space_gets_sentencepieces_ids(pair):
    tok, sp = pair
    processor = SphinxProcessor(get_preset("sphinx-test-released"), tok)
    conv = Conversation([Message.system(" Answer briefly."), Message.user("What is in the image?")])
    ids = processor.encode(conv).input_ids
    rendered = " Answer briefly.\n\n### Human: What is in the image?\n### Assistant:"
    assert ids[0] == sp.bos_id() and IMAGE_TOKEN_ID not in ids
    assert ids[1:] == sp.encode(rendered)


def test_saved_and_loaded_it_stays_the_same_tokenizer(pair, tmp_path):
    tok, sp = pair
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert isinstance(loaded, SentencePieceTokenizer)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0) and len(loaded) == 320
    assert loaded.encode(" x\n###", add_special_tokens=False) == sp.encode(" x\n###")


def test_a_model_file_that_is_not_sentencepiece_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(ValueError, match="is not a usable SentencePiece model"):
        sentencepiece_tokenizer(tmp_path / "tokenizer.model")
