"""Nothing typed is lost in a crash: a chat turn is stored when its prompt is submitted, its
answer as it streams, and after the app is killed (-9) and started again, History shows the
turn as interrupted with what had been written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from apptest_support import ALICE

from app.handlers import chat, history
from app.handlers.common import generation_settings, owner_of
from app.launch import free_port
from app.records import load_turns
from app.settings import AppSettings
from storage import open_store
from storage.models import MessageRow

REPO = Path(__file__).resolve().parents[2]


def _rows(store):
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    with Session(store.engine) as s:
        return [(m.role, m.text, m.interrupted) for m in s.scalars(select(MessageRow).order_by(MessageRow.id))]


def test_the_prompt_is_stored_on_submit_before_the_model_runs(ctx):
    state = chat.submit(ctx, chat.ChatState(), ALICE, "Remember this question.", [])
    assert _rows(ctx.store) == [("user", "Remember this question.", False), ("assistant", "", True)]
    listed = history.listing(ctx, ALICE)
    assert [i.title for i in listed] == ["Remember this question."] and listed[0].label.endswith("· interrupted")
    views = list(chat.respond(ctx, state, ALICE, generation_settings(0, 1, 8, 512)))
    answer = views[-1].state.turns[-1].answer
    assert _rows(ctx.store) == [("user", "Remember this question.", False), ("assistant", answer, False)]
    assert "interrupted" not in history.listing(ctx, ALICE)[0].label


def test_an_abandoned_answer_reopens_as_interrupted_with_what_was_written(ctx, settings):
    """The process dies mid-answer (simulated: the stream is never finished); a new process
    (a fresh store on the same folder) shows the prompt and the partial answer, marked."""
    state = chat.submit(ctx, chat.ChatState(), ALICE, "Tell me a long story.", [])
    stream = chat.respond(ctx, state, ALICE, generation_settings(0, 1, 400, 512))
    views = [next(stream) for _ in range(3)]
    partial = views[-1].state.turns[-1].answer
    assert partial
    restarted = open_store(settings.storage)
    try:
        (turn,) = load_turns(restarted, owner_of(ALICE), state.conversation_id)
        assert turn.prompt == "Tell me a long story." and turn.interrupted and turn.answer
        assert partial.startswith(turn.answer)
        reopened = chat.from_history(ctx, state.conversation_id, [turn])
        shown = chat.chat_messages(reopened)[1]["content"]
        assert chat.INTERRUPTED_NOTE in shown
    finally:
        restarted.dispose()
        stream.close()                      # the live request ends; it is then stored as stopped


def test_a_failed_request_leaves_no_half_turn_and_gives_the_prompt_back(ctx):
    from app.service import ServiceError

    state = chat.submit(ctx, chat.ChatState(), ALICE, "Hello?", [])

    def boom(request):
        raise ServiceError("the queue is full")
        yield  # pragma: no cover

    real = ctx.service.stream
    ctx.service.stream = boom
    try:
        views = list(chat.respond(ctx, state, ALICE, generation_settings(0, 1, 8, 512)))
    finally:
        ctx.service.stream = real
    assert views[-1].error == "the queue is full" and views[-1].restore["text"] == "Hello?"
    assert _rows(ctx.store) == []


def test_kill_9_mid_answer_then_restart_shows_the_turn_interrupted(model_dir, tmp_path):
    from gradio_client import Client

    data = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "app.py"), "--model", str(model_dir), "--data-dir", str(data),
           "--port", str(port), "--engine", "thread", "--stream-interval-ms", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = Client(url, verbose=False)
        job = client.submit("Tell me a very long story.", None, "", 0.0, 1.0, 500, api_name="/chat")
        while len(job.outputs()) < 3 and time.time() < deadline:
            time.sleep(0.01)
        seen = job.outputs()[-1][0]
        os.killpg(proc.pid, signal.SIGKILL)                  # mid-answer, no cleanup of any kind
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert seen
    store = open_store(AppSettings(data_dir=data).storage)   # "restarted": the same folder, a new process's view
    try:
        rows = _rows(store)
        assert rows[0] == ("user", "Tell me a very long story.", False)
        role, text, interrupted = rows[1]
        assert role == "assistant" and interrupted and text, rows   # what was written before the kill
    finally:
        store.dispose()
