"""History: only the owner's conversations, reopened with their images and continued; delete own."""
from __future__ import annotations

import pytest

from app.handlers import chat, history
from app.handlers.common import generation_settings
from app.records import RecordError
from apptest_support import ALICE, BOB

S = generation_settings(0.0, 1.0, 16, 512)


def _turn(ctx, state, owner, text, files=()):
    state = chat.submit(ctx, state, owner, text, list(files))
    return list(chat.respond(ctx, state, owner, S))[-1].state


def test_reopen_with_images_continue_and_delete(ctx, image_file):
    state = _turn(ctx, chat.ChatState(), ALICE, "What is in the picture?", [str(image_file)])
    state = _turn(ctx, state, ALICE, "And its colours?")
    chat.rate(ctx, state, ALICE, 1, True)
    (item,) = history.listing(ctx, ALICE)
    assert item.title == "What is in the picture?" and item.turns == 2 and "2 turns" in item.label
    reopened = history.reopen(ctx, ALICE, item.conversation_id)
    assert [t.prompt for t in reopened.turns] == ["What is in the picture?", "And its colours?"]
    assert [t.answer for t in reopened.turns] == [t.answer for t in state.turns]
    assert reopened.turns[0].rating == "like" and reopened.turns[0].images[0].path.is_file()
    assert not reopened.busy
    continued = _turn(ctx, reopened, ALICE, "One more question.")
    assert continued.conversation_id == item.conversation_id    # same stored conversation
    assert history.listing(ctx, ALICE)[0].turns == 3
    assert history.delete(ctx, ALICE, item.conversation_id) == []


def test_one_owner_never_sees_another_owners_conversations(ctx, image_file):
    alice = _turn(ctx, chat.ChatState(), ALICE, "Alice's secret question", [str(image_file)])
    _turn(ctx, chat.ChatState(), BOB, "Bob's question")
    assert [i.title for i in history.listing(ctx, BOB)] == ["Bob's question"]
    assert [i.title for i in history.listing(ctx, ALICE)] == ["Alice's secret question"]
    with pytest.raises(RecordError, match="no such conversation"):
        history.reopen(ctx, BOB, alice.conversation_id)
    with pytest.raises(RecordError, match="no such conversation"):
        history.delete(ctx, BOB, alice.conversation_id)
    # Bob cannot append to Alice's conversation by carrying its id in his state either
    stolen = chat.ChatState(conversation_id=alice.conversation_id)
    with pytest.raises(RecordError, match="not in your history"):   # refused as it is submitted
        chat.submit(ctx, stolen, BOB, "sneaky", [])
    assert not stolen.turns
    assert history.listing(ctx, ALICE)[0].turns == 1          # Alice's conversation is untouched


def test_an_owner_cannot_attach_another_owners_image(ctx, image_file):
    alice = _turn(ctx, chat.ChatState(), ALICE, "Alice's picture", [str(image_file)])
    stolen = chat.Turn("What is in Alice's picture?", images=list(alice.turns[0].images))
    bob = chat.ChatState(turns=[stolen], request_id="r1")
    views = list(chat.respond(ctx, bob, BOB, S))
    assert views[-1].error and "not in your history" in views[-1].error
    assert history.listing(ctx, BOB) == []
