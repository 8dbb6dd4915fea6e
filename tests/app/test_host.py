"""The host's panel: who the host is, the counts per day and model version, the latest corrections,
the Hub sync's state, the export as a zip; and nobody else gets any of it, through the handlers or
the API (a gradio_client without the token, or with a wrong one)."""
from __future__ import annotations

import zipfile

import pytest
from gradio_client import Client
from sqlalchemy.orm import Session

from app.handlers import host
from app.handlers.common import AppContext, UserError
from app.hub_sync import SyncStatus
from app.launch import serve_in_background
from storage.repository import Owner, create_conversation, save_turn, set_feedback

from apptest_support import png_bytes, scene

TOKEN = "s3cret-host-token"
ANN, BEN = Owner("session", "a" * 32), Owner("session", "b" * 32)
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def _collect(ctx: AppContext) -> None:
    """Two model versions; ann likes one answer and corrects another, ben dislikes one."""
    with Session(ctx.store.engine) as s, s.begin():
        img = ctx.store.images.put(s, png_bytes(scene()), owner=ANN)
        a = create_conversation(s, ANN, model_id="demo", model_version="v1").id
        _, bot = save_turn(s, ANN, a, prompt="What is it?", answer="A square.", images=[img])
        set_feedback(s, ANN, bot.id, rating="like")
        _, bot = save_turn(s, ANN, a, prompt="How many?", answer="Two.")
        set_feedback(s, ANN, bot.id, rating="dislike", corrected="Three.")
        b = create_conversation(s, BEN, model_id="demo", model_version="v2").id
        _, bot = save_turn(s, BEN, b, prompt="Colour?", answer="Red.")
        set_feedback(s, BEN, bot.id, rating="dislike")


@pytest.fixture
def host_ctx(ctx: AppContext) -> AppContext:
    ctx.settings = ctx.settings.with_(admin_token=TOKEN)
    return ctx


def test_the_host_is_the_token_holder_or_the_spaces_owner(host_ctx):
    assert host.is_host(host_ctx, token=TOKEN)
    assert not host.is_host(host_ctx, token="s3cret-host-tokeN") and not host.is_host(host_ctx, token="")
    assert not host.is_host(host_ctx, username="visitor")
    host_ctx.settings = host_ctx.settings.with_(admin_token=None, space_author="owner", on_space=True)
    assert host.is_host(host_ctx, username="owner") and not host.is_host(host_ctx, username="other")
    assert not host.is_host(host_ctx, token=TOKEN)                  # no token configured: nobody by token


def test_counts_per_day_and_version_and_corrections_beside_answers(host_ctx):
    _collect(host_ctx)
    ov = host.overview(host_ctx, True)
    assert ov.totals() == {"conversations": 2, "turns": 3, "likes": 1, "dislikes": 2, "corrections": 1}
    by_version = {r.model_version: r for r in ov.rows}
    assert (by_version["v1"].turns, by_version["v1"].likes, by_version["v1"].corrections) == (2, 1, 1)
    assert (by_version["v2"].conversations, by_version["v2"].dislikes) == (1, 1)
    (c,) = ov.corrections
    assert (c.question, c.answer, c.corrected, c.model_version) == ("How many?", "Two.", "Three.", "v1")
    state = host.sync_state(host_ctx, True)
    assert state["repo"] is None and "SPHINX_FEEDBACK_REPO" in state["state"]
    host_ctx.hub_sync = SyncStatus("host/feedback", 10, enabled=False, last_error="PermissionError: 403")
    state = host.sync_state(host_ctx, True)
    assert state["state"] == "off" and state["last_error"] == "PermissionError: 403"


def test_the_export_zip_holds_the_stores_export_and_one_is_written_at_a_time(host_ctx):
    _collect(host_ctx)
    path = host.export_zip(host_ctx, True)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        lines = z.read("data.jsonl").decode().splitlines()
    assert len([n for n in names if n.startswith("images/") and not n.endswith("/")]) == 1
    assert len(lines) == 1 and "Three." in lines[0]   # ann's two turns; ben's only answer is disliked
    with host._export_lock:                             # another export is being written
        with pytest.raises(UserError, match="being written"):
            host.export_zip(host_ctx, True)
    assert host.export_zip(host_ctx, True).is_file()


@pytest.mark.parametrize("call", [host.overview, host.sync_state, host.export_zip])
def test_nothing_without_the_hosts_grant(host_ctx, call):
    _collect(host_ctx)
    for granted in (False, None, "true", 1):
        with pytest.raises(host.NotHost):
            call(host_ctx, granted)


def test_the_api_answers_the_token_and_refuses_everyone_else(host_ctx, tmp_path):
    _collect(host_ctx)
    running = serve_in_background(host_ctx.settings, host_ctx)
    try:
        for headers in ({}, {host.HEADER: "wrong"}, {host.HEADER: ""}):
            client = Client(running.url, verbose=False, headers=headers)
            for endpoint in ("/host_overview", "/host_export"):
                with pytest.raises(Exception, match="host only"):
                    client.predict(api_name=endpoint)
        listed = Client(running.url, verbose=False).view_api(print_info=False, return_format="dict")
        assert not [e for e in listed["named_endpoints"] if "host" in e]      # not even listed
        client = Client(running.url, verbose=False, headers={host.HEADER: TOKEN})
        got = client.predict(api_name="/host_overview")
        assert got["totals"]["likes"] == 1 and got["latest_corrections"][0]["corrected"] == "Three."
        assert zipfile.ZipFile(client.predict(api_name="/host_export")).read("data.jsonl")
    finally:
        running.close()


def test_the_panel_shows_the_hub_syncs_pushes_pending_and_errors(host_ctx, tmp_path):
    from app.hub_sync import FeedbackSync, start_hub_sync
    from hub_double import LocalHub

    hub = LocalHub(tmp_path / "hub")
    sync = start_hub_sync(host_ctx.store, host_ctx.settings.data_dir, "host/feedback", every=60, hf_api=hub)
    assert isinstance(sync, FeedbackSync)
    host_ctx.hub_sync = sync
    try:
        sync.trigger().result()
        state = host.sync_state(host_ctx, True)
        assert (state["repo"], state["state"], state["last_push"], state["pending"]) == ("host/feedback", "on", "—", 0)
        _collect(host_ctx)
        assert host.sync_state(host_ctx, True)["pending"] == 2            # two new conversations
        hub.fail_next = 1
        with pytest.raises(ConnectionError):
            sync.trigger().result()
        state = host.sync_state(host_ctx, True)
        assert state["last_error"] == "ConnectionError: the Hub cannot be reached" and state["failures"] == 1
        sync.trigger().result()
        state = host.sync_state(host_ctx, True)
        assert state["pending"] == 0 and state["last_error"] is None and state["last_push"].endswith("UTC")
        assert state["next_push"] != "—"
    finally:
        sync.stop()
