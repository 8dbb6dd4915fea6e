"""The public API through gradio_client against a launched server on 127.0.0.1 and a free port:
one call per endpoint, a streamed chat, and a streamed chat cancelled midway."""
from __future__ import annotations

import time

import pytest
from apptest_support import paced, running_app
from gradio_client import Client, handle_file
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.examples import EXAMPLES_DIR
from app.launch import serve_in_background
from storage.models import ConversationRow, MessageRow

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


@pytest.fixture(scope="module")
def server(service, model_dir, tmp_path_factory):
    yield from running_app(service, model_dir, tmp_path_factory.mktemp("api"),
                           task_max_new_tokens=24, browser_secret="test-secret")


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def _assistant_rows(server, conversation_id=None):
    with Session(server.context.store.engine) as s:
        q = select(MessageRow).where(MessageRow.role == "assistant")
        if conversation_id:
            q = q.where(MessageRow.conversation_id == conversation_id)
        return [(m.conversation_id, m.text, m.stopped) for m in s.scalars(q.order_by(MessageRow.id))]


def test_chat_streams_and_continues_a_conversation(server, client):
    with paced(server.context.service.generator.model, 0.01):
        job = client.submit("Describe the image.", [handle_file(EXAMPLES_DIR / "scene-objects.png")], "",
                            0.0, 1.0, 40, api_name="/chat")
        outputs = list(job)
    assert len(outputs) >= 3                                   # streamed
    answer, conv_id, regions = outputs[-1]
    assert answer and conv_id and isinstance(regions, list)
    assert [len(o[0]) for o in outputs] == sorted(len(o[0]) for o in outputs)
    again = client.predict("And the colours?", None, conv_id, 0.0, 1.0, 16, api_name="/chat")
    assert again[1] == conv_id
    rows = _assistant_rows(server, conv_id)
    assert [r[1] for r in rows] == [answer, again[0]] and not any(r[2] for r in rows)
    with Session(server.context.store.engine) as s:
        owner = s.get(ConversationRow, conv_id).owner_id
    assert owner == f"api:{client.session_hash}"
    other = Client(server.url, verbose=False)               # another client cannot continue it
    with pytest.raises(Exception, match="no such conversation"):
        other.predict("Hijack", None, conv_id, 0.0, 1.0, 8, api_name="/chat")


def test_a_streamed_chat_cancelled_midway_is_stored_as_stopped(server, client):
    job = client.submit("Tell me a very long story.", None, "", 0.0, 1.0, 500, api_name="/chat")
    deadline = time.time() + 30
    while len(job.outputs()) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert len(job.outputs()) >= 2
    job.cancel()
    for _ in range(200):                                        # the server stores it as it stops
        rows = [r for r in _assistant_rows(server) if r[2]]
        if rows:
            break
        time.sleep(0.05)
    (conv, text, stopped), = rows
    assert stopped and 0 < len(text) < 500
    assert server.context.service.wait_idle(5)                 # decoding ended: the batch is empty


def test_ground_som_and_ocr(client):
    scene = handle_file(EXAMPLES_DIR / "scene-objects.png")
    ground = client.predict(scene, "small brown triangle", api_name="/ground")
    assert ground["prompt"].endswith("small brown triangle.") and ground["image"]["width"] == 324
    assert isinstance(ground["regions"], list) and ground["model"]["id"]
    som = client.predict(handle_file(EXAMPLES_DIR / "scene-marks.png"), "What is 2?", "opencv", api_name="/som")
    assert len(som["marks"]) == 5 and som["answer"] and set(som["named_marks"]) <= {1, 2, 3, 4, 5}
    som_user = client.predict(scene, "Compare 1 and 2.", "[[10, 10, 60, 60], [200, 80]]", api_name="/som")
    assert [m["pixels"] for m in som_user["marks"]] == [[10, 10, 60, 60], [200, 80]]
    doc = client.predict(handle_file(EXAMPLES_DIR / "sample.pdf"), 1, "read", api_name="/ocr")
    assert doc["pages"] == 2 and doc["embedded_text"] and 0 <= doc["similarity"] <= 1 and "text" in doc
    with pytest.raises(Exception, match="page 5"):
        client.predict(handle_file(EXAMPLES_DIR / "sample.pdf"), 5, "read", api_name="/ocr")


def test_requests_through_the_app_decode_together_and_a_full_queue_is_refused(service, model_dir, tmp_path):
    """Gradio lets in as many model events as the service batches (2 here): two decode as one
    batch, one waits (the queue holds one), the fourth is refused with Gradio's message."""
    from app.handlers.common import AppContext
    from app.service import ModelService, ServingLimits
    from app.settings import AppSettings
    from storage import open_store

    settings = AppSettings(model=str(model_dir), data_dir=tmp_path / "data", queue_size=1,
                           browser_secret="test-secret")
    pair = ModelService(service.generator.model, service.processor, service.info, ServingLimits(max_batch=2))
    running = serve_in_background(settings, AppContext(pair, open_store(settings.storage), settings))
    try:
        jobs = []
        for _ in range(4):
            jobs.append(Client(running.url, verbose=False).submit(
                "Tell a long story.", None, "", 0.0, 1.0, 500, api_name="/chat"))
            time.sleep(0.25)
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(bool(job.result(timeout=60)[0]))
            except Exception as e:  # noqa: BLE001 - gradio_client's QueueError
                outcomes.append(str(e))
        assert outcomes[:3] == [True, True, True] and "Queue is full" in outcomes[3]
        assert pair.engine.stats["max_rows"] == 2           # the first two shared the batch
    finally:
        running.close()
        running.context.store.dispose()
        pair.close()
