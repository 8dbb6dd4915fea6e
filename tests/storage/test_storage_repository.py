"""Round trips, feedback, owner isolation and hostile input, on every engine."""
from __future__ import annotations

from datetime import timezone

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from sphinx_model.conversation import Conversation, Message
from storage.db import Store
from storage.models import FeedbackEventRow, MessageRow
from storage.repository import (
    NotFound,
    Owner,
    add_message,
    create_conversation,
    delete_conversation,
    feedback_history,
    get_conversation,
    list_conversations,
    save_conversation,
    save_turn,
    set_feedback,
    to_conversation,
)
from storagetest_support import make_image

ALICE = Owner("session", "alice-browser")
BOB = Owner("user", "bob")


def _multi_turn(store: Store) -> tuple[str, list[int], str]:
    """A 3-turn conversation with an image and boxes; returns (conv id, answer ids, sha)."""
    with Session(store.engine) as s, s.begin():
        img = store.images.put(s, make_image(), owner=ALICE)
        conv = create_conversation(s, ALICE, model_id="sphinx-tiny", model_version="0.1")
        add_message(s, ALICE, conv.id, "system", "You are helpful.")
        _, a1 = save_turn(s, ALICE, conv.id, prompt="Where is the dog?",
                          answer="[0.10,0.20,0.40,0.90]", images=[img],
                          boxes=[{"coords": [0.1, 0.2, 0.4, 0.9], "label": "dog"}],
                          settings={"temperature": 0.0, "max_new_tokens": 64}, latency_ms=12.5)
        _, a2 = save_turn(s, ALICE, conv.id, prompt="And the cat?", answer="There is no cat.")
        _, a3 = save_turn(s, ALICE, conv.id, prompt="Colour?", answer="Brown.")
        return conv.id, [a1.id, a2.id, a3.id], img.sha256


def test_round_trip_multi_turn_with_images_and_feedback(store: Store) -> None:
    conv_id, answers, sha = _multi_turn(store)
    with Session(store.engine) as s, s.begin():
        set_feedback(s, ALICE, answers[0], rating="like", tags=["grounding", "grounding "])
        set_feedback(s, ALICE, answers[1], rating="dislike", comment="wrong",
                     corrected="A cat sits on the left.")
    with Session(store.engine) as s, s.begin():
        row = get_conversation(s, ALICE, conv_id)
        assert [m.role for m in row.messages] == ["system"] + ["user", "assistant"] * 3
        assert [m.position for m in row.messages] == list(range(7))
        user1, bot1 = row.messages[1], row.messages[2]
        assert [mi.image.sha256 for mi in user1.images] == [sha]
        assert (user1.images[0].image.width, user1.images[0].image.height) == (32, 24)
        assert bot1.boxes == [{"coords": [0.1, 0.2, 0.4, 0.9], "label": "dog"}]
        assert bot1.settings == {"temperature": 0.0, "max_new_tokens": 64}
        assert bot1.latency_ms == pytest.approx(12.5)
        assert bot1.feedback.rating == "like" and bot1.feedback.tags == ["grounding"]
        assert row.messages[4].feedback.corrected == "A cat sits on the left."
        assert row.created_at.tzinfo == timezone.utc
        assert row.updated_at >= row.created_at

        conv = to_conversation(row)
        conv.validate()
        assert conv.image_refs == [sha]
        assert conv.messages[1] == Message.user("Where is the dog?", image=sha)
        assert conv.meta == {"model_id": "sphinx-tiny", "model_version": "0.1"}
        # ...and back: the schema round-trips through the store
        copy = save_conversation(s, ALICE, Conversation.from_dict(conv.to_dict()),
                                 model_id="sphinx-tiny")
        again = to_conversation(get_conversation(s, ALICE, copy.id))
        assert [m.to_dict() for m in again.messages] == [m.to_dict() for m in conv.messages]


def test_feedback_latest_wins_and_history_is_kept(store: Store) -> None:
    _, answers, _ = _multi_turn(store)
    with Session(store.engine) as s, s.begin():
        set_feedback(s, ALICE, answers[2], rating="like")
    with Session(store.engine) as s, s.begin():
        set_feedback(s, ALICE, answers[2], rating="dislike", comment="actually wrong")
    with Session(store.engine) as s, s.begin():
        fb = set_feedback(s, ALICE, answers[2], corrected="Dark brown.")
        assert (fb.rating, fb.comment, fb.corrected) == ("dislike", "actually wrong", "Dark brown.")
        hist = feedback_history(s, ALICE, answers[2])
        assert [(h.rating, h.corrected) for h in hist] == [
            ("like", None), ("dislike", None), ("dislike", "Dark brown.")]
        fb = set_feedback(s, ALICE, answers[2], rating=None, corrected="  ")
        assert fb.rating is None and fb.corrected is None
    with Session(store.engine) as s, s.begin():
        user_msg_id = answers[2] - 1
        with pytest.raises(ValueError):
            set_feedback(s, ALICE, user_msg_id, rating="like")  # only answers are rated
        with pytest.raises(ValueError):
            set_feedback(s, ALICE, answers[2], rating="meh")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            set_feedback(s, ALICE, answers[2], tags="not-a-list")


def test_an_owner_cannot_read_another_owners_conversation(store: Store) -> None:
    conv_id, answers, _ = _multi_turn(store)
    same_id_other_kind = Owner("user", ALICE.id)  # same string, different kind of owner
    with Session(store.engine) as s, s.begin():
        for intruder in (BOB, same_id_other_kind):
            with pytest.raises(NotFound):
                get_conversation(s, intruder, conv_id)
            with pytest.raises(NotFound):
                add_message(s, intruder, conv_id, "user", "let me in")
            with pytest.raises(NotFound):
                set_feedback(s, intruder, answers[0], rating="dislike")
            with pytest.raises(NotFound):
                feedback_history(s, intruder, answers[0])
            with pytest.raises(NotFound):
                delete_conversation(s, intruder, conv_id)
            assert list_conversations(s, intruder) == []
        assert [c.id for c in list_conversations(s, ALICE)] == [conv_id]
        assert s.scalar(select(func.count()).select_from(MessageRow)) == 7


def test_list_orders_by_latest_activity_and_delete_cascades(store: Store) -> None:
    with Session(store.engine) as s, s.begin():
        first = create_conversation(s, BOB, model_id="m").id
        second = create_conversation(s, BOB, model_id="m").id
        _, bot = save_turn(s, BOB, first, prompt="hi", answer="hello")
        set_feedback(s, BOB, bot.id, rating="like")
    with Session(store.engine) as s, s.begin():
        assert [c.id for c in list_conversations(s, BOB)] == [first, second]
        delete_conversation(s, BOB, first)
    with Session(store.engine) as s, s.begin():
        assert [c.id for c in list_conversations(s, BOB)] == [second]
        assert s.scalar(select(func.count()).select_from(MessageRow)) == 0
        assert s.scalar(select(func.count()).select_from(FeedbackEventRow)) == 0


HOSTILE = ["'); DROP TABLE message; --", "\" OR 1=1 --", "../../etc/passwd", "%s %(x)s ? :x",
           "\\x00 null\x00byte? no: just text", "漢字 🙂 " * 50]


def test_user_text_is_data_not_sql(store: Store) -> None:
    owner = Owner("session", "'; DELETE FROM conversation; --")
    with Session(store.engine) as s, s.begin():
        conv_id = create_conversation(s, owner, model_id="x'; --").id
        for text in HOSTILE:
            if "\x00" in text:  # PostgreSQL text cannot hold NUL: refused on every backend alike
                with pytest.raises(ValueError, match="NUL"):
                    save_turn(s, owner, conv_id, prompt=text, answer=text, settings={"k": text})
                continue
            save_turn(s, owner, conv_id, prompt=text, answer=text, settings={"k": text})
    with Session(store.engine) as s, s.begin():
        row = get_conversation(s, owner, conv_id)
        assert len(row.messages) == 2 * (len(HOSTILE) - 1)
        assert row.messages[0].text == HOSTILE[0]
        assert set(inspect(s.connection()).get_table_names()) >= {"message", "conversation"}
    # nothing user-typed ever reaches the file system
    root = store.settings.image_root
    files = [p.name for p in root.rglob("*")] if root.exists() else []
    assert not any("passwd" in f or "DROP" in f for f in files)


def test_owner_and_role_are_validated() -> None:
    with pytest.raises(ValueError):
        Owner("admin", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Owner("user", "")
    with pytest.raises(ValueError):
        Owner("user", "x" * 129)


def test_bad_role_and_unknown_image_refs_are_refused(store: Store) -> None:
    with Session(store.engine) as s, s.begin():
        conv = create_conversation(s, ALICE, model_id="m")
        with pytest.raises(ValueError):
            add_message(s, ALICE, conv.id, "root", "x")
        with pytest.raises(NotFound):
            save_conversation(s, ALICE, Conversation([Message.user("q", image="0" * 64),
                                                      Message.assistant("a")]), model_id="m")
