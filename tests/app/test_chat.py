"""Chat handlers with a real model: streaming, stop, feedback, multi-image turns, bad input."""
from __future__ import annotations

import dataclasses
import time

import pytest
from apptest_support import ALICE, BOB, paced, scene
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.handlers import chat
from app.handlers.common import UserError, generation_settings
from app.records import RecordError, StoredTurn
from app.service import ModelService
from storage.models import FeedbackEventRow, FeedbackRow, MessageRow
from storage.repository import Owner, get_conversation

SETTINGS = generation_settings(0.0, 1.0, 48, 512)


def _answer(ctx, state, owner=ALICE, settings=SETTINGS):
    views = list(chat.respond(ctx, state, owner, settings))
    return views


def _stored(ctx, owner, conversation_id):
    kind, _, ident = owner.partition(":")
    with Session(ctx.store.engine) as s:
        conv = get_conversation(s, Owner(kind, ident), conversation_id)
        return [(m.role, m.text, m.stopped, m.latency_ms, m.settings, [i.image_sha256 for i in m.images])
                for m in conv.messages], (conv.model_id, conv.model_version)


def _count(ctx, row=MessageRow) -> int:
    with Session(ctx.store.engine) as s:
        return s.scalar(select(func.count()).select_from(row))


def test_a_turn_streams_in_pieces_and_is_stored(ctx, image_file):
    with paced(ctx.service.generator.model, 0.01):
        state = chat.submit(ctx, chat.ChatState(), ALICE, "Describe the image.", [str(image_file)])
        assert state.busy and state.request_id
        views = _answer(ctx, state)
    partial = [v for v in views if not v.done]
    assert len(partial) >= 3                                 # streamed, not delivered at once
    assert [len(v.state.turns[-1].answer) for v in partial] == sorted(len(v.state.turns[-1].answer) for v in partial)
    final = views[-1]
    turn = final.state.turns[-1]
    assert final.done and not turn.pending and turn.answer and turn.message_id and not turn.stopped
    messages, model = _stored(ctx, ALICE, final.state.conversation_id)
    assert model == (ctx.service.info.model_id, ctx.service.info.version)
    (u_role, u_text, _, _, _, u_images), (a_role, a_text, a_stopped, latency, settings, _) = messages
    assert (u_role, u_text, a_role, a_text, a_stopped) == ("user", "Describe the image.", "assistant", turn.answer, False)
    assert len(u_images) == 1 and latency > 0
    assert settings["max_new_tokens"] == 48 and settings["task"] == "chat"
    assert settings["model_version"] == ctx.service.info.version


def test_stop_ends_decoding_keeps_the_partial_answer_and_stores_it_as_stopped(ctx, image_file):
    state = chat.submit(ctx, chat.ChatState(), ALICE, "Tell me a long story.", [str(image_file)])
    settings = generation_settings(0.0, 1.0, 500, 512)
    stream = chat.respond(ctx, state, ALICE, settings)
    for _ in range(3):
        next(stream)
    t0 = time.perf_counter()
    assert chat.stop(ctx, state) == "Stopping…"
    rest = list(stream)
    assert time.perf_counter() - t0 < 5.0
    turn = rest[-1].state.turns[-1]
    assert turn.stopped and 0 < len(turn.answer) and "Stopped" in rest[-1].status
    assert ctx.service.wait_idle(5)                         # the request left the batch
    messages, _ = _stored(ctx, ALICE, rest[-1].state.conversation_id)
    assert messages[1][1:3] == (turn.answer, True)
    assert len(turn.answer) < 500


def test_a_client_going_away_mid_stream_stores_a_stopped_answer(ctx):
    state = chat.submit(ctx, chat.ChatState(), ALICE, "Count to a hundred.", [])
    stream = chat.respond(ctx, state, ALICE, generation_settings(0.0, 1.0, 400, 512))
    next(stream), next(stream)
    stream.close()                                          # what Gradio does when a job is cancelled
    turn = state.turns[-1]
    assert turn.stopped and not turn.pending and turn.message_id
    messages, _ = _stored(ctx, ALICE, state.conversation_id)
    assert messages[1][2] is True and messages[1][1] == turn.answer


def test_feedback_like_dislike_comment_and_correction_are_stored(ctx, image_file):
    state = chat.submit(ctx, chat.ChatState(), ALICE, "What is this?", [str(image_file)])
    state = _answer(ctx, state)[-1].state
    state = chat.submit(ctx, state, ALICE, "And the colours?", [])
    state = _answer(ctx, state)[-1].state
    first_id = state.turns[0].message_id
    chat.rate(ctx, state, ALICE, 1, True)
    chat.rate(ctx, state, ALICE, 1, False)                  # changed its mind: both events kept
    view = chat.annotate(ctx, state, ALICE, "too vague", "A red box and a blue disc.")
    assert "answer 1" in view.status and state.turns[0].corrected == "A red box and a blue disc."
    with Session(ctx.store.engine) as s:
        fb = s.get(FeedbackRow, first_id)
        events = s.scalars(select(FeedbackEventRow).where(FeedbackEventRow.message_id == first_id)).all()
    assert (fb.rating, fb.comment, fb.corrected) == ("dislike", "too vague", "A red box and a blue disc.")
    assert [e.rating for e in events] == ["like", "dislike", "dislike"]
    conv = chat.to_conversation(state)                       # the correction is what the model sees next
    assert conv.messages[1].text == "A red box and a blue disc."
    with pytest.raises(UserError):
        chat.rate(ctx, state, ALICE, 0, True)               # a user message is not an answer
    with pytest.raises(RecordError, match="not in your history"):
        chat.rate(ctx, state, BOB, 3, True)                  # Bob cannot rate Alice's answer
    assert chat.feedback_values(state) == ["Dislike", None]  # a re-drawn chat keeps the thumbs shown
    chat.rate(ctx, state, ALICE, 3, "Like")
    assert chat.feedback_values(state) == ["Dislike", "Like"]
    chat.rate(ctx, state, ALICE, 3, None)                   # clicked again: cleared, shown unrated
    assert chat.feedback_values(state) == ["Dislike", None]


def test_new_image_mid_conversation_and_text_follow_ups_keep_all_images(ctx, tmp_path, monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    scene(120, 80).save(a)
    scene(60, 140).save(b)
    seen = []
    real = ctx.service.stream

    def spy(request):
        seen.append((len(request.images), [len(m.image_refs) for m in request.conversation.messages]))
        return real(request)
    monkeypatch.setattr(ctx.service, "stream", spy)
    state = chat.submit(ctx, chat.ChatState(), ALICE, "What is in the first?", [str(a)])
    state = _answer(ctx, state)[-1].state
    state = chat.submit(ctx, state, ALICE, "And in this one?", [str(b)])
    state = _answer(ctx, state)[-1].state
    state = chat.submit(ctx, state, ALICE, "Compare the two.", [])
    state = _answer(ctx, state)[-1].state
    assert seen == [(1, [1]), (2, [1, 0, 1]), (2, [1, 0, 1, 0, 0])]
    assert all(t.answer for t in state.turns)
    messages, _ = _stored(ctx, ALICE, state.conversation_id)
    assert [len(m[5]) for m in messages] == [1, 0, 1, 0, 0, 0]


def test_a_one_image_model_says_so_instead_of_failing(ctx, tmp_path):
    one = ModelService(ctx.service.generator.model, ctx.service.processor,
                       dataclasses.replace(ctx.service.info, max_images=1))
    one_ctx = dataclasses.replace(ctx, service=one)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    scene().save(a)
    scene(50, 50).save(b)
    state = chat.submit(one_ctx, chat.ChatState(), ALICE, "What is this?", [str(a)])
    state = _answer(one_ctx, state)[-1].state
    before = _count(ctx)
    with pytest.raises(UserError, match="takes 1 image per conversation"):
        chat.submit(one_ctx, state, ALICE, "And this?", [str(b)])
    assert len(state.turns) == 1 and _count(ctx) == before


@pytest.mark.parametrize("text, files, message", [
    ("", [], "empty"),
    ("   ", [], "empty"),
    ("x" * 9000, [], "limit"),
    ("What is it?", ["not-an-image.txt"], "not a recognised image"),
    ("What is it?", ["truncated.png"], "truncated or corrupt"),
    ("What is it?", ["huge.png"], "above the limit"),
])
def test_bad_input_gives_one_clear_line_and_loses_nothing(ctx, tmp_path, text, files, message):
    (tmp_path / "not-an-image.txt").write_text("hello")
    data = (tmp_path / "ok.png")
    scene(400, 400).save(data)
    (tmp_path / "truncated.png").write_bytes(data.read_bytes()[:300])
    scene(1200, 1000).save(tmp_path / "huge.png")
    small_cap = dataclasses.replace(ctx, settings=ctx.settings.with_(max_pixels=1_000_000))
    state = chat.submit(ctx, chat.ChatState(), ALICE, "First question.", [])
    state = _answer(ctx, state)[-1].state
    before = _count(ctx)
    with pytest.raises(UserError, match=message) as err:
        chat.submit(small_cap, state, ALICE, text, [str(tmp_path / f) for f in files])
    assert "\n" not in str(err.value) and str(tmp_path) not in str(err.value)
    assert len(state.turns) == 1 and not state.busy and _count(ctx) == before


def test_a_prompt_longer_than_the_context_is_refused_before_queueing(ctx):
    from app.service import ServiceError

    words = " ".join(["word"] * 1500)          # ~7,500 byte tokens; the model takes ~1k
    with pytest.raises(ServiceError, match="too long"):
        chat.submit(ctx, chat.ChatState(), ALICE, words[:7990], [])


def test_html_and_script_in_text_are_shown_not_run(ctx):
    state = chat.ChatState(turns=[chat.Turn('<script>alert(1)</script><img src=x onerror="alert(2)">',
                                            answer="<p>dog</p> [0.10,0.20,0.30,0.40] <b>bold</b>", pending=False)])
    user, bot = chat.chat_messages(state)
    rendered = user["content"][-1] + bot["content"]
    assert "<script" not in rendered and "<img" not in rendered and "<p>" not in rendered
    assert "&lt;script&gt;" in rendered and "**dog** ‹box 1›" in rendered     # a box is a short tag
    assert state.turns[0].answer == "<p>dog</p> [0.10,0.20,0.30,0.40] <b>bold</b>"   # the text stays the model's


def test_regenerate_undo_and_clear(ctx, image_file):
    state = chat.submit(ctx, chat.ChatState(), ALICE, "Describe it.", [str(image_file)])
    state = _answer(ctx, state)[-1].state
    old_id = state.turns[0].message_id
    state = chat.regenerate(ctx, state)
    assert state.busy and state.turns[0].images and state.turns[0].regenerate_of == old_id
    state = _answer(ctx, state, settings=generation_settings(1.0, 0.9, 24, 512))[-1].state
    assert len(state.turns) == 1 and state.turns[0].message_id != old_id
    messages, _ = _stored(ctx, ALICE, state.conversation_id)
    assert len(messages) == 4 and messages[3][4]["regenerate_of"] == old_id   # nothing stored is lost
    view = chat.undo(state)
    assert view.state.turns == [] and view.restore["text"] == "Describe it." and len(view.restore["files"]) == 1
    with pytest.raises(UserError):
        chat.undo(view.state)
    assert chat.clear() == chat.ChatState()


def test_boxes_in_an_answer_are_mapped_onto_the_image(ctx, image_file):
    state = chat.submit(ctx, chat.ChatState(), ALICE, "Where is the red box?", [str(image_file)])
    state = _answer(ctx, state)[-1].state
    turn = state.turns[-1]
    turn.answer = "<p>red box</p> [0.10,0.10,0.40,0.40]"
    stored = turn.images[0]
    restored = chat.from_history(ctx, state.conversation_id, [
        StoredTurn(turn.prompt, [stored], turn.answer, 1, False)])
    (region,) = restored.turns[0].regions
    side = max(stored.width, stored.height)
    assert region.label == "red box" and region.pixels == pytest.approx((0.1 * side, 0.1 * side, 0.4 * side, 0.4 * side))
    picture = chat.overlay(ctx, restored)
    assert picture.size == (stored.width, stored.height)


def test_the_same_upload_again_is_checked_and_kept_without_decoding_it_again(ctx, image_file, tmp_path, monkeypatch):
    from app.handlers import common

    calls, real = [], common.load_image
    monkeypatch.setattr(common, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = common.keep_upload(ctx, common.owner_of(ALICE), str(image_file))
    copy = tmp_path / "again.png"                      # a new upload of the same bytes (an example clicked again)
    copy.write_bytes(image_file.read_bytes())
    again = common.keep_upload(ctx, common.owner_of(BOB), str(copy))
    assert again.sha256 == first.sha256 and calls == [1]
    broken = tmp_path / "broken.png"
    broken.write_bytes(image_file.read_bytes()[:40])   # other bytes are checked, and refused with a message
    with pytest.raises(UserError):
        common.keep_upload(ctx, common.owner_of(ALICE), str(broken))


def test_an_answer_the_store_cannot_keep_is_a_message_and_the_conversation_stays(ctx, image_file):
    from app.records import TurnRecord, save_exchange

    state = chat.submit(ctx, chat.ChatState(), ALICE, "Describe it.", [str(image_file)])
    state = _answer(ctx, state)[-1].state
    owner = Owner("session", ALICE.partition(":")[2])
    with pytest.raises(RecordError, match="cannot be stored"):
        save_exchange(ctx.store, owner, state.conversation_id, ctx.service.info,
                      TurnRecord(prompt="again", answer="a NUL \x00 here", images=[], regions=None,
                                 settings={}, latency_ms=1.0, stopped=False))
    messages, _ = _stored(ctx, ALICE, state.conversation_id)
    assert len(messages) == 2                          # the first exchange is kept, nothing half-written
