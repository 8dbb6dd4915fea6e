"""Tokenizer loading: a hub id / local folder through transformers, a released SentencePiece
model run by sentencepiece itself, or a built-in byte tokenizer.

The byte tokenizer needs no download and no training, so tiny test models and freshly
initialised models work offline; real presets use their LLM's own tokenizer.

The released checkpoints ship a SentencePiece `tokenizer.model`. transformers' converted Llama
tokenizer does not give the same text for it: where a run of byte-fallback tokens is not valid
UTF-8 its decoder turns every byte into U+FFFD while SentencePiece keeps the valid ones (a
newline can vanish that way, and with it the `\n###` stop), it drops a leading space that came
from a byte token, and it encodes a text that starts with a space to fewer ids than
SentencePiece (no dummy prefix before the space). `SentencePieceTokenizer` has sentencepiece
itself encode and decode, so ids and text are the release's by construction.

Text is encoded by `text.encode_text` (plain text only, never control tokens).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from .files import UnsafePathError, check_regular_file, read_text

BUILTIN_BYTES = "builtin:bytes"
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, matching Llama's bos=1 / eos=2 convention


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + <pad>,<s>,</s>,<unk>: lossless for any UTF-8 text, vocab 260."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    vocab.update({ch: len(_SPECIALS) + i for i, ch in enumerate(byte_chars)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False)


def _byte_of(ch: str) -> int:
    # GPT-2's byte<->unicode map: printable bytes map to themselves, the rest to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    rest = [b for b in range(256) if b not in printable]
    return rest[ord(ch) - 256]


class SentencePieceTokenizer(SentencePieceBackend):
    """A Llama-family SentencePiece model whose ids and text come from sentencepiece itself.

    Encoding keeps SentencePiece's dummy prefix on every call (`legacy`), so a text that
    starts with a space gets the release's ids; decoding hands runs of ids to
    `SentencePieceProcessor.decode`, which keeps every valid byte of a byte-fallback run and
    removes only the dummy-prefix space of the first piece. Saved as `tokenizer.model` plus a
    `tokenizer_config.json` naming this class (see `load_tokenizer`).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        kwargs.update(legacy=True)
        kwargs.setdefault("special_tokens_pattern", "bos")  # encode(add_special_tokens=True): [BOS] text
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(vocab_file=vocab_file, **kwargs)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        size, out, run = self.sp_model.get_piece_size(), [], []
        for i in ids + [-1]:
            if 0 <= i < size:
                run.append(i)
                continue
            if run:  # a run of the model's own pieces: sentencepiece decodes it
                out.append(self.sp_model.decode(run))
                run = []
            if i >= size and i in self._added_tokens_decoder:  # tokens added on top of the model
                out.append(str(self._added_tokens_decoder[i]))
        return "".join(out)


def sentencepiece_tokenizer(model_file: str | Path) -> SentencePieceTokenizer:
    """The released `tokenizer.model` as a SentencePieceTokenizer (BOS/EOS/UNK from the model,
    pad = UNK as Llama has none); a file that is not a usable model is a ValueError."""
    import sentencepiece as spm

    model_file = Path(model_file)
    try:
        check_regular_file(model_file, "tokenizer.model")
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        specials = {name: sp.id_to_piece(i) for name, i in
                    (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())) if i >= 0}
        if len(specials) < 3:
            raise ValueError(f"it defines no {', '.join(sorted({'unk_token', 'bos_token', 'eos_token'} - set(specials)))}")
        return SentencePieceTokenizer(str(model_file), pad_token=specials["unk_token"], **specials)
    except (UnsafePathError, OSError) as e:
        raise ValueError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - sentencepiece raises plain RuntimeError for a damaged model
        raise ValueError(f"{model_file} is not a usable SentencePiece model ({' '.join(str(e).split())[:160]})") from e


def _saved_class(folder: Path) -> str | None:
    """The `tokenizer_class` a saved tokenizer folder names (None when it names none)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(read_text(path, "tokenizer_config.json", max_bytes=16 << 20))
    except (UnsafePathError, OSError, ValueError, RecursionError):
        return None  # AutoTokenizer reports it
    return data.get("tokenizer_class") if isinstance(data, dict) else None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer that has BOS/EOS and a pad token (Llama tokenizers ship without pad)."""
    if name_or_path == BUILTIN_BYTES:
        tok = byte_tokenizer()
    elif Path(str(name_or_path)).is_dir() and _saved_class(Path(name_or_path)) == SentencePieceTokenizer.__name__:
        tok = SentencePieceTokenizer.from_pretrained(str(name_or_path))
    else:
        tok = AutoTokenizer.from_pretrained(str(name_or_path) if Path(str(name_or_path)).exists() else name_or_path,
                                            trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} needs BOS and EOS tokens")
    return tok

