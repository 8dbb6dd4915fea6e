"""Turns written ahead (revision 0005): a prompt stored as it is submitted, its answer written as
it streams and completed; hostile updates (another owner's message, a user message, values no
backend stores, dropping a completed turn) are refused and change nothing."""
from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from storage.db import Store, create_engine_for, upgrade
from storage.repository import (NotFound, Owner, begin_turn, create_conversation, drop_unanswered, get_conversation,
                                update_answer)

ANN, BEN = Owner("session", "ann-writes-ahead"), Owner("session", "ben-the-intruder")


def _turn(store: Store):
    with Session(store.engine) as s, s.begin():
        conv = create_conversation(s, ANN, model_id="m")
        user, bot = begin_turn(s, ANN, conv.id, prompt="Is it saved?", settings={"task": "chat"})
        return conv.id, user.id, bot.id


def _messages(store: Store, cid: str):
    with Session(store.engine) as s:
        return [(m.role, m.text, m.interrupted, m.stopped) for m in get_conversation(s, ANN, cid).messages]


def test_a_turn_is_written_ahead_then_completed(store: Store) -> None:
    cid, _, bot = _turn(store)
    assert _messages(store, cid) == [("user", "Is it saved?", False, False), ("assistant", "", True, False)]
    with Session(store.engine) as s, s.begin():
        update_answer(s, ANN, bot, text="Yes, it", interrupted=True)
    assert _messages(store, cid)[1] == ("assistant", "Yes, it", True, False)
    with Session(store.engine) as s, s.begin():
        update_answer(s, ANN, bot, text="Yes, it is.", interrupted=False, boxes=[], latency_ms=12.0,
                      settings={"task": "chat", "temperature": 0.0}, stopped=False)
    assert _messages(store, cid)[1] == ("assistant", "Yes, it is.", False, False)


HOSTILE = {
    "another owner's answer": (lambda u, b: dict(owner=BEN, message_id=b, text="mine now", interrupted=False),
                               NotFound),
    "the user's message": (lambda u, b: dict(owner=ANN, message_id=u, text="rewritten", interrupted=False),
                           ValueError),
    "a NUL in the answer": (lambda u, b: dict(owner=ANN, message_id=b, text="a\x00", interrupted=True), ValueError),
    "NaN latency": (lambda u, b: dict(owner=ANN, message_id=b, text="a", interrupted=False,
                                      latency_ms=float("nan")), ValueError),
    "a message id that is text": (lambda u, b: dict(owner=ANN, message_id=str(b), text="a", interrupted=False),
                                  NotFound),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_answer_updates_change_nothing(store: Store, case: str) -> None:
    cid, user, bot = _turn(store)
    before = _messages(store, cid)
    make, error = HOSTILE[case]
    kwargs = make(user, bot)
    with pytest.raises(error):
        with Session(store.engine) as s, s.begin():
            update_answer(s, kwargs.pop("owner"), kwargs.pop("message_id"), **kwargs)
    assert _messages(store, cid) == before


def test_only_an_unfinished_turn_of_ones_own_can_be_dropped(store: Store) -> None:
    cid, user, bot = _turn(store)
    with pytest.raises(NotFound):
        with Session(store.engine) as s, s.begin():
            drop_unanswered(s, BEN, user, bot)
    with Session(store.engine) as s, s.begin():
        update_answer(s, ANN, bot, text="done", interrupted=False)
    with pytest.raises(NotFound):                      # completed: it stays
        with Session(store.engine) as s, s.begin():
            drop_unanswered(s, ANN, user, bot)
    assert len(_messages(store, cid)) == 2
    with Session(store.engine) as s, s.begin():
        conv = get_conversation(s, ANN, cid)
        u2, b2 = begin_turn(s, ANN, conv.id, prompt="second")
        u2, b2 = u2.id, b2.id
    with Session(store.engine) as s, s.begin():
        drop_unanswered(s, ANN, u2, b2)
    assert [m[1] for m in _messages(store, cid)] == ["Is it saved?", "done"]


def test_rows_from_revision_4_are_not_interrupted(db_url: str) -> None:
    engine = create_engine_for(db_url)
    upgrade(engine, "0004")
    now = datetime(2024, 1, 1)
    with engine.begin() as c:
        c.execute(text("INSERT INTO conversation (id, owner_kind, owner_id, model_id, model_version,"
                       " created_at, updated_at) VALUES ('c', 'session', 'ann-writes-ahead', 'm', '', :t, :t)"),
                  {"t": now})
        c.execute(text("INSERT INTO message (conversation_id, position, role, text, created_at) "
                       "VALUES ('c', 0, 'assistant', 'old', :t)"), {"t": now})
    upgrade(engine)
    with Session(engine) as s:
        (msg,) = get_conversation(s, ANN, "c").messages
        assert msg.interrupted is False
    engine.dispose()


def test_an_interrupted_answer_is_not_exported_as_training_data(store: Store) -> None:
    from storage.export import ExportReport, build_samples

    cid, _, bot = _turn(store)
    with Session(store.engine) as s, s.begin():
        update_answer(s, ANN, bot, text="Half an ans", interrupted=True)      # the app died here
        _, answer = begin_turn(s, ANN, cid, prompt="Second question")
        answer.text, answer.interrupted = "A whole answer.", False
    with Session(store.engine) as s:
        samples = build_samples(get_conversation(s, ANN, cid), "all", ExportReport())
    texts = [m.text for sample in samples for m in sample.messages]
    assert "Half an ans" not in texts and "A whole answer." in texts
