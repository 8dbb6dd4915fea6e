"""The `stopped` flag (revision 0003): a stopped answer is stored as such, others are not,
and rows written before the revision read back as not stopped."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from storage.db import Store, create_engine_for, upgrade
from storage.repository import Owner, create_conversation, get_conversation, save_turn

OWNER = Owner("session", "stopper")


def test_stopped_answers_are_flagged(store: Store) -> None:
    with Session(store.engine) as s, s.begin():
        conv = create_conversation(s, OWNER, model_id="m")
        save_turn(s, OWNER, conv.id, prompt="long story", answer="Once upon", stopped=True)
        save_turn(s, OWNER, conv.id, prompt="again", answer="The end.")
        cid = conv.id
    with Session(store.engine) as s:
        msgs = get_conversation(s, OWNER, cid).messages
        assert [(m.role, m.stopped) for m in msgs] == [
            ("user", False), ("assistant", True), ("user", False), ("assistant", False)]


def test_rows_from_revision_2_are_not_stopped(db_url: str) -> None:
    engine = create_engine_for(db_url)
    upgrade(engine, "0002")
    now = datetime(2024, 1, 1)
    with engine.begin() as c:
        c.execute(text("INSERT INTO conversation (id, owner_kind, owner_id, model_id, model_version,"
                       " created_at, updated_at) VALUES ('c', 'session', 'stopper', 'm', '', :t, :t)"),
                  {"t": now})
        c.execute(text("INSERT INTO message (conversation_id, position, role, text, created_at) "
                       "VALUES ('c', 0, 'assistant', 'old', :t)"), {"t": now})
    upgrade(engine)
    with Session(engine) as s:
        (msg,) = get_conversation(s, OWNER, "c").messages
        assert msg.stopped is False
    engine.dispose()
