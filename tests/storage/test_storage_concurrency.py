"""Many writers at once lose nothing; a writer killed mid-transaction leaves a consistent
database. Runs on every engine.

The stress duration is `SPHINX_STORAGE_STRESS_SECONDS` (default 10, the issue's figure;
never less than 3).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from storage.db import create_engine_for, upgrade
from storage.models import ConversationRow, MessageRow
from storage.repository import Owner, create_conversation, save_turn
from storagetest_support import (
    WriterResult,
    env_float,
    positions_are_contiguous,
    stored_result,
    write_until,
    writer_owner,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WRITER = HERE / "writer_proc.py"
STRESS_SECONDS = max(3.0, env_float("SPHINX_STORAGE_STRESS_SECONDS", 10.0))
N_THREADS, N_PROCESSES = 8, 4


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(WRITER), *args], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _assert_consistent(engine) -> None:
    if engine.dialect.name == "sqlite":
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            assert c.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
    assert positions_are_contiguous(engine)


def test_threads_and_processes_writing_at_once_lose_nothing(db_url: str) -> None:
    engine = create_engine_for(db_url)
    upgrade(engine)
    procs = [_spawn("stress", db_url, f"p{i}") for i in range(N_PROCESSES)]
    for p in procs:
        _wait_ready(p)
    start_at = time.time() + 0.2  # everyone starts together once every process is up
    stop_at = start_at + STRESS_SECONDS
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start_at!r} {stop_at!r}\n")
        p.stdin.flush()
    results: list[WriterResult] = []
    lock = threading.Lock()

    def run(name: str, seed: int) -> None:
        r = write_until(engine, name, start_at, stop_at, seed=seed)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=run, args=(f"t{i}", i)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        out, err = p.communicate(timeout=STRESS_SECONDS + 120)
        assert p.returncode == 0, err[-2000:]
        results.append(WriterResult(**json.loads(out.strip().splitlines()[-1])))

    assert len(results) == N_THREADS + N_PROCESSES
    assert [r.errors for r in results if r.errors] == []
    for r in results:
        assert r.messages > 0, f"writer {r.writer} never got to write"
        assert stored_result(engine, r.writer) == WriterResult(r.writer, r.messages, r.checksum)
    with Session(engine) as s, s.begin():
        total = s.scalar(select(func.count()).select_from(MessageRow))
    assert total == sum(r.messages for r in results)
    _assert_consistent(engine)
    engine.dispose()


def _wait_ready(proc: subprocess.Popen[str]) -> int:
    """Wait for the writer's READY line; returns the number after it (a backend pid)."""
    assert proc.stdout is not None
    words = proc.stdout.readline().split()  # blocks until the writer says READY (or dies)
    if not words or words[0] != "READY":
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"writer did not start: {words!r} {err[-2000:]}")
    return int(words[1]) if len(words) > 1 else 0


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)  # reaps it and closes the pipes
    assert proc.returncode == -signal.SIGKILL


def _count(engine, owner: Owner) -> tuple[int, int]:
    with Session(engine) as s, s.begin():
        convs = s.scalar(select(func.count()).select_from(ConversationRow).where(
            ConversationRow.owner_id == owner.id))
        msgs = s.scalar(select(func.count()).select_from(MessageRow).join(ConversationRow)
                        .where(ConversationRow.owner_id == owner.id))
    return convs, msgs


def test_writer_killed_mid_transaction_leaves_a_consistent_database(db_url: str) -> None:
    engine = create_engine_for(db_url, busy_timeout_s=20)
    upgrade(engine)
    keep = Owner("user", "survivor")
    with Session(engine) as s, s.begin():
        cid = create_conversation(s, keep, model_id="m").id
        save_turn(s, keep, cid, prompt="committed before", answer="still here")

    # 1. killed while holding an open write transaction (SQLite: the write lock);
    # 2. killed at a random moment while committing in a loop (it waits for 1's lock first)
    hang, loop = _spawn("hang", db_url, "hang"), _spawn("loop", db_url, "loop")
    backend_pid = _wait_ready(hang)
    _kill(hang)
    _wait_ready(loop)
    time.sleep(0.7)
    _kill(loop)

    t0 = time.monotonic()
    with Session(engine) as s, s.begin():  # the lock is free again: others can write
        save_turn(s, keep, cid, prompt="after the crash", answer="fine")
    assert time.monotonic() - t0 < 15
    assert _count(engine, writer_owner("hang")) == (0, 0)  # nothing uncommitted survived
    convs, msgs = _count(engine, writer_owner("loop"))
    assert convs >= 1 and msgs == 6 * convs  # every conversation whole (3 turns) or absent
    assert _count(engine, keep) == (1, 4)
    _assert_consistent(engine)
    if engine.dialect.name == "postgresql":  # the server ended the killed client's backend
        assert backend_pid > 0 and _backend_gone(engine, backend_pid)
    engine.dispose()


def _backend_gone(engine, pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as c:
            if not c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"),
                             {"p": pid}).scalar():
                return True
        time.sleep(0.1)
    return False
