"""History: the owner's own earlier conversations, reopened (with their images) or deleted."""
from __future__ import annotations

from typing import Any

from ..records import HistoryItem, forget, history, load_turns
from .chat import ChatState, from_history
from ..validation import conversation_id as conversation_id_of
from .common import AppContext, UserError, owner_of


def listing(ctx: AppContext, owner_key: str) -> list[HistoryItem]:
    return history(ctx.store, owner_of(owner_key))


def choices(items: list[HistoryItem]) -> list[tuple[str, str]]:
    """(label, conversation id) pairs for a dropdown."""
    return [(it.label, it.conversation_id) for it in items]


def reopen(ctx: AppContext, owner_key: str, conversation_id: Any) -> ChatState:
    """The conversation as a Chat state: continue it and new turns join the same stored conversation."""
    conversation_id = _picked(conversation_id)
    turns = load_turns(ctx.store, owner_of(owner_key), conversation_id)
    return from_history(ctx, conversation_id, turns)


def delete(ctx: AppContext, owner_key: str, conversation_id: Any) -> list[HistoryItem]:
    conversation_id = _picked(conversation_id)
    owner = owner_of(owner_key)
    forget(ctx.store, owner, conversation_id)
    return history(ctx.store, owner)


def _picked(value: Any) -> str:
    """The conversation picked in the list (`validation.conversation_id`; empty: none picked)."""
    picked = conversation_id_of(value)
    if not picked:
        raise UserError("pick a conversation first")
    return picked
