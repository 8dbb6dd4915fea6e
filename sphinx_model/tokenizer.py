"""Tokenizer loading: a hub id / local folder through transformers, or a built-in byte tokenizer.

The byte tokenizer needs no download and no training, so tiny test models and freshly
initialised models work offline; real presets use their LLM's own tokenizer.
Text is encoded by `text.encode_text` (plain text only, never control tokens).
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer that has BOS/EOS and a pad token (Llama tokenizers ship without pad)."""
    if name_or_path == BUILTIN_BYTES:
        tok = byte_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(str(name_or_path) if Path(str(name_or_path)).exists() else name_or_path,
                                            trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} needs BOS and EOS tokens")
    return tok

