"""Alembic: from empty, from the previous revision with data in it, down and up again, and
several processes starting at once."""
from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from storage.db import (
    create_engine_for,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
)
from storage.models import Base
from storage.repository import NotFound, Owner, feedback_history, get_conversation, get_image, set_feedback

OWNER = Owner("user", "legacy")
TABLES_0001 = {"conversation", "message", "image", "message_image", "feedback"}


def _schema_diff(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def test_upgrade_from_empty_matches_the_models(db_url: str) -> None:
    engine = create_engine_for(db_url)
    assert current_revision(engine) is None
    upgrade(engine)
    upgrade(engine)  # idempotent: the app upgrades on every start
    assert current_revision(engine) == head_revision()
    assert _schema_diff(engine) == []  # models and migrations tell the same story
    engine.dispose()


def _fill_revision_1(engine) -> None:
    """Rows as an app on revision 0001 wrote them (raw SQL: the models are newer)."""
    t = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
    if engine.dialect.name == "sqlite":
        t = t.replace(tzinfo=None)
    with engine.begin() as c:
        c.execute(text("INSERT INTO conversation (id, owner_kind, owner_id, model_id, "
                       "model_version, created_at, updated_at) VALUES "
                       "('c1', 'user', 'legacy', 'sphinx-tiny', 'v0', :t, :t)"), {"t": t})
        c.execute(text("INSERT INTO image (sha256, size_bytes, width, height, format, created_at)"
                       " VALUES (:sha, 10, 4, 3, 'png', :t)"), {"sha": "ab" * 32, "t": t})
        for i, (role, body) in enumerate([("user", "old question"), ("assistant", "old answer")]):
            c.execute(text("INSERT INTO message (id, conversation_id, position, role, text, "
                           "created_at) VALUES (:id, 'c1', :p, :r, :x, :t)"),
                      {"id": 100 + i, "p": i, "r": role, "x": body, "t": t})
        c.execute(text("INSERT INTO message_image (message_id, position, image_sha256) "
                       "VALUES (100, 0, :sha)"), {"sha": "ab" * 32})
        c.execute(text("INSERT INTO feedback (message_id, rating, comment, corrected, tags, "
                       "created_at, updated_at) VALUES (101, 'dislike', 'meh', 'better answer', "
                       "'[\"legacy\"]', :t, :t)"), {"t": t})
        if engine.dialect.name == "postgresql":  # explicit ids above: move the sequence on
            c.execute(text("SELECT setval(pg_get_serial_sequence('message', 'id'), 101)"))


def test_upgrade_from_previous_revision_keeps_and_backfills_data(db_url: str) -> None:
    engine = create_engine_for(db_url)
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    assert set(inspect(engine).get_table_names()) >= TABLES_0001
    assert "feedback_event" not in inspect(engine).get_table_names()
    _fill_revision_1(engine)

    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert _schema_diff(engine) == []
    with Session(engine) as s, s.begin():
        conv = get_conversation(s, OWNER, "c1")
        assert [m.text for m in conv.messages] == ["old question", "old answer"]
        assert conv.messages[0].images[0].image.sha256 == "ab" * 32
        assert get_image(s, OWNER, "ab" * 32).width == 4  # attached before 0004: owned (backfill)
        with pytest.raises(NotFound):
            get_image(s, Owner("user", "someone-else"), "ab" * 32)
        (event,) = feedback_history(s, OWNER, 101)  # the old verdict became history
        assert (event.rating, event.corrected, event.tags) == ("dislike", "better answer",
                                                               ["legacy"])
        assert event.created_at == datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
        set_feedback(s, OWNER, 101, rating="like")
    with Session(engine) as s, s.begin():
        assert [e.rating for e in feedback_history(s, OWNER, 101)] == ["dislike", "like"]
    engine.dispose()


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    engine = create_engine_for(db_url)
    upgrade(engine)
    downgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    assert "feedback_event" not in inspect(engine).get_table_names()
    downgrade(engine, "base")
    assert not set(inspect(engine).get_table_names()) & TABLES_0001
    upgrade(engine)
    assert _schema_diff(engine) == []
    engine.dispose()


def test_concurrent_starts_upgrade_once(db_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        engine = create_engine_for(db_url)
        try:
            upgrade(engine)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = create_engine_for(db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()
