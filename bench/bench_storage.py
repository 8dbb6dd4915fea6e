"""Storage throughput: messages stored per second (1 and N concurrent writers) and export
rate (conversations/s), on SQLite and on PostgreSQL.

    python bench/bench_storage.py [--seconds 5] [--writers 1 8] [--conversations 2000]
                                  [--pg-url URL] [--no-write]

A writer is a thread of one process (as in the app's server), storing one turn (user +
assistant message) per transaction, as the app does after each answer. PostgreSQL comes
from --pg-url or SPHINX_TEST_PG_URL (`.ci/postgres.sh` starts one); each run uses a
throwaway schema. The table is printed and written into bench/RESULTS.md between the
`<!-- bench_storage -->` markers (the rest of the file is left alone).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, create_engine, insert, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from storage.db import create_engine_for, read_only, upgrade  # noqa: E402
from storage.export import export_training_data  # noqa: E402
from storage.images import ImageStore  # noqa: E402
from storage.models import (  # noqa: E402
    ConversationRow,
    FeedbackRow,
    MessageImageRow,
    MessageRow,
    utcnow,
)
from storage.repository import Owner, create_conversation, save_turn  # noqa: E402

from bench.results import write_section  # noqa: E402  (torch-free)

TURNS_PER_CONVERSATION = 3


@contextmanager
def database(kind: str, pg_url: str | None, workdir: Path) -> Iterator[Engine]:
    """A fresh, migrated database of `kind`, removed afterwards."""
    if kind == "sqlite":
        engine = create_engine_for(f"sqlite:///{workdir / f'{uuid.uuid4().hex}.db'}")
        upgrade(engine)
        try:
            yield engine
        finally:
            engine.dispose()
        return
    assert pg_url
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
    engine = create_engine_for(url, pool_size=16, max_overflow=4)
    try:
        upgrade(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def writers_rate(engine: Engine, writers: int, seconds: float) -> float:
    """Messages committed per second by `writers` threads writing turns for `seconds`."""
    counts = [0] * writers
    errors: list[str] = []
    start = time.perf_counter() + 0.1
    stop = start + seconds

    def run(w: int) -> None:
        owner = Owner("session", f"bench-{w}")
        conv_id, seq = None, 0
        time.sleep(max(0.0, start - time.perf_counter()))
        while time.perf_counter() < stop:
            try:
                with Session(engine) as s, s.begin():
                    if conv_id is None or seq % 10 == 0:
                        conv_id = create_conversation(s, owner, model_id="bench").id
                    save_turn(s, owner, conv_id, prompt=f"question {seq} from {w}",
                              answer=f"answer {seq} " * 8, settings={"temperature": 0.0},
                              latency_ms=120.0)
                counts[w] += 2
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{type(e).__name__}: {e}")
                conv_id = None
            seq += 1

    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        print(f"  {len(errors)} failed transactions, first: {errors[0]}", file=sys.stderr)
    return sum(counts) / elapsed


def populate(engine: Engine, images: ImageStore, conversations: int, seed: int = 0) -> None:
    """Conversations with images and mixed feedback, inserted in bulk (setup, not timed)."""
    rng = random.Random(seed)
    with Session(engine) as s, s.begin():
        pool = [images.put(s, _picture(i), owner=Owner("session", "bench")) for i in range(20)]
        pool_sha = [p.sha256 for p in pool]
    now = utcnow()
    convs, msgs, links, feedback = [], [], [], []
    mid = 1
    for c in range(conversations):
        cid = uuid.uuid4().hex
        convs.append(dict(id=cid, owner_kind="session", owner_id=f"o{c % 50}",
                          model_id="bench", model_version="1", created_at=now, updated_at=now))
        for t in range(TURNS_PER_CONVERSATION):
            msgs.append(dict(id=mid, conversation_id=cid, position=2 * t, role="user",
                             text=f"question {t} about picture {c}", created_at=now))
            if t == 0:
                links.append(dict(message_id=mid, position=0,
                                  image_sha256=rng.choice(pool_sha)))
            msgs.append(dict(id=mid + 1, conversation_id=cid, position=2 * t + 1,
                             role="assistant", text=f"answer {t} " * 10, created_at=now))
            r = rng.random()
            if r < 0.5:
                rating = "like" if r < 0.3 else "dislike"
                corrected = "a better answer" if 0.3 <= r < 0.4 else None
                feedback.append(dict(message_id=mid + 1, rating=rating, comment="",
                                     corrected=corrected, tags=[], created_at=now,
                                     updated_at=now))
            mid += 2
    with Session(engine) as s, s.begin():
        for model, rows in ((ConversationRow, convs), (MessageRow, msgs),
                            (MessageImageRow, links), (FeedbackRow, feedback)):
            for i in range(0, len(rows), 5000):
                s.execute(insert(model), rows[i:i + 5000])


def _picture(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (i * 12 % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


def export_rate(engine: Engine, workdir: Path, conversations: int) -> float:
    images = ImageStore(workdir / f"images-{uuid.uuid4().hex[:8]}")
    populate(engine, images, conversations)
    out = workdir / f"export-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    with Session(read_only(engine)) as s, s.begin():
        report = export_training_data(s, images, out)
    elapsed = time.perf_counter() - t0
    assert report.conversations == conversations, report
    return conversations / elapsed


def engine_versions(pg_url: str | None) -> list[str]:
    lines = [f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL, BEGIN IMMEDIATE)"]
    if pg_url:
        eng = create_engine(pg_url)
        with eng.connect() as c:
            version = c.execute(text("SHOW server_version")).scalar()
            sync = c.execute(text("SHOW synchronous_commit")).scalar()
        eng.dispose()
        lines.append(f"PostgreSQL {version} on 127.0.0.1 (synchronous_commit={sync})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per writer measurement")
    p.add_argument("--writers", type=int, nargs="+", default=[1, 8])
    p.add_argument("--conversations", type=int, default=2000, help="for the export rate")
    p.add_argument("--pg-url", default=os.environ.get("SPHINX_TEST_PG_URL"))
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = p.parse_args(argv)

    kinds = ["sqlite"] + (["postgresql"] if args.pg_url else [])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
        work = Path(tmp)
        for kind in kinds:
            cells = []
            for n in args.writers:
                with database(kind, args.pg_url, work) as engine:
                    rate = writers_rate(engine, n, args.seconds)
                print(f"{kind}: {n} writer(s): {rate:,.0f} messages/s", flush=True)
                cells.append(f"{rate:,.0f}")
            with database(kind, args.pg_url, work) as engine:
                rate = export_rate(engine, work, args.conversations)
            print(f"{kind}: export: {rate:,.0f} conversations/s", flush=True)
            rows.append(f"| {kind} | " + " | ".join(cells) + f" | {rate:,.0f} |")

    header = ("| engine | " + " | ".join(f"messages/s, {n} writer{'s' * (n > 1)}"
                                         for n in args.writers) + " | export, conversations/s |")
    table = "\n".join([header, "|---|" + "---:|" * (len(args.writers) + 1), *rows])
    notes = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python "
        f"bench/bench_storage.py` on {platform.machine()}, {os.cpu_count()} CPU cores "
        f"(load average {load:.1f} at start: the machine was shared), "
        f"Python {platform.python_version()}.",
        *engine_versions(args.pg_url),
        f"Writers are threads of one process, {args.seconds:g} s each, one turn (2 messages) "
        f"per transaction through `storage.repository.save_turn`. Export: "
        f"{args.conversations} conversations of {TURNS_PER_CONVERSATION} turns, one image "
        f"each (20 distinct), half with feedback, written as JSONL + images.",
        "SQLite runs one write transaction at a time (BEGIN IMMEDIATE; the threads queue on "
        "an in-process lock), so 8 writers store about as much as 1, bounded by the ORM's CPU "
        "time per turn; PostgreSQL overlaps the writers' commits (each waits for its WAL "
        "flush), so it gains from concurrency.",
    ]
    if not args.pg_url:
        notes.append("PostgreSQL not measured: no --pg-url / SPHINX_TEST_PG_URL.")
    section = "## Storage (`bench/bench_storage.py`)\n\n" + table + "\n\n" + "\n".join(
        f"- {n}" for n in notes)
    print()
    print(section)
    if not args.no_write:
        path = write_section("bench_storage", section)
        print(f"\nupdated {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
