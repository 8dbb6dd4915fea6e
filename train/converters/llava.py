"""LLaVA instruction data (also ShareGPT4V, LVIS-Instruct4V, LLaVAR: same layout).

Input: a JSON list (or JSONL) of `{"id", "image"?, "conversations": [{"from": "human"|"gpt",
"value"}]}`; `<image>` markers are dropped (the image always sits after BOS).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sphinx_model.conversation import Conversation, Message, Part, SchemaError

from .base import CommonOptions, NoOptions, Stats, iter_records, record_key, register


@register("llava", task="llava")
def convert_llava(source: Path, common: CommonOptions, options: NoOptions, stats: Stats) -> Iterator[Conversation]:
    """LLaVA instruct JSON/JSONL -> dialogues (image refs get --image-prefix)."""
    for n, rec in enumerate(iter_records(source, stats)):
        if not isinstance(rec, dict) or (rec.get("id") is not None and record_key(rec["id"]) is None):
            stats.skip("malformed record")
            continue
        try:
            conv = Conversation.from_llava(rec)
        except SchemaError:
            stats.skip("malformed record")
            continue
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            stats.skip("malformed record")
            continue
        if image:
            ref = common.image_ref(image)
            if common.image_missing(ref):
                stats.skip("missing image")
                continue
            conv.messages = [_with_image(m, ref) for m in conv.messages]
        if any(m.role == "assistant" and not m.text.strip() for m in conv.messages):
            stats.skip("empty answer")
            continue
        conv.id = conv.id if conv.id is not None else f"llava-{n}"
        yield conv


def _with_image(message: Message, ref: str) -> Message:
    parts = tuple(Part.of_image(ref) if p.type == "image" else p for p in message.parts)
    return Message(message.role, parts)
