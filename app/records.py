"""The app's use of the store: images, turns, feedback and history, always for one owner.

Every function opens its own short transaction (one per request), so a failing request
never leaves half a turn behind and never rolls back an earlier one. Owners are either a
browser (`session`, a random id kept in the browser across reloads), a Hugging Face login
(`user`, on a Space) or an API client (`session`, prefixed `api:`). Nothing here takes an
owner from the client as a parameter of an API endpoint; see `ui.py`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from storage import (
    UNSET,
    ImageRejected,
    NotFound,
    Owner,
    Store,
    begin_turn,
    create_conversation,
    delete_conversation,
    drop_unanswered,
    get_conversation,
    list_conversations,
    save_turn,
    set_feedback,
    update_answer,
)
from storage.models import ImageRow, OwnedImage

from .served import shown_copy
from .service import ModelInfo

TITLE_CHARS = 60


class RecordError(ValueError):
    """A store operation the user asked for that cannot be done (one line)."""


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    path: Path       # the sanitised copy in the image store (EXIF applied, metadata dropped): read, never served
    width: int
    height: int
    shown: Path | None = None   # the owner's own copy, the only path of it a page is given (served.py)


@dataclass(frozen=True)
class SavedTurn:
    conversation_id: str
    user_message_id: int
    assistant_message_id: int


@dataclass
class StoredTurn:
    """One exchange read back from the store (what History reopens)."""

    prompt: str
    images: list[StoredImage]
    answer: str
    assistant_message_id: int
    stopped: bool
    rating: str | None = None
    corrected: str | None = None
    interrupted: bool = False     # written ahead; the app stopped before the answer was complete


@dataclass(frozen=True)
class HistoryItem:
    conversation_id: str
    title: str
    updated_at: datetime
    turns: int
    model_id: str
    task: str = "chat"       # what made it: chat, or a tab (grounding, detection, som, ocr, spotting)
    interrupted: bool = False  # an answer the app never finished (it stopped mid-answer)

    @property
    def label(self) -> str:
        kind = "" if self.task == "chat" else f"[{self.task}] "
        note = " · interrupted" if self.interrupted else ""
        return f"{self.updated_at:%Y-%m-%d %H:%M} · {kind}{self.title} ({self.turns} turn{'s' * (self.turns != 1)}){note}"


@dataclass
class TurnRecord:
    """What a handler hands over to be stored for one exchange."""

    prompt: str
    answer: str
    images: Sequence[str] = ()                 # sha256 of images stored with `put_image`
    regions: list[dict[str, Any]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    stopped: bool = False


def put_image(store: Store, owner: Owner, data: bytes) -> StoredImage:
    """Keep an upload (sanitised, content-addressed); RecordError if it is not an image we take."""
    try:
        with Session(store.engine) as s, s.begin():
            row = store.images.put(s, data, owner=owner)   # the owner may attach it from now on
        return _stored(store, row, owner)
    except ImageRejected as e:
        raise RecordError(str(e)) from e


def _stored(store: Store, row: ImageRow | OwnedImage, owner: Owner) -> StoredImage:
    path = store.images.path(row)
    return StoredImage(row.sha256, path, row.width, row.height, shown_copy(store, owner, row.sha256, path))


def save_exchange(store: Store, owner: Owner, conversation_id: str | None, model: ModelInfo,
                  turn: TurnRecord) -> SavedTurn:
    """Store one exchange (creating the conversation on its first turn)."""
    with Session(store.engine) as s, s.begin():
        if conversation_id is None:
            conversation_id = create_conversation(s, owner, model_id=model.model_id[:200],
                                                  model_version=model.version[:100]).id
        images = [s.get(ImageRow, sha) for sha in turn.images]
        if any(im is None for im in images):
            raise RecordError("an image of this turn is no longer in the store")
        settings = {**turn.settings, "model_id": model.model_id, "model_version": model.version}
        try:
            user, bot = save_turn(s, owner, conversation_id, prompt=turn.prompt, answer=turn.answer,
                                  images=images, boxes=turn.regions, settings=settings,
                                  latency_ms=turn.latency_ms, stopped=turn.stopped)
        except NotFound as e:   # the conversation, or an image, is not the owner's
            raise RecordError(f"not in your history: {e}") from e
        except ValueError as e:  # a value no backend stores (storage.values): a message, not a traceback
            raise RecordError(f"this exchange cannot be stored: {e}") from e
        return SavedTurn(conversation_id, user.id, bot.id)


def begin_exchange(store: Store, owner: Owner, conversation_id: str | None, model: ModelInfo,
                   prompt: str, images: Sequence[str], settings: dict[str, Any]) -> SavedTurn:
    """Write a turn ahead, as its prompt is submitted (creating the conversation on its first
    turn): the prompt and its images are stored before the model runs, the answer follows
    (`write_answer`, `finish_exchange`). RecordError (one line) if it cannot be stored."""
    with Session(store.engine) as s, s.begin():
        if conversation_id is None:
            conversation_id = create_conversation(s, owner, model_id=model.model_id[:200],
                                                  model_version=model.version[:100]).id
        rows = [s.get(ImageRow, sha) for sha in images]
        if any(im is None for im in rows):
            raise RecordError("an image of this turn is no longer in the store")
        try:
            user, bot = begin_turn(s, owner, conversation_id, prompt=prompt, images=rows,
                                   settings={**settings, "model_id": model.model_id, "model_version": model.version})
        except NotFound as e:
            raise RecordError(f"not in your history: {e}") from e
        except ValueError as e:
            raise RecordError(f"this prompt cannot be stored: {e}") from e
        return SavedTurn(conversation_id, user.id, bot.id)


def write_answer(store: Store, owner: Owner, message_id: int, text: str) -> None:
    """The answer written so far of a turn written ahead (it stays marked interrupted)."""
    _update(store, owner, message_id, text=text, interrupted=True)


def finish_exchange(store: Store, owner: Owner, message_id: int, model: ModelInfo, turn: TurnRecord) -> None:
    """Complete a turn written ahead with its answer, regions, settings and latency."""
    _update(store, owner, message_id, text=turn.answer, interrupted=False, boxes=turn.regions,
            settings={**turn.settings, "model_id": model.model_id, "model_version": model.version},
            latency_ms=turn.latency_ms, stopped=turn.stopped)


def discard_exchange(store: Store, owner: Owner, saved: SavedTurn) -> None:
    """Remove a turn written ahead whose request failed (its prompt goes back to the user's
    input box instead)."""
    with Session(store.engine) as s, s.begin():
        try:
            drop_unanswered(s, owner, saved.user_message_id, saved.assistant_message_id)
        except NotFound as e:
            raise RecordError("this turn is not in your history") from e


def _update(store: Store, owner: Owner, message_id: int, **fields: Any) -> None:
    try:
        with Session(store.engine) as s, s.begin():
            update_answer(s, owner, message_id, **fields)
    except NotFound as e:
        raise RecordError("this answer is not in your history") from e
    except ValueError as e:
        raise RecordError(f"this exchange cannot be stored: {e}") from e


def record_feedback(store: Store, owner: Owner, message_id: int, *, rating: Any = UNSET,
                    comment: Any = UNSET, corrected: Any = UNSET) -> None:
    """One feedback event on an answer; fields left UNSET keep their value (`rating=None` clears)."""
    if rating is UNSET and comment is UNSET and corrected is UNSET:
        raise RecordError("nothing to record: rate the answer, write a comment or a corrected answer")
    try:
        with Session(store.engine) as s, s.begin():
            set_feedback(s, owner, message_id, rating=rating, comment=comment, corrected=corrected)
    except NotFound as e:
        raise RecordError("this answer is not in your history") from e
    except ValueError as e:
        raise RecordError(str(e)) from e


def history(store: Store, owner: Owner, limit: int = 100) -> list[HistoryItem]:
    """The owner's conversations, newest first, titled by their first prompt."""
    with Session(store.engine) as s:
        out = []
        for row in list_conversations(s, owner, limit=limit):
            users = [m for m in row.messages if m.role == "user"]
            title = next((m.text for m in users if m.text.strip()), "(image only)").strip().splitlines()[0]
            if len(title) > TITLE_CHARS:
                title = title[: TITLE_CHARS - 1] + "…"
            answers = [m for m in row.messages if m.role == "assistant"]
            task = str((answers[0].settings or {}).get("task", "chat")) if answers else "chat"
            out.append(HistoryItem(row.id, title, row.updated_at, len(users), row.model_id, task,
                                   any(m.interrupted for m in answers)))
        return out


def load_turns(store: Store, owner: Owner, conversation_id: str) -> list[StoredTurn]:
    """The exchanges of one of the owner's conversations; RecordError for anyone else's."""
    with Session(store.engine) as s:
        try:
            row = get_conversation(s, owner, conversation_id)
        except NotFound as e:
            raise RecordError("no such conversation in your history") from e
        turns: list[StoredTurn] = []
        pending: tuple[str, list[StoredImage]] | None = None
        for m in row.messages:
            if m.role == "user":
                pending = (m.text, [_stored(store, mi.image, owner) for mi in m.images])
            elif m.role == "assistant" and pending is not None:
                fb = m.feedback
                turns.append(StoredTurn(pending[0], pending[1], m.text, m.id, bool(m.stopped),
                                        fb.rating if fb else None, fb.corrected if fb else None,
                                        bool(m.interrupted)))
                pending = None
        return turns


def forget(store: Store, owner: Owner, conversation_id: str) -> None:
    """Delete one of the owner's conversations (RecordError for anyone else's)."""
    try:
        with Session(store.engine) as s, s.begin():
            delete_conversation(s, owner, conversation_id)
    except NotFound as e:
        raise RecordError("no such conversation in your history") from e
