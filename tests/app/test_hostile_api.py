"""Malformed calls against the running app, as a hostile client sends them (raw HTTP, no
gradio_client checks): every one is answered with one line that names the input, whether
Gradio's own preprocessing or the app's validators refuse it, and nothing is stored."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from apptest_support import running_app
import rawcall
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.examples import EXAMPLES_DIR
from storage.models import MessageRow

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG whose header claims side x side pixels (400 M): Pillow's own bomb check trips on open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def server(service, model_dir, tmp_path_factory):
    yield from running_app(service, model_dir, tmp_path_factory.mktemp("hostile"),
                           task_max_new_tokens=8, browser_secret="test-secret")


@pytest.fixture(scope="module")
def files(server, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("files")
    return {"scene": rawcall.upload(server.url, EXAMPLES_DIR / "scene-objects.png"),
            "bomb": rawcall.upload(server.url, bomb_png(folder / "bomb.png"))}


def _messages(server) -> int:
    with Session(server.context.store.engine) as s:
        return s.scalar(select(func.count()).select_from(MessageRow))


NAN = float("nan")
CHAT = ["Hi", None, "", 0.0, 1.0, 8]          # message, images, conversation_id, temperature, top_p, max_new_tokens


def chat(**changes):
    names = ["message", "images", "conversation_id", "temperature", "top_p", "max_new_tokens"]
    return lambda f: [changes.get(n, v) if not callable(changes.get(n)) else changes[n](f) for n, v in zip(names, CHAT)]


# endpoint -> case -> (inputs from the uploaded files, what the one line must say)
CASES = {
    "chat": {
        "max_new_tokens as text": (chat(max_new_tokens="abc"), "/chat: max_new_tokens must be a number"),
        "max_new_tokens NaN": (chat(max_new_tokens=NAN), "/chat: max_new_tokens must be a number"),
        "max_new_tokens an object": (chat(max_new_tokens={"n": 1}), "/chat: max_new_tokens must be a number"),
        "max_new_tokens too many": (chat(max_new_tokens=10**9), "max new tokens must be in 1..512"),
        "temperature NaN": (chat(temperature=NAN), "temperature must be a finite number"),
        "top_p zero": (chat(top_p=0), "top-p must be in (0, 1]"),
        "images a string": (chat(images="not-a-file"), "/chat: images must be a file"),
        "images a number": (chat(images=5), "/chat: images must be a file"),
        "two of six inputs": (lambda f: ["Hi", None], "/chat takes 6 inputs (message, images, conversation_id"),
        "a NUL in the prompt": (chat(message="a\x00b"), "contains a NUL character"),
        "a lone surrogate": (chat(message="a\ud800b"), "lone surrogate"),
        "a prompt over the cap": (chat(message="x" * 8001), "the limit is 8,000"),
        "a conversation id that is a path": (chat(conversation_id="../../etc"), "no such conversation"),
        "a conversation id that is a number": (chat(conversation_id=12345), "/chat: conversation_id must be text"),
    },
    "ground": {
        "image as a string": (lambda f: ["not-a-file", "the red box"], "/ground: image must be a file"),
        "image as a number": (lambda f: [7, "the red box"], "/ground: image must be a file"),
        "image a file of the server": (lambda f: [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
                                                  "x"], "/ground: image must be a file uploaded to this app"),
        "an image bomb": (lambda f: [f["bomb"], "the red box"], "above the limit of 40,000,000 pixels"),
        "phrase an object": (lambda f: [f["scene"], {"a": 1}], "/ground: phrase must be text"),
    },
    "som": {
        "marks with NaN": (lambda f: [f["scene"], "What is 1?", "[[NaN, 1]]"], "finite numbers"),
        "marks with Infinity": (lambda f: [f["scene"], "What is 1?", "[[1e999, 1]]"], "finite numbers"),
        "marks nested 100,000 deep": (lambda f: [f["scene"], "What is 1?", "[" * 100_000 + "]" * 100_000],
                                      "the limit is 20,000"),
        "marks nested 50 deep": (lambda f: [f["scene"], "What is 1?", "[" * 50 + "]" * 50], "nested too deep"),
        "1 MB of digits": (lambda f: [f["scene"], "What is 1?", "[[" + "9" * 1_000_000 + ", 1]]"],
                           "the limit is 20,000"),
        "5,000 digits": (lambda f: [f["scene"], "What is 1?", "[[" + "9" * 5000 + ", 1]]"], "digits"),
        "a mark of three numbers": (lambda f: [f["scene"], "What is 1?", "[[1, 2, 3]]"], "mark 1 is not"),
        "marks an object": (lambda f: [f["scene"], "What is 1?", {"x": 1}], "/som: marks must be text"),
        "31 marks": (lambda f: [f["scene"], "What is 1?", str([[i, i] for i in range(31)])], "at most 30 marks"),
    },
    "ocr": {
        "page as a word": (lambda f: [f["scene"], "two", "both"], "/ocr: page must be a number"),
        "page NaN": (lambda f: [f["scene"], NAN, "both"], "/ocr: page must be a number"),
        "page an object": (lambda f: [f["scene"], {"p": 1}, "both"], "/ocr: page must be a number"),
        "page 0": (lambda f: [f["scene"], 0, "both"], "the page must be a whole number from 1 to 1"),
        "page -3": (lambda f: [f["scene"], -3, "both"], "the page must be a whole number from 1 to 1"),
        "page 2 of one": (lambda f: [f["scene"], 2, "both"], "the page must be a whole number from 1 to 1"),
        "mode unknown": (lambda f: [f["scene"], 1, "all"], "mode must be one of read, spot, both"),
        "file as a number": (lambda f: [3, 1, "both"], "/ocr: file must be a file"),
    },
}


@pytest.mark.parametrize("endpoint, case", [(e, c) for e, cases in CASES.items() for c in cases])
def test_a_malformed_call_gets_one_line_and_stores_nothing(server, files, endpoint, case):
    inputs, expected = CASES[endpoint][case]
    before = _messages(server)
    kind, message = rawcall.call(server.url, endpoint, inputs(files))
    assert kind == "error", (kind, message)
    assert isinstance(message, str) and "\n" not in message.strip(), message
    assert expected in message, message
    for leak in ("Traceback", "pydantic", "validation error", "Could not preprocess", "178,956,970",
                 "178956970", "unexpected error"):
        assert leak not in message, message
    assert _messages(server) == before


def test_a_nul_prompt_is_refused_before_the_model_runs(server, files, monkeypatch):
    calls = []
    service = server.context.service
    monkeypatch.setattr(service, "stream", lambda *a, **k: calls.append(a) or iter(()))
    kind, message = rawcall.call(server.url, "chat", chat(message="tell me\x00")(files))
    assert kind == "error" and "NUL" in message and calls == []


# UI events (private, but reachable through the queue) sent without their event data
UI_EVENTS = {
    "a like with no event data": ("do_like", None, "this event came without its data"),
    "a like with no index": ("do_like", {"value": "x", "liked": True}, "this rating names no answer"),
    "a like with a text index": ("do_like", {"index": "1", "value": "x", "liked": True}, "names no answer"),
    "a like of an answer that is not there": ("do_like", {"index": 7, "value": "x", "liked": True}, "rated"),
    "a Set-of-Mark click with no data": ("do_click", None, "this event came without its data"),
    "a Set-of-Mark click with no index": ("do_click", {"value": None}, "no position"),
    "a Set-of-Mark click at NaN": ("do_click", {"index": ["NaN", 3]}, "finite"),
}


@pytest.mark.parametrize("case", list(UI_EVENTS))
def test_ui_events_without_their_data_get_one_line(server, case):
    name, event_data, expected = UI_EVENTS[case]
    index = rawcall.fn_index(server.demo, name)
    inputs = [None] * len(server.demo.fns[index].inputs)
    msg = rawcall.event(server.url, index, inputs, event_data)
    assert msg["success"], msg
    statuses = [v for v in msg["output"]["data"] if isinstance(v, str) and v.startswith("⚠")]
    assert len(statuses) == 1 and expected in statuses[0] and "\n" not in statuses[0], msg["output"]
    assert "NoneType" not in statuses[0] and "unexpected error" not in statuses[0]


def test_what_gradio_answers_before_the_app_can_leaves_the_app_serving(server, files):
    """Requests Gradio's own routes answer before any app code runs (noted in the issue's report):
    an upload whose file name is empty (Gradio 6.31: 500 from /gradio_api/upload), and a file
    payload naming a path on the server (Gradio refuses it in one line before preprocessing).
    What the app controls: it keeps serving, and nothing is stored."""
    import httpx

    before = _messages(server)
    r = httpx.post(f"{server.url}gradio_api/upload", files={"files": ("", b"\x89PNG not really")}, timeout=30)
    assert r.status_code >= 400
    kind, message = rawcall.call(server.url, "ground", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
                                                        "x"])
    assert kind == "error" and "\n" not in message and "root:" not in message
    kind, _ = rawcall.call(server.url, "ground", [files["scene"], "the red box"])
    assert kind == "complete" and _messages(server) == before + 2


@pytest.mark.parametrize("picked", ["../../etc/passwd", "f" * 32, 123, {"id": "x"}, ["a"]])
def test_history_open_and_delete_of_a_forged_pick_get_one_line(server, picked):
    for name, outputs in (("do_open", 7), ("do_delete", 2)):
        index = rawcall.fn_index(server.demo, name, outputs)
        msg = rawcall.event(server.url, index, [None, picked])
        if msg["success"]:       # the app's own line, in the tab's status
            statuses = [v for v in msg["output"]["data"] if isinstance(v, str) and v.startswith("⚠")]
            assert len(statuses) == 1 and "\n" not in statuses[0], msg["output"]
            assert "unexpected error" not in statuses[0]
        else:                    # Gradio's Dropdown refuses a value outside its choices, in one line
            error = msg["output"].get("error") or ""
            assert error and "\n" not in error.strip() and "Traceback" not in error, msg
