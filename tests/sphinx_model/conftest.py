import io
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from PIL import Image, ImageDraw

from sphinx_model.config import get_preset
from sphinx_model.loading import build_from_config


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the tiny random-init preset: Llama + tiny ConvNeXt/DINOv2, skip tokens on."""
    torch.manual_seed(0)
    model, processor = build_from_config(get_preset("sphinx-test-tiny"))
    return model.eval(), processor


@pytest.fixture(scope="session")
def make_image():
    return draw_image


def draw_image(w: int, h: int, seed: int = 0) -> Image.Image:
    img = Image.new("RGB", (w, h), (30 + 40 * seed % 200, 120, 200))
    d = ImageDraw.Draw(img)
    d.rectangle([w // 4, h // 4, w // 2, h // 2], fill=(240, 20 * seed % 255, 20))
    return img


@pytest.fixture(scope="session")
def train_sentencepiece():
    return write_sentencepiece


def write_sentencepiece(path: Path, corpus: list[str], vocab_size: int, **options) -> Path:
    """A Llama-style SentencePiece model trained on `corpus` (repeated 20 times) and written to
    `path`: BPE, byte fallback, whitespace kept, unk/bos/eos = 0/1/2, no pad."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 20), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2, num_threads=1, **options)
    path.write_bytes(buf.getvalue())
    return path
