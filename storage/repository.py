"""Functions that take a session: save turns, add feedback, list and read for an owner.

The caller owns the session and the transaction (one per request)::

    with Session(store.engine) as s, s.begin():
        conv = create_conversation(s, owner, model_id="sphinx-tiny", model_version="1")
        save_turn(s, owner, conv.id, prompt="What is this?", answer="A cat.", images=[img])

Every read and write is scoped to an `Owner`: another owner's conversation, message or image
is reported as missing (`NotFound`), never as forbidden, so ids and content hashes cannot
be probed. An owner attaches only images they uploaded (`ImageStore.put(..., owner=)`).
Every value passes `values.py` first (no NUL, no lone surrogates, finite numbers, column
lengths), so SQLite and PostgreSQL accept and refuse the same inputs. All values travel as
bound parameters; nothing a user typed is formatted into SQL.
"""
from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from sphinx_model.conversation import Conversation, Message, Part, SchemaError

from .models import (
    MAX_OWNER_ID,
    MESSAGE_ROLES,
    OWNER_KINDS,
    RATINGS,
    ConversationRow,
    FeedbackEventRow,
    FeedbackRow,
    ImageOwnerRow,
    ImageRow,
    MessageImageRow,
    MessageRow,
    OwnedImage,
    utcnow,
)
from .values import clean_json, clean_number, clean_text

OwnerKind = Literal["session", "user"]
Rating = Literal["like", "dislike"]
MAX_TAGS = 32
MAX_TAG_LEN = 64


class NotFound(LookupError):
    """No such conversation or message for this owner."""


class _Unset(enum.Enum):
    UNSET = 0


UNSET = _Unset.UNSET  # "leave this feedback field as it is"


@dataclass(frozen=True)
class Owner:
    """Who may see a conversation: a browser session id or a logged-in user id."""

    kind: OwnerKind
    id: str

    def __post_init__(self) -> None:
        if self.kind not in OWNER_KINDS:
            raise ValueError(f"owner kind must be one of {OWNER_KINDS}")
        if not isinstance(self.id, str) or not 0 < len(self.id) <= MAX_OWNER_ID:
            raise ValueError(f"owner id must be 1..{MAX_OWNER_ID} characters")
        clean_text(self.id, "owner id")


_MAX_ROW_ID = 2**31 - 1  # `message.id` is a 32-bit integer on PostgreSQL


def _valid_conversation_id(conversation_id: Any) -> str:
    """Ids are at most 32 characters (uuid4 hex when we make them); anything else (a NUL, an
    object, a long string) is simply not found, on every backend, not a driver error on some."""
    try:
        return clean_text(conversation_id, "conversation id", 32) if conversation_id else _missing()
    except ValueError:
        raise NotFound("no such conversation") from None


def _missing() -> str:
    raise NotFound("no such conversation")


def _owned_conversation(session: Session, owner: Owner, conversation_id: str,
                        *, for_update: bool = False) -> ConversationRow:
    _valid_conversation_id(conversation_id)
    stmt = select(ConversationRow).where(
        ConversationRow.id == conversation_id,
        ConversationRow.owner_kind == owner.kind,
        ConversationRow.owner_id == owner.id,
    )
    if for_update:  # PostgreSQL: serialise appends to one conversation; SQLite ignores it
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFound("no such conversation")
    return row


def _owned_message(session: Session, owner: Owner, message_id: int,
                   *, for_update: bool = False) -> MessageRow:
    if isinstance(message_id, bool) or not isinstance(message_id, int) or not 0 < message_id <= _MAX_ROW_ID:
        raise NotFound("no such message")
    stmt = select(MessageRow).join(ConversationRow).where(
        MessageRow.id == message_id,
        ConversationRow.owner_kind == owner.kind,
        ConversationRow.owner_id == owner.id,
    )
    if for_update:  # PostgreSQL: one feedback change at a time per message; SQLite ignores it
        stmt = stmt.with_for_update(of=MessageRow)
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFound("no such message")
    return row


# --- conversations and messages --------------------------------------------------------
def create_conversation(session: Session, owner: Owner, *, model_id: str,
                        model_version: str = "") -> ConversationRow:
    clean_text(model_id, "model_id", 200)
    clean_text(model_version, "model_version", 100)
    row = ConversationRow(id=uuid.uuid4().hex, owner_kind=owner.kind, owner_id=owner.id,
                          model_id=model_id, model_version=model_version)
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class NewMessage:
    """A message to append (see `append_messages`)."""

    role: str
    text: str
    images: Sequence[ImageRow | OwnedImage | str] = ()  # rows from ImageStore.put, or their content hashes
    boxes: list[Any] | None = None
    settings: dict[str, Any] | None = None
    latency_ms: float | None = None
    stopped: bool = False  # generation was stopped by the user; `text` is partial
    interrupted: bool = False  # written ahead: the answer is not complete (yet)


def append_messages(session: Session, owner: Owner, conversation_id: str,
                    messages: Sequence[NewMessage]) -> list[MessageRow]:
    """Append messages at the next free positions (one ownership check, one flush).

    Every image must be one the owner uploaded; any other (another owner's, or none at all)
    is NotFound, exactly as a conversation of someone else's is."""
    for m in messages:
        if m.role not in MESSAGE_ROLES:
            raise ValueError(f"role must be one of {MESSAGE_ROLES}")
        clean_text(m.text, "message text")
        clean_json(m.boxes, "boxes")
        clean_json(m.settings, "settings")
        clean_number(m.latency_ms, "latency_ms")
    conv = _owned_conversation(session, owner, conversation_id, for_update=True)
    shas = owned_images(session, owner, [_sha(img) for m in messages for img in m.images])
    start = session.scalar(
        select(func.coalesce(func.max(MessageRow.position) + 1, 0))
        .where(MessageRow.conversation_id == conv.id))
    now = utcnow()
    rows = [MessageRow(conversation=conv, position=start + k, role=m.role, text=m.text,
                       boxes=m.boxes, settings=m.settings, latency_ms=m.latency_ms,
                       stopped=m.stopped, interrupted=m.interrupted, created_at=now,
                       images=[MessageImageRow(position=i, image_sha256=shas[_sha(img)])
                               for i, img in enumerate(m.images)])
            for k, m in enumerate(messages)]
    session.add_all(rows)
    conv.updated_at = now
    session.flush()
    return rows


def _sha(image: ImageRow | OwnedImage | str) -> str:
    return image.sha256 if isinstance(image, (ImageRow, OwnedImage)) else image


def owned_images(session: Session, owner: Owner, shas: Sequence[Any]) -> dict[str, str]:
    """{sha: sha} for content hashes the owner uploaded; NotFound if any is not one of theirs."""
    if not all(isinstance(s, str) for s in shas):
        raise NotFound("no such image")
    wanted = set(shas)
    if not wanted:
        return {}
    found = set(session.scalars(select(ImageOwnerRow.image_sha256).where(
        ImageOwnerRow.image_sha256.in_(wanted), ImageOwnerRow.owner_kind == owner.kind,
        ImageOwnerRow.owner_id == owner.id)))
    if found != wanted:
        raise NotFound(f"{len(wanted - found)} image(s) not found")
    return {s: s for s in found}


def get_image(session: Session, owner: Owner, sha256: str) -> OwnedImage:
    """A stored image the owner uploaded, as they see it; NotFound for any other hash."""
    owned_images(session, owner, [sha256])
    row = session.get(ImageRow, sha256)
    owned = session.get(ImageOwnerRow, (sha256, owner.kind, owner.id))
    if row is None or owned is None:
        raise NotFound("no such image")
    return OwnedImage.of(row, owned)


def add_message(session: Session, owner: Owner, conversation_id: str, role: str, text: str,
                *, images: Sequence[ImageRow | OwnedImage | str] = (), boxes: list[Any] | None = None,
                settings: dict[str, Any] | None = None,
                latency_ms: float | None = None, stopped: bool = False) -> MessageRow:
    """Append one message; its position is the next free one in the conversation."""
    (row,) = append_messages(session, owner, conversation_id,
                             [NewMessage(role, text, images, boxes, settings, latency_ms, stopped)])
    return row


def save_turn(session: Session, owner: Owner, conversation_id: str, *, prompt: str,
              answer: str, images: Sequence[ImageRow | OwnedImage | str] = (), boxes: list[Any] | None = None,
              settings: dict[str, Any] | None = None, latency_ms: float | None = None,
              stopped: bool = False) -> tuple[MessageRow, MessageRow]:
    """One exchange: the user's prompt (with its images) and the assistant's answer
    (`stopped`: the user stopped it, so the answer is partial)."""
    user, bot = append_messages(session, owner, conversation_id, [
        NewMessage("user", prompt, images),
        NewMessage("assistant", answer, boxes=boxes, settings=settings, latency_ms=latency_ms,
                   stopped=stopped)])
    return user, bot


def begin_turn(session: Session, owner: Owner, conversation_id: str, *, prompt: str,
               images: Sequence[ImageRow | OwnedImage | str] = (),
               settings: dict[str, Any] | None = None) -> tuple[MessageRow, MessageRow]:
    """Write a turn ahead, when its prompt is submitted: the user's message and an empty assistant
    message marked `interrupted` until `update_answer(..., interrupted=False)` completes it. If the
    app dies meanwhile, the prompt (and whatever answer was written) is what the store keeps."""
    user, bot = append_messages(session, owner, conversation_id, [
        NewMessage("user", prompt, images),
        NewMessage("assistant", "", settings=settings, interrupted=True)])
    return user, bot


def update_answer(session: Session, owner: Owner, message_id: int, *, text: str, interrupted: bool,
                  boxes: list[Any] | None | _Unset = UNSET, settings: dict[str, Any] | None | _Unset = UNSET,
                  latency_ms: float | None | _Unset = UNSET, stopped: bool | _Unset = UNSET) -> MessageRow:
    """Write an owner's assistant message's answer so far (`interrupted=True`) or complete it
    (`interrupted=False`, with its boxes, settings, latency and stopped flag). Fields left UNSET
    keep their value; NotFound for anyone else's message."""
    clean_text(text, "message text")
    if boxes is not UNSET:
        clean_json(boxes, "boxes")
    if settings is not UNSET:
        clean_json(settings, "settings")
    if latency_ms is not UNSET:
        clean_number(latency_ms, "latency_ms")
    msg = _owned_message(session, owner, message_id, for_update=True)
    if msg.role != "assistant":
        raise ValueError("only an assistant message holds an answer")
    msg.text, msg.interrupted = text, bool(interrupted)
    if boxes is not UNSET:
        msg.boxes = boxes
    if settings is not UNSET:
        msg.settings = settings
    if latency_ms is not UNSET:
        msg.latency_ms = latency_ms
    if stopped is not UNSET:
        msg.stopped = bool(stopped)
    msg.conversation.updated_at = utcnow()
    session.flush()
    return msg


def drop_unanswered(session: Session, owner: Owner, user_message_id: int, assistant_message_id: int) -> None:
    """Delete a turn written ahead (`begin_turn`) whose answer never completed (still
    `interrupted`): its request failed and the prompt went back to the user to send again.
    A completed turn, or anything not the owner's, is left alone (NotFound)."""
    bot = _owned_message(session, owner, assistant_message_id, for_update=True)
    user = _owned_message(session, owner, user_message_id)
    if bot.role != "assistant" or user.role != "user" or user.conversation_id != bot.conversation_id \
            or user.position != bot.position - 1 or not bot.interrupted:
        raise NotFound("no such unanswered turn")
    session.delete(bot)
    session.delete(user)
    session.flush()


def get_conversation(session: Session, owner: Owner, conversation_id: str) -> ConversationRow:
    """The conversation with its messages, images and feedback loaded; NotFound otherwise."""
    _valid_conversation_id(conversation_id)
    row = session.scalars(
        select(ConversationRow)
        .where(ConversationRow.id == conversation_id,
               ConversationRow.owner_kind == owner.kind,
               ConversationRow.owner_id == owner.id)
        .options(selectinload(ConversationRow.messages).selectinload(MessageRow.images),
                 selectinload(ConversationRow.messages).selectinload(MessageRow.feedback))
    ).one_or_none()
    if row is None:
        raise NotFound("no such conversation")
    return row


def list_conversations(session: Session, owner: Owner, *, limit: int = 50,
                       offset: int = 0) -> list[ConversationRow]:
    """The owner's conversations, most recently updated first."""
    return list(session.scalars(
        select(ConversationRow)
        .where(ConversationRow.owner_kind == owner.kind, ConversationRow.owner_id == owner.id)
        .order_by(ConversationRow.updated_at.desc(), ConversationRow.id)
        .limit(max(0, min(limit, 1000))).offset(max(0, min(offset, _MAX_ROW_ID)))))


def delete_conversation(session: Session, owner: Owner, conversation_id: str) -> None:
    """Delete a conversation with its messages and feedback (images stay; they are shared)."""
    session.delete(_owned_conversation(session, owner, conversation_id))
    session.flush()


# --- feedback --------------------------------------------------------------------------
def _clean_tags(tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str) or len(tags) > MAX_TAGS:
        raise ValueError(f"tags must be a list of at most {MAX_TAGS} strings")
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not 0 < len(t.strip()) <= MAX_TAG_LEN:
            raise ValueError(f"each tag must be 1..{MAX_TAG_LEN} characters")
        clean_text(t, "tag")
        if t.strip() not in out:
            out.append(t.strip())
    return out


def set_feedback(session: Session, owner: Owner, message_id: int, *,
                 rating: Rating | None | _Unset = UNSET, comment: str | _Unset = UNSET,
                 corrected: str | None | _Unset = UNSET,
                 tags: Sequence[str] | _Unset = UNSET) -> FeedbackRow:
    """Change the feedback on an assistant message; fields left UNSET keep their value.

    The latest change wins in `feedback`; every change is also appended to `feedback_event`.
    """
    if rating is not UNSET and rating is not None and rating not in RATINGS:
        raise ValueError(f"rating must be one of {RATINGS} or None")
    if comment is not UNSET:
        clean_text(comment, "comment")
    if corrected is not UNSET and corrected is not None:
        clean_text(corrected, "corrected answer")
    # Lock the message row: two first clicks at once would otherwise both insert the feedback
    # row on PostgreSQL (a unique-key violation, and a lost event); SQLite's BEGIN IMMEDIATE
    # already serialises writers.
    msg = _owned_message(session, owner, message_id, for_update=True)
    if msg.role != "assistant":
        raise ValueError("feedback applies to assistant messages")
    fb = session.get(FeedbackRow, msg.id)
    now = utcnow()
    if fb is None:
        fb = FeedbackRow(message_id=msg.id, rating=None, comment="", corrected=None, tags=[],
                         created_at=now)
        session.add(fb)
    if rating is not UNSET:
        fb.rating = rating
    if comment is not UNSET:
        fb.comment = comment
    if corrected is not UNSET:
        fb.corrected = corrected if corrected and corrected.strip() else None
    if tags is not UNSET:
        fb.tags = _clean_tags(tags)
    fb.updated_at = now
    session.add(FeedbackEventRow(message_id=msg.id, rating=fb.rating, comment=fb.comment,
                                 corrected=fb.corrected, tags=list(fb.tags), created_at=now))
    session.flush()
    return fb


def feedback_history(session: Session, owner: Owner, message_id: int) -> list[FeedbackEventRow]:
    """Every feedback change on a message, oldest first."""
    msg = _owned_message(session, owner, message_id)
    return list(session.scalars(
        select(FeedbackEventRow).where(FeedbackEventRow.message_id == msg.id)
        .order_by(FeedbackEventRow.id)))


# --- the conversation schema -------------------------------------------------------------
def message_to_schema(row: MessageRow,
                      image_ref: Callable[[ImageRow], str] | None = None) -> Message:
    """Images first (as SPHINX places them), then the text. `image_ref(ImageRow) -> str`
    chooses how images are referenced; the default is the content hash."""
    parts = [Part.of_image(image_ref(mi.image) if image_ref else mi.image_sha256)
             for mi in row.images]
    if row.text or not parts:
        parts.append(Part.of_text(row.text))
    return Message(row.role, tuple(parts))  # type: ignore[arg-type]


def to_conversation(row: ConversationRow) -> Conversation:
    """A stored conversation in the shared schema; image parts hold content hashes."""
    return Conversation(
        messages=[message_to_schema(m) for m in row.messages],
        id=row.id,
        meta={"model_id": row.model_id, "model_version": row.model_version},
    )


def save_conversation(session: Session, owner: Owner, conversation: Conversation, *,
                      model_id: str, model_version: str = "") -> ConversationRow:
    """Store a schema conversation; image parts must reference the owner's stored images by hash.

    Parts are stored as text plus ordered images, so within a message the images come
    first when read back (the order SPHINX uses).
    """
    refs = {r for r in conversation.image_refs}
    if None in refs:
        raise SchemaError("image parts must reference a stored image by its hash")
    owned_images(session, owner, list(refs))  # only the owner's own uploads, before anything is written
    conv = create_conversation(session, owner, model_id=model_id, model_version=model_version)
    append_messages(session, owner, conv.id, [
        NewMessage(m.role, m.text, [r for r in m.image_refs if r is not None])
        for m in conversation.messages])
    return conv
