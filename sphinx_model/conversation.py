"""THE message schema, shared by inference, training data, the store and the UI.

Torch-free on purpose: `storage` and the data converters import it without pulling in
the model. A conversation is a list of messages; a message is a role plus ordered parts
(text or image). Images are *references* (a path or a content hash) so the schema stays
JSON-serialisable; at inference the pixel data is passed alongside, in the order the
image parts appear.

On disk (the training-data schema of `train/` and the export of `storage/`) a sample is
one JSON object per line::

    {"id": "coco-123", "task": "detection",
     "messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/1.jpg"},
                                               {"type": "text", "text": "Detect ..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}

`content` may also be a plain string (text only). The LLaVA schema
(`{"image": ..., "conversations": [{"from": "human"|"gpt", "value": ...}]}`) is read by
`Conversation.from_llava`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
IMAGE_MARKER = "<image>"  # LLaVA's placeholder; stripped, the (one) image sits after BOS

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


class SchemaError(ValueError):
    """A sample or message that does not fit the conversation schema."""


@dataclass(frozen=True)
class Part:
    """One piece of a message: text, or a reference to an image."""

    type: Literal["text", "image"]
    text: str = ""
    image: str | None = None  # path (relative to an image root) or content hash

    @staticmethod
    def of_text(text: str) -> "Part":
        return Part(type="text", text=text)

    @staticmethod
    def of_image(ref: str | None = None) -> "Part":
        return Part(type="image", image=ref)

    def to_dict(self) -> dict[str, Any]:
        if self.type == "text":
            return {"type": "text", "text": self.text}
        return {"type": "image", "image": self.image}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Part":
        kind = d.get("type")
        if kind == "text":
            text = d.get("text")
            if not isinstance(text, str):
                raise SchemaError(f"text part needs a string 'text', got {type(text).__name__}")
            return Part.of_text(text)
        if kind == "image":
            ref = d.get("image")
            if ref is not None and not isinstance(ref, str):
                raise SchemaError("image part's 'image' must be a string reference or null")
            return Part.of_image(ref)
        raise SchemaError(f"unknown part type {kind!r} (expected 'text' or 'image')")


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise SchemaError(f"unknown role {self.role!r} (expected one of {ROLES})")

    @staticmethod
    def user(text: str = "", image: str | None | bool = False) -> "Message":
        """A user turn; `image=True` (or a reference) puts an image part before the text."""
        parts: list[Part] = []
        if image is not False:
            parts.append(Part.of_image(None if image is True else image))
        if text:
            parts.append(Part.of_text(text))
        return Message("user", tuple(parts))

    @staticmethod
    def assistant(text: str) -> "Message":
        return Message("assistant", (Part.of_text(text),))

    @staticmethod
    def system(text: str) -> "Message":
        return Message("system", (Part.of_text(text),))

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if p.type == "text")

    @property
    def image_refs(self) -> list[str | None]:
        return [p.image for p in self.parts if p.type == "image"]

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": [p.to_dict() for p in self.parts]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Message":
        if not isinstance(d, dict) or "role" not in d:
            raise SchemaError("a message is an object with 'role' and 'content'")
        content = d.get("content", [])
        if isinstance(content, str):
            parts: tuple[Part, ...] = (Part.of_text(content),)
        elif isinstance(content, list):
            parts = tuple(Part.from_dict(p) for p in content)
        else:
            raise SchemaError("'content' must be a string or a list of parts")
        return Message(d["role"], parts)


@dataclass
class Conversation:
    """An ordered dialogue. Images in order of appearance; how many a model takes is its
    config's `max_images` (the processor checks it), not the schema's business."""

    messages: list[Message] = field(default_factory=list)
    id: str | None = None
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # --- queries -------------------------------------------------------------------
    @property
    def image_refs(self) -> list[str | None]:
        return [ref for m in self.messages for ref in m.image_refs]

    @property
    def has_image(self) -> bool:
        return bool(self.image_refs)

    def validate(self, for_training: bool = False) -> None:
        """Raise SchemaError if the dialogue cannot be rendered.

        Rules: user/assistant alternate after an optional leading system message, the
        first non-system turn is the user's, and (for training) the dialogue ends with a
        non-empty assistant turn.
        """
        turns = [m for m in self.messages if m.role != "system"]
        if any(m.role == "system" for m in self.messages[1:]):
            raise SchemaError("a system message may only come first")
        if not turns:
            raise SchemaError("empty dialogue")
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise SchemaError(f"turn {i} is {m.role!r}, expected {expected!r} (turns alternate)")
        if for_training:
            if turns[-1].role != "assistant" or not turns[-1].text.strip():
                raise SchemaError("a training dialogue must end with a non-empty assistant turn")

    # --- building --------------------------------------------------------------------
    def append(self, message: Message) -> "Conversation":
        self.messages.append(message)
        return self

    # --- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"messages": [m.to_dict() for m in self.messages]}
        if self.id is not None:
            d["id"] = self.id
        if self.task is not None:
            d["task"] = self.task
        if self.meta:
            d["meta"] = self.meta
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Conversation":
        """Read our schema, or the LLaVA schema when `conversations` is present."""
        if not isinstance(d, dict):
            raise SchemaError("a sample is a JSON object")
        if "conversations" in d:
            return Conversation.from_llava(d)
        msgs = d.get("messages")
        if not isinstance(msgs, list):
            raise SchemaError("a sample needs a 'messages' list")
        return Conversation(
            messages=[Message.from_dict(m) for m in msgs],
            id=None if d.get("id") is None else str(d["id"]),
            task=d.get("task"),
            meta=dict(d.get("meta") or {}),
        )

    @staticmethod
    def from_llava(d: dict[str, Any]) -> "Conversation":
        turns = d.get("conversations")
        if not isinstance(turns, list):
            raise SchemaError("LLaVA sample needs a 'conversations' list")
        image = d.get("image")
        messages: list[Message] = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise SchemaError("each LLaVA turn is an object with 'from' and 'value'")
            role = _LLAVA_ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise SchemaError(f"unknown LLaVA speaker {t.get('from')!r}")
            value = t.get("value")
            if not isinstance(value, str):
                raise SchemaError("LLaVA turn 'value' must be a string")
            text = value.replace(IMAGE_MARKER, "").strip("\n") if image else value
            parts: list[Part] = []
            if image and i == 0:
                parts.append(Part.of_image(str(image)))
            parts.append(Part.of_text(text))
            messages.append(Message(role, tuple(parts)))  # type: ignore[arg-type]
        return Conversation(messages=messages, id=None if d.get("id") is None else str(d["id"]))

    def to_llava(self) -> dict[str, Any]:
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        out: dict[str, Any] = {"conversations": []}
        refs = self.image_refs
        if refs and refs[0]:
            out["image"] = refs[0]
        for m in self.messages:
            value = (IMAGE_MARKER + "\n" if m.image_refs else "") + m.text
            out["conversations"].append({"from": names[m.role], "value": value})
        if self.id is not None:
            out["id"] = self.id
        return out


def read_jsonl(path: str | Path) -> Iterator[Conversation]:
    """Yield conversations from a JSONL file (our schema or LLaVA's), one per line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Conversation.from_dict(json.loads(line))
            except (json.JSONDecodeError, SchemaError) as e:
                raise SchemaError(f"{path}:{lineno}: {e}") from e


def write_jsonl(path: str | Path, conversations: Iterable[Conversation]) -> int:
    """Write conversations as JSONL; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps(conv.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n
