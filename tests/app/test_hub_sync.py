"""Feedback leaves the Space by itself: a real huggingface_hub CommitScheduler pushes the store's
per-conversation export to a dataset repo; the HfApi double at the network boundary keeps what it
would upload in a local folder. No test reaches the network."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from app.hub_sync import FeedbackSync, SyncStatus, check_repo_id, start_hub_sync, SyncConfigError
from storage import Store, open_store, read_only
from storage.db import StorageSettings
from storage.export import export_training_data
from storage.repository import Owner, create_conversation, delete_conversation, save_turn, set_feedback
from train.records import parse_record

from apptest_support import png_bytes, scene
from hub_double import LocalHub

REPO = "host/sphinx-feedback"
ANN = Owner("session", "a" * 32)


@pytest.fixture
def store(tmp_path: Path):
    s = open_store(StorageSettings(data_dir=tmp_path / "data"))
    yield s
    s.dispose()


@pytest.fixture
def hub(tmp_path: Path) -> LocalHub:
    return LocalHub(tmp_path / "hub")


@pytest.fixture
def syncs():
    started: list[FeedbackSync] = []
    yield started
    for s in started:
        s.stop()  # the scheduler's atexit push then does nothing


def _sync(store: Store, tmp_path: Path, hub: LocalHub, syncs: list) -> FeedbackSync:
    sync = start_hub_sync(store, tmp_path / "data", REPO, every=60, hf_api=hub)
    assert isinstance(sync, FeedbackSync)
    syncs.append(sync)
    return sync


def _turns(store: Store, turns: list[tuple[str, str, bool, str | None, str | None]]) -> str:
    """(prompt, answer, with an image, rating, correction) -> a conversation id."""
    with Session(store.engine) as s, s.begin():
        cid = create_conversation(s, ANN, model_id="demo", model_version="v1").id
        for prompt, answer, image, rating, corrected in turns:
            images = [store.images.put(s, png_bytes(scene()), owner=ANN)] if image else []
            _, bot = save_turn(s, ANN, cid, prompt=prompt, answer=answer, images=images)
            if rating or corrected:
                set_feedback(s, ANN, bot.id, rating=rating, corrected=corrected)
    return cid


def _lines(folder: Path) -> set[bytes]:
    return {line for p in sorted((folder / "conversations").glob("*.jsonl"))
            for line in p.read_bytes().splitlines()}


def test_pushes_the_exports_schema_and_the_images_to_a_dataset_repo(store, tmp_path, hub, syncs):
    a = _turns(store, [("What is it?", "A square.", True, "like", None)])
    b = _turns(store, [("Count them.", "Two.", False, "dislike", "Three.")])
    sync = _sync(store, tmp_path, hub, syncs)
    sync.trigger().result()
    assert hub.created == [(REPO, "dataset", True)]          # a private dataset repo
    files = hub.files(REPO)
    assert {f"conversations/{a}.jsonl", f"conversations/{b}.jsonl"} <= files
    (image,) = [f for f in files if f.startswith("images/")]
    # exactly what `python -m storage export` writes, line for line
    with Session(read_only(store.engine)) as s, s.begin():
        export_training_data(s, store.images, tmp_path / "export")
    pushed = _lines(hub.repo(REPO))
    assert pushed == set((tmp_path / "export" / "data.jsonl").read_bytes().splitlines())
    for line in pushed:                                       # and training reads it
        conv = parse_record(line)
        assert conv.task == "feedback"
        assert all((hub.repo(REPO) / ref).is_file() for ref in conv.image_refs)
    corrected = parse_record((hub.repo(REPO) / f"conversations/{b}.jsonl").read_bytes())
    assert corrected.messages[-1].text == "Three." and corrected.meta["turns"] == [
        {"rating": "dislike", "corrected": True}]
    assert sync.status.last_push is not None and sync.status.last_error is None
    assert sync.status.next_push == pytest.approx(sync.status.last_tick + 3600)
    assert sync.pending() == 0


def test_changes_and_deletions_reach_the_next_push(store, tmp_path, hub, syncs):
    a = _turns(store, [("What is it?", "A square.", True, None, None)])
    b = _turns(store, [("Count them.", "Two.", False, None, None)])
    sync = _sync(store, tmp_path, hub, syncs)
    sync.trigger().result()
    with Session(store.engine) as s, s.begin():
        _, bot = save_turn(s, ANN, b, prompt="Sure?", answer="Yes.")
        set_feedback(s, ANN, bot.id, rating="like")
        delete_conversation(s, ANN, a)                        # History -> Delete
    assert sync.pending() == 2
    sync.trigger().result()
    files = hub.files(REPO)
    assert f"conversations/{a}.jsonl" not in files
    assert not [f for f in files if f.startswith("images/")]  # its picture was named by nobody else
    texts = [m.text for m in parse_record((hub.repo(REPO) / f"conversations/{b}.jsonl").read_bytes()).messages]
    assert texts == ["Count them.", "Two.", "Sure?", "Yes."]
    assert hub.commits[-2]["deleted"] and hub.commits[-1]["added"] == [f"conversations/{b}.jsonl"]


def test_a_restart_uploads_nothing_it_already_sent(store, tmp_path, hub, syncs):
    _turns(store, [("What is it?", "A square.", True, "like", None)])
    first = _sync(store, tmp_path, hub, syncs)
    first.trigger().result()
    commits = len(hub.commits)
    first.stop()
    again = _sync(store, tmp_path, hub, syncs)                # the app restarts on the same data dir
    again.trigger().result()
    assert len(hub.commits) == commits
    c = _turns(store, [("New?", "Yes.", False, None, None)])
    again.trigger().result()
    assert hub.commits[-1]["added"] == [f"conversations/{c}.jsonl"]


def test_a_failed_push_is_logged_and_retried_at_the_next_tick(store, tmp_path, hub, syncs, caplog):
    sync = _sync(store, tmp_path, hub, syncs)
    sync.trigger().result()
    c = _turns(store, [("What is it?", "A square.", False, None, None)])
    hub.fail_next = 1
    with caplog.at_level(logging.WARNING, logger="app.hub_sync"), pytest.raises(ConnectionError):
        sync.trigger().result()
    assert "retried at the next tick" in caplog.text
    assert sync.status.last_error == "ConnectionError: the Hub cannot be reached"
    assert f"conversations/{c}.jsonl" not in hub.files(REPO) and sync.pending() == 1
    sync.trigger().result()
    assert f"conversations/{c}.jsonl" in hub.files(REPO)
    assert sync.status.last_error is None and sync.status.failures == 1


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "bad name/x", "../x"])
def test_a_malformed_repo_id_is_one_line_and_nothing_is_pushed(store, tmp_path, hub, repo):
    status = start_hub_sync(store, tmp_path / "data", repo, every=60, hf_api=hub)
    assert isinstance(status, SyncStatus) and not status.enabled
    assert "SPHINX_FEEDBACK_REPO" in status.last_error and "\n" not in status.last_error
    assert hub.created == [] and hub.commits == []
    with pytest.raises(SyncConfigError):
        check_repo_id(repo)


def test_a_hub_that_refuses_the_repo_leaves_the_app_serving(store, tmp_path, hub):
    hub.refuse_create = PermissionError("403 Forbidden: this token cannot write to host/sphinx-feedback")
    status = start_hub_sync(store, tmp_path / "data", REPO, every=60, hf_api=hub)
    assert isinstance(status, SyncStatus) and not status.enabled and status.next_push is None
    assert status.last_error.startswith("PermissionError: 403 Forbidden")


def test_without_a_repo_nothing_runs(store, tmp_path):
    assert start_hub_sync(store, tmp_path / "data", None) is None
    assert not (tmp_path / "data" / "hub_sync").exists()
