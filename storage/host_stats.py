"""What the app's host sees (the host's panel): answers and their feedback per UTC day and model
version, and the latest corrections beside the answers they replace. Read-only queries."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, aliased

from .models import ConversationRow, FeedbackRow, MessageRow
from .stats import _as_date, _day


@dataclass(frozen=True)
class DayVersion:
    day: date
    model_version: str
    conversations: int
    turns: int          # answers given
    likes: int
    dislikes: int
    corrections: int


@dataclass(frozen=True)
class Correction:
    at: datetime
    model_version: str
    question: str
    answer: str         # the model's answer, as stored
    corrected: str      # what the user says it should have been


def per_day_and_version(session: Session) -> list[DayVersion]:
    """One row per (UTC day of the answer, model version), oldest first."""
    dialect = session.get_bind().dialect.name
    day = _day(MessageRow.created_at, dialect).label("day")
    stmt = (select(day, ConversationRow.model_version,
                   func.count(func.distinct(MessageRow.conversation_id)), func.count(MessageRow.id),
                   func.sum(case((FeedbackRow.rating == "like", 1), else_=0)),
                   func.sum(case((FeedbackRow.rating == "dislike", 1), else_=0)),
                   func.sum(case((FeedbackRow.corrected.is_not(None), 1), else_=0)))
            .select_from(MessageRow)
            .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
            .outerjoin(FeedbackRow, FeedbackRow.message_id == MessageRow.id)
            .where(MessageRow.role == "assistant")
            .group_by(day, ConversationRow.model_version)
            .order_by(day, ConversationRow.model_version))
    return [DayVersion(_as_date(d), v or "", int(c), int(t), int(lk or 0), int(dk or 0), int(cr or 0))
            for d, v, c, t, lk, dk, cr in session.execute(stmt)]


def latest_corrections(session: Session, limit: int = 20) -> list[Correction]:
    """The newest corrected answers, each with its question and the answer it replaces."""
    prompt, answer = aliased(MessageRow), aliased(MessageRow)
    stmt = (select(FeedbackRow.updated_at, ConversationRow.model_version, prompt.text, answer.text,
                   FeedbackRow.corrected)
            .select_from(FeedbackRow)
            .join(answer, answer.id == FeedbackRow.message_id)
            .join(ConversationRow, ConversationRow.id == answer.conversation_id)
            .outerjoin(prompt, (prompt.conversation_id == answer.conversation_id)
                       & (prompt.position == answer.position - 1) & (prompt.role == "user"))
            .where(FeedbackRow.corrected.is_not(None))
            .order_by(FeedbackRow.updated_at.desc(), FeedbackRow.message_id.desc())
            .limit(limit))
    return [Correction(at, v or "", q or "", a, c) for at, v, q, a, c in session.execute(stmt)]
