"""Typed ORM rows of the store (SQLAlchemy 2.0 declarative style).

The rows mirror the conversation schema (`sphinx_model.conversation`) without depending on
it: a conversation has ordered messages, a message has a role, text and ordered image
references; images are stored once by content hash, and `image_owner` records who uploaded
each (an owner may attach only their own uploads). Feedback is the *current* verdict on
an assistant message (latest wins); every change is also appended to `feedback_event`, so
history is kept. Conversions to and from the schema live in `repository.py`.

Any change here needs a new Alembic revision in `migrations/versions/`; a test compares
these models with the migrated database.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

OWNER_KINDS = ("session", "user")
MESSAGE_ROLES = ("system", "user", "assistant")
RATINGS = ("like", "dislike")
IMAGE_FORMATS = ("jpeg", "png")  # what the image store re-encodes to
MAX_OWNER_ID = 128


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def start_of_day_utc(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no time zones: values are stored as naive UTC and come back tagged UTC;
    PostgreSQL stores `timestamptz`. Naive inputs are rejected, so local time never leaks in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; pass an aware (UTC) datetime")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ConversationRow(Base):
    """One dialogue, visible only to its owner (a browser session or a logged-in user)."""

    __tablename__ = "conversation"
    __table_args__ = (
        CheckConstraint(_in("owner_kind", OWNER_KINDS), name="owner_kind"),
        Index("ix_conversation_owner", "owner_kind", "owner_id", "updated_at"),
        Index("ix_conversation_updated_at", "updated_at"),  # export --since (revision 0002)
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex, unguessable
    owner_kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[str] = mapped_column(String(MAX_OWNER_ID))
    model_id: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    messages: Mapped[list[MessageRow]] = relationship(
        back_populates="conversation",
        order_by="MessageRow.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class StoredFileName:
    """The stored file's name of an image (`<sha256>.<ext>`), for anything with `sha256` and `format`."""

    sha256: str
    format: str

    @property
    def extension(self) -> str:
        return "jpg" if self.format == "jpeg" else self.format

    @property
    def filename(self) -> str:
        return f"{self.sha256}.{self.extension}"


class ImageRow(StoredFileName, Base):
    """An image stored once, by the SHA-256 of its re-encoded bytes (see `images.py`)."""

    __tablename__ = "image"
    __table_args__ = (CheckConstraint(_in("format", IMAGE_FORMATS), name="format"),)

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ImageOwnerRow(Base):
    """Who uploaded an image (revision 0004). Files are shared by content hash, but an owner may
    attach, and so read back, only images they uploaded themselves."""

    __tablename__ = "image_owner"
    __table_args__ = (
        CheckConstraint(_in("owner_kind", OWNER_KINDS), name="owner_kind"),
        Index("ix_image_owner_owner", "owner_kind", "owner_id"),
    )

    image_sha256: Mapped[str] = mapped_column(ForeignKey("image.sha256"), primary_key=True)
    owner_kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(MAX_OWNER_ID), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)  # this owner's first upload


@dataclass(frozen=True)
class OwnedImage(StoredFileName):
    """A stored image as one of its owners sees it: the shared file's facts, and `created_at` of
    this owner's own first upload, never the row's (that would tell a second uploader when
    someone else first stored the picture). What `ImageStore.put` and `get_image` hand back."""

    sha256: str
    size_bytes: int
    width: int
    height: int
    format: str
    created_at: datetime

    @classmethod
    def of(cls, row: ImageRow, owned: ImageOwnerRow) -> "OwnedImage":
        return cls(row.sha256, row.size_bytes, row.width, row.height, row.format, owned.created_at)


class MessageRow(Base):
    """One turn. `position` orders turns within the conversation (0, 1, 2, ...)."""

    __tablename__ = "message"
    __table_args__ = (
        UniqueConstraint("conversation_id", "position"),
        CheckConstraint(_in("role", MESSAGE_ROLES), name="role"),
        Index("ix_message_created_at", "created_at"),  # stats per day (revision 0002)
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversation.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text, default="")
    boxes: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)  # parsed regions
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # generation
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the user stopped generation: the text is a partial answer (revision 0003)
    stopped: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # written ahead, before its answer was complete (revision 0005): an assistant message stored
    # when the prompt was submitted and still true means the app died while it was written;
    # `text` holds what had been written by then
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    conversation: Mapped[ConversationRow] = relationship(back_populates="messages")
    images: Mapped[list[MessageImageRow]] = relationship(
        order_by="MessageImageRow.position", cascade="all, delete-orphan", passive_deletes=True)
    feedback: Mapped[FeedbackRow | None] = relationship(
        cascade="all, delete-orphan", passive_deletes=True)


class MessageImageRow(Base):
    """The ordered image references of a message."""

    __tablename__ = "message_image"

    message_id: Mapped[int] = mapped_column(
        ForeignKey("message.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_sha256: Mapped[str] = mapped_column(ForeignKey("image.sha256"), index=True)

    image: Mapped[ImageRow] = relationship(lazy="joined")


class FeedbackRow(Base):
    """The current feedback on an assistant message; each change also adds a FeedbackEventRow."""

    __tablename__ = "feedback"
    __table_args__ = (CheckConstraint(f"rating IS NULL OR {_in('rating', RATINGS)}",
                                      name="rating"),)

    message_id: Mapped[int] = mapped_column(
        ForeignKey("message.id", ondelete="CASCADE"), primary_key=True)
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    corrected: Mapped[str | None] = mapped_column(Text, nullable=True)  # the right answer
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FeedbackEventRow(Base):
    """Append-only history of feedback changes (revision 0002)."""

    __tablename__ = "feedback_event"
    __table_args__ = (CheckConstraint(f"rating IS NULL OR {_in('rating', RATINGS)}",
                                      name="rating"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(
        ForeignKey("message.id", ondelete="CASCADE"), index=True)
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    corrected: Mapped[str | None] = mapped_column(Text, nullable=True)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
