"""Races the stress test does not provoke: everyone clicking the first feedback on one answer
at the same instant (every event kept, on every engine), and several processes opening a
brand-new SQLite store at the same instant (every one of them succeeds)."""
from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.db import Store, StorageSettings, current_revision, head_revision, open_store
from storage.models import FeedbackEventRow, FeedbackRow
from storage.repository import Owner, create_conversation, feedback_history, save_turn, set_feedback

OWNER = Owner("session", "clicker")
CLICKERS = 8


def test_simultaneous_first_feedback_keeps_every_event(store: Store) -> None:
    with Session(store.engine) as s, s.begin():
        conv = create_conversation(s, OWNER, model_id="m")
        answers = [save_turn(s, OWNER, conv.id, prompt=f"q{i}", answer=f"a{i}")[1].id for i in range(3)]
    errors: list[str] = []
    for answer in answers:  # a fresh answer each round: every click is a "first" feedback
        barrier = threading.Barrier(CLICKERS)

        def click(k: int, answer: int = answer, barrier: threading.Barrier = barrier) -> None:
            try:
                with Session(store.engine) as s, s.begin():
                    barrier.wait(10)
                    set_feedback(s, OWNER, answer, rating="like" if k % 2 else "dislike", comment=f"click {k}")
            except Exception as e:  # noqa: BLE001 - reported below: any error is a lost event
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0]}")

        threads = [threading.Thread(target=click, args=(k,)) for k in range(CLICKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    with Session(store.engine) as s, s.begin():
        for answer in answers:
            events = feedback_history(s, OWNER, answer)
            assert sorted(e.comment for e in events) == sorted(f"click {k}" for k in range(CLICKERS))
            assert s.get(FeedbackRow, answer).comment == events[-1].comment  # the latest wins
        assert s.scalar(select(func.count()).select_from(FeedbackEventRow)) == CLICKERS * len(answers)


def _open(folders: list[str], gate: Any, migrate: bool, results: "multiprocessing.Queue[str]") -> None:
    for folder in folders:
        gate.wait(30)  # every process is at the same folder: now all at once
        try:
            store = open_store(StorageSettings(data_dir=Path(folder)), migrate=migrate)
            with store.engine.connect():  # the first connection switches a fresh file to WAL
                pass
            store.dispose()
            results.put("ok")
        except Exception as e:  # noqa: BLE001 - the test reports what failed
            results.put(f"{Path(folder).name}: {type(e).__name__}: {str(e).splitlines()[0]}")


def _at_once(folders: list[Path], processes: int, migrate: bool) -> list[str]:
    """Each folder opened by `processes` processes at the same instant; the failures."""
    ctx = multiprocessing.get_context("fork")  # cheap children: storage is already imported
    results: multiprocessing.Queue[str] = ctx.Queue()
    gate = ctx.Barrier(processes)
    args = ([str(f) for f in folders], gate, migrate, results)
    procs = [ctx.Process(target=_open, args=args) for _ in range(processes)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in range(processes * len(folders))]
    for p in procs:
        p.join(60)
    return [o for o in outcome if o != "ok"]


def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    # the race itself (switching a new file to WAL), many times over: without the retry in
    # storage.db._set_wal about one folder in twenty has a process failing with "database is locked"
    failures = _at_once([tmp_path / f"c{t}" for t in range(100)], 6, migrate=False)
    # and the case: four processes opening (and migrating) a new store together
    opened = [tmp_path / f"o{t}" for t in range(3)]
    failures += _at_once(opened, 4, migrate=True)
    for folder in opened:
        engine = open_store(StorageSettings(data_dir=folder), migrate=False).engine
        assert current_revision(engine) == head_revision()
        engine.dispose()
    assert failures == []
