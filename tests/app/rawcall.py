"""Raw HTTP calls against a running app, as a hostile client makes them (no gradio_client checks):
an upload, a named endpoint through `/gradio_api/call/NAME`, and any event (private UI events
too) through the queue with whatever event data the caller chooses."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx

TIMEOUT = 120.0


def upload(url: str, path: Path) -> dict[str, Any]:
    """Upload a file the way the browser does; the FileData payload an input takes."""
    with path.open("rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, f)}, timeout=TIMEOUT)
    r.raise_for_status()
    return {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": path.name}


def _events(lines: Any) -> list[tuple[str | None, str]]:
    out, event = [], None
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            out.append((event, line[5:].strip()))
    return out


def call(url: str, api_name: str, data: Any) -> tuple[str, Any]:
    """POST /gradio_api/call/NAME then read its stream: ("complete", outputs) or ("error", message)."""
    body = json.dumps({"data": data}, allow_nan=True)   # NaN is what a hostile client may send
    r = httpx.post(f"{url}gradio_api/call/{api_name}", content=body,
                   headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    if r.status_code != 200:
        return "http", r.status_code
    event_id = r.json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}", timeout=TIMEOUT) as s:
        events = _events(s.iter_lines())
    kind, payload = next(((e, d) for e, d in reversed(events) if e in ("complete", "error")), ("none", ""))
    value = json.loads(payload) if payload else None
    if kind == "error" and isinstance(value, dict):   # Gradio's error event: {"error": message, ...}
        value = value.get("error")
    return kind, value


def event(url: str, fn_index: int, data: list[Any], event_data: Any = None,
          session_hash: str | None = None) -> dict[str, Any]:
    """Any event through the queue; returns its `process_completed` message."""
    session_hash = session_hash or uuid.uuid4().hex[:11]
    r = httpx.post(f"{url}gradio_api/queue/join", json={
        "data": data, "fn_index": fn_index, "event_data": event_data, "session_hash": session_hash,
        "trigger_id": None}, timeout=TIMEOUT)
    r.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash},
                      timeout=TIMEOUT) as s:
        for line in s.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed":
                return msg
    raise AssertionError("the event never completed")


def fn_index(demo: Any, name: str, n_outputs: int | None = None) -> int:
    """The index of the event whose handler is called `name` (e.g. "do_like"); `n_outputs`
    tells apart two tabs' handlers of one name."""
    for i, fn in demo.fns.items():
        if getattr(fn, "name", None) == name and (n_outputs is None or len(fn.outputs) == n_outputs):
            return i
    raise KeyError(name)
