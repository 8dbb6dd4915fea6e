"""A byte-level BPE tokenizer trained on the synthetic world's dialogues.

Box coordinates (`0.00` .. `1.00`) are pre-tokenised as single pieces, so the trainer can
make each one a single token (all 101 are added to the vocabulary whatever their counts);
words keep their leading space (GPT-2 style). Special tokens follow the byte tokenizer's
ids (`<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3), so a model's BOS/EOS ids do not change.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
NUMBER_PIECES = tuple(f"{v / 100:.2f}" for v in range(101))
_PIECES = r"\d\.\d\d| ?\d+| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+"


def corpus_texts(data_files: Iterable[Path]) -> Iterator[str]:
    """Every message text of every record of the given JSONL files (training schema)."""
    for path in data_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                for msg in json.loads(line)["messages"]:
                    content = msg["content"]
                    if isinstance(content, str):
                        yield content
                    else:
                        yield from (p["text"] for p in content if p.get("type") == "text")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1536, extra_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    core.train_from_iterator(_with_numbers(texts, extra_texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False)
    missing = [p for p in NUMBER_PIECES if len(tok.encode(p, add_special_tokens=False)) != 1]
    if missing:  # a small vocabulary: the coordinates still get one token each (plain, not special)
        tok.add_tokens(missing)
    for i, s in enumerate(SPECIALS):
        if tok.convert_tokens_to_ids(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.convert_tokens_to_ids(s)}, expected {i}")
    return tok


def _with_numbers(texts: Iterable[str], extra: Iterable[str]) -> Iterator[str]:
    # Every coordinate piece often enough to become one merge, then the corpus.
    for _ in range(50):
        yield " ".join(NUMBER_PIECES)
    yield from extra
    yield from texts


def single_token_numbers(tok: PreTrainedTokenizerFast) -> float:
    """Share of the coordinate pieces that encode to exactly one token."""
    return sum(len(tok.encode(p, add_special_tokens=False)) == 1 for p in NUMBER_PIECES) / len(NUMBER_PIECES)
