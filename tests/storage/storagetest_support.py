"""Helpers shared by the storage tests, the writer subprocess and the benchmark.

Torch-free, like `storage`. The writer loop is here (not in a test file) so that threads in
the test process and separate writer processes run exactly the same code.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from PIL import Image
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from storage.models import ConversationRow, MessageRow
from storage.repository import Owner, create_conversation, save_turn

PG_ENV = "SPHINX_TEST_PG_URL"


# --- PostgreSQL: one throwaway schema per test --------------------------------------------
@contextmanager
def pg_schema_url(base_url: str) -> Iterator[str]:
    """A URL whose connections use a fresh schema (dropped afterwards), so tests, processes
    and concurrent runs on the same database never see each other's tables."""
    schema = f"st_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, pool_pre_ping=True)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


# --- images ---------------------------------------------------------------------------
def make_image(width: int = 32, height: int = 24, color: tuple[int, int, int] = (200, 30, 30),
               fmt: str = "PNG", **save_kwargs: object) -> bytes:
    img = Image.new("RGB", (width, height), color)
    img.putpixel((0, 0), (0, 255, 0))  # a marker to check orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


# --- concurrent writers -------------------------------------------------------------------
def writer_owner(writer: str) -> Owner:
    return Owner("session", f"writer-{writer}")


def turn_texts(writer: str, seq: int, rng: random.Random) -> tuple[str, str]:
    noise = "".join(rng.choice("abcxyzé漢字🙂 '\";-") for _ in range(rng.randint(0, 40)))
    return f"{writer}/{seq}/q {noise}", f"{writer}/{seq}/a {noise[::-1]}"


def checksum(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in sorted(texts):
        h.update(t.encode("utf-8") + b"\x00")
    return h.hexdigest()


@dataclass
class WriterResult:
    writer: str
    messages: int = 0
    checksum: str = ""
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def write_until(engine: Engine, writer: str, start_at: float, stop_at: float,
                turns_per_conversation: int = 4, seed: int = 0) -> WriterResult:
    """Write turns (one transaction each, as the app does) from `start_at` to `stop_at`
    (time.time()); returns what was committed. Nothing is retried: any error is a failure."""
    rng = random.Random(seed)
    owner = writer_owner(writer)
    committed: list[str] = []
    result = WriterResult(writer)
    time.sleep(max(0.0, start_at - time.time()))
    seq, conv_id = 0, None
    while time.time() < stop_at:
        try:
            with Session(engine) as s, s.begin():
                if conv_id is None or seq % turns_per_conversation == 0:
                    conv_id = create_conversation(s, owner, model_id="stress").id
                prompt, answer = turn_texts(writer, seq, rng)
                save_turn(s, owner, conv_id, prompt=prompt, answer=answer,
                          settings={"seq": seq}, latency_ms=1.0)
            committed += [prompt, answer]
        except Exception as e:  # noqa: BLE001 - reported, and the test fails on any
            result.errors.append(f"{type(e).__name__}: {str(e).splitlines()[0]}")
            conv_id = None
        seq += 1
    result.messages = len(committed)
    result.checksum = checksum(committed)
    return result


def stored_result(engine: Engine, writer: str) -> WriterResult:
    """What the database holds for one writer, in the same form as `write_until`'s result."""
    owner = writer_owner(writer)
    with Session(engine) as s, s.begin():
        texts = list(s.scalars(
            select(MessageRow.text).join(ConversationRow)
            .where(ConversationRow.owner_kind == owner.kind, ConversationRow.owner_id == owner.id)))
    return WriterResult(writer, len(texts), checksum(texts))


def positions_are_contiguous(engine: Engine) -> bool:
    """Every conversation's messages are numbered 0..n-1 with no gaps."""
    with Session(engine) as s, s.begin():
        rows = s.execute(
            select(MessageRow.conversation_id, func.count(), func.min(MessageRow.position),
                   func.max(MessageRow.position)).group_by(MessageRow.conversation_id)).all()
    return all(lo == 0 and hi == n - 1 for _, n, lo, hi in rows)


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default
