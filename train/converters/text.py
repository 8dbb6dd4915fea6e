"""Text-only dialogues (SPHINX-X's language data), JSON list or JSONL, form told per record.

Recognised record structures:
  * ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}`
  * UltraChat 200k: `{"messages": [{"role": "user"|"assistant"|"system", "content"}]}`
  * UltraChat: `{"data": [q1, a1, q2, a2, ...]}`
  * single-turn instruction sets: OpenOrca `{"system_prompt"?, "question", "response"}`,
    MetaMath `{"query", "response"}`, Alpaca-style (MathInstruct, WizardCoder)
    `{"instruction", "input"?, "output"}`.
Leading assistant turns and a trailing unanswered user turn are dropped (common in
ShareGPT dumps); dialogues whose turns still do not alternate are skipped.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sphinx_model.conversation import Conversation, Message, Part

from .base import CommonOptions, NoOptions, Stats, iter_records, record_key, register

SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
            "system": "system"}
# (question key, answer key) of single-turn forms, tried in order
SINGLE_TURN: tuple[tuple[str, str], ...] = (("question", "response"), ("query", "response"),
                                            ("instruction", "output"), ("instruction", "response"))


class _Bad(Exception):
    """A record that cannot be read; the message is the skip reason."""


@register("text", task="text")
def convert_text(source: Path, common: CommonOptions, options: NoOptions, stats: Stats) -> Iterator[Conversation]:
    """ShareGPT / UltraChat / single-turn instruction JSON(L) -> text-only dialogues."""
    for n, rec in enumerate(iter_records(source, stats)):
        try:
            turns = _turns(rec)
        except _Bad as e:
            stats.skip(str(e))
            continue
        turns = _trim(turns)
        if not turns:
            stats.skip("no answered turn")
            continue
        if any(role == "assistant" and not text.strip() for role, text in turns):
            stats.skip("empty answer")
            continue
        rid = rec.get("id", rec.get("prompt_id"))
        if rid is not None and record_key(rid) is None:
            stats.skip("malformed id")
            continue
        yield Conversation(messages=[Message(role, (Part.of_text(text),)) for role, text in turns],  # type: ignore[arg-type]
                           id=f"text-{n}" if rid is None else str(rid))


def _turns(rec: Any) -> list[tuple[str, str]]:
    """(role, text) pairs of one record, whatever its form."""
    if not isinstance(rec, dict):
        raise _Bad("malformed record")
    if isinstance(rec.get("conversations"), list):
        return [_turn(t, "from", "value") for t in rec["conversations"]]
    if isinstance(rec.get("messages"), list):
        return [_turn(t, "role", "content") for t in rec["messages"]]
    if isinstance(rec.get("data"), list):
        if not all(isinstance(t, str) for t in rec["data"]):
            raise _Bad("malformed record")
        return [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(rec["data"])]
    for q_key, a_key in SINGLE_TURN:
        if isinstance(rec.get(q_key), str) and isinstance(rec.get(a_key), str):
            question = rec[q_key]
            if isinstance(rec.get("input"), str) and rec["input"].strip():
                question = f"{question}\n\n{rec['input']}"
            system = rec.get("system_prompt")
            head = [("system", system)] if isinstance(system, str) and system.strip() else []
            return head + [("user", question), ("assistant", rec[a_key])]
    raise _Bad("unrecognised record")


def _turn(t: Any, role_key: str, text_key: str) -> tuple[str, str]:
    if not isinstance(t, dict) or not isinstance(t.get(text_key), str):
        raise _Bad("malformed record")
    role = SPEAKERS.get(str(t.get(role_key, "")).lower())
    if role is None:
        raise _Bad("unknown speaker")
    return role, t[text_key]


def _trim(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop assistant turns before the first user turn, and trailing user turns."""
    system = [t for t in turns[:1] if t[0] == "system"]
    body = turns[len(system):]
    while body and body[0][0] == "assistant":
        body = body[1:]
    while body and body[-1][0] != "assistant":
        body = body[:-1]
    return system + body if body else []
