"""Usage figures for `python -m storage stats`: volume per day, like ratio, worst prompts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import Date, cast, func, select
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from .models import ConversationRow, FeedbackRow, MessageRow, start_of_day_utc


@dataclass
class DayCount:
    day: date
    conversations: int = 0
    messages: int = 0


@dataclass
class Stats:
    days: list[DayCount] = field(default_factory=list)
    conversations: int = 0
    messages: int = 0
    likes: int = 0
    dislikes: int = 0
    most_disliked: list[tuple[str, int]] = field(default_factory=list)  # (prompt, dislikes)

    @property
    def like_ratio(self) -> float | None:
        rated = self.likes + self.dislikes
        return self.likes / rated if rated else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["days"] = [{**asdict(x), "day": x.day.isoformat()} for x in self.days]
        d["like_ratio"] = self.like_ratio
        d["most_disliked"] = [{"prompt": p, "dislikes": n} for p, n in self.most_disliked]
        return d


def _day(column: Any, dialect: str) -> ColumnElement[Any]:
    """The UTC calendar day of a timestamp column, per backend."""
    if dialect == "sqlite":
        return func.date(column)  # stored as naive UTC text
    if dialect == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return cast(column, Date)


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def collect_stats(session: Session, *, since: date | None = None, top: int = 10) -> Stats:
    dialect = session.get_bind().dialect.name
    since_dt = None if since is None else start_of_day_utc(since)
    stats = Stats()
    days: dict[date, DayCount] = {}

    for model, attr in ((ConversationRow, "conversations"), (MessageRow, "messages")):
        day = _day(model.created_at, dialect).label("day")
        stmt = select(day, func.count()).group_by(day)
        if since_dt is not None:
            stmt = stmt.where(model.created_at >= since_dt)
        for value, n in session.execute(stmt):
            d = _as_date(value)
            setattr(days.setdefault(d, DayCount(d)), attr, n)
            setattr(stats, attr, getattr(stats, attr) + n)
    stats.days = [days[d] for d in sorted(days)]

    rated = (select(FeedbackRow.rating, func.count())
             .join(MessageRow, MessageRow.id == FeedbackRow.message_id)
             .where(FeedbackRow.rating.is_not(None)).group_by(FeedbackRow.rating))
    if since_dt is not None:
        rated = rated.where(MessageRow.created_at >= since_dt)
    counts: dict[str, int] = {r: n for r, n in session.execute(rated)}
    stats.likes, stats.dislikes = counts.get("like", 0), counts.get("dislike", 0)

    prompt, answer = aliased(MessageRow), aliased(MessageRow)
    worst = (select(prompt.text, func.count().label("n"))
             .select_from(answer)
             .join(FeedbackRow, FeedbackRow.message_id == answer.id)
             .join(prompt, (prompt.conversation_id == answer.conversation_id)
                   & (prompt.position == answer.position - 1) & (prompt.role == "user"))
             .where(FeedbackRow.rating == "dislike")
             .group_by(prompt.text).order_by(func.count().desc(), prompt.text).limit(top))
    if since_dt is not None:
        worst = worst.where(answer.created_at >= since_dt)
    stats.most_disliked = [(text, n) for text, n in session.execute(worst)]
    return stats


def _cell(text: str, width: int = 80) -> str:
    one_line = " ".join(text.split()).replace("|", "\\|")
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def format_stats(stats: Stats) -> str:
    ratio = "n/a" if stats.like_ratio is None else f"{stats.like_ratio:.1%}"
    lines = [f"conversations: {stats.conversations}   messages: {stats.messages}   "
             f"likes: {stats.likes}   dislikes: {stats.dislikes}   like ratio: {ratio}", "",
             "| day | conversations | messages |", "|---|---:|---:|"]
    lines += [f"| {d.day.isoformat()} | {d.conversations} | {d.messages} |" for d in stats.days]
    lines += ["", "| most disliked prompt | dislikes |", "|---|---:|"]
    lines += [f"| {_cell(p)} | {n} |" for p, n in stats.most_disliked]
    return "\n".join(lines)
