"""THE text encoder for everything a user or a data set wrote: plain text, never control tokens.

A tokenizer's `encode` matches added tokens (`</s>`, `<s>`, `<pad>`, `<unk>`, `<|im_end|>`, ...)
inside the text, so a prompt could end a turn or inject an end-of-sequence. Here only the
template places control tokens, by id; `encode_text` keeps their strings ordinary characters.

Imports neither torch nor transformers (it works on any tokenizer object handed to it), so the
templates and the config stay light.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class TextError(ValueError):
    """Text that cannot be encoded: lone surrogates (invalid UTF-8 decoded leniently)."""


def check_text(text: str, what: str = "text") -> str:
    """`text` if it is a str that is valid Unicode; raises TextError otherwise."""
    if not isinstance(text, str):
        raise TextError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TextError(f"{what} holds a lone surrogate at character {e.start} (it was decoded from "
                        "invalid UTF-8); send valid UTF-8 text") from None
    return text


def control_ids(tokenizer: Any) -> set[int]:
    """Ids that only a template may place: every special and added token except <unk>
    (which plain text legitimately produces for characters a vocabulary lacks)."""
    ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids.discard(tokenizer.unk_token_id)
    return ids


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as plain text: added/special token strings stay ordinary characters.

    A tokenizers-backed tokenizer runs its own pipeline (normalizer, pre-tokenizer, model)
    without the added-token pass, as transformers does for `split_special_tokens`; other
    tokenizers get `split_special_tokens=True`. Either way the ids are checked: a control
    id in the result is refused, never passed on.
    """
    check_text(text)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        splits = [normalized]
        if backend.pre_tokenizer is not None:
            splits = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        ids = [tok.id for piece in splits for tok in backend.model.tokenize(piece)]
    else:
        ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    _refuse_control(tokenizer, ids, text)
    return ids


def _refuse_control(tokenizer: Any, ids: Iterable[int], text: str) -> None:
    found = sorted(set(ids) & control_ids(tokenizer))
    if found:
        names = tokenizer.convert_ids_to_tokens(found)
        raise TextError(f"text {text[:40]!r} would encode to the control token(s) {names}; "
                        "this tokenizer cannot encode it as plain text")
