"""A writer process for the concurrency and crash tests (run as a script, not collected).

    writer_proc.py stress URL WRITER                    -> prints READY once connected, reads
                                                           "START_AT STOP_AT" (time.time())
                                                           from stdin, writes, prints the
                                                           WriterResult as JSON
    writer_proc.py hang URL WRITER                      -> writes inside an open transaction,
                                                           prints READY and its PostgreSQL
                                                           backend pid, waits to be killed
    writer_proc.py loop URL WRITER                      -> commits turns forever, prints READY
                                                           after the first one
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE)]

from sqlalchemy import text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from storage.db import create_engine_for  # noqa: E402
from storage.repository import (  # noqa: E402
    create_conversation,
    save_turn,
    set_feedback,
)
from storagetest_support import write_until, writer_owner  # noqa: E402


def main(argv: list[str]) -> int:
    mode, url, writer = argv[0], argv[1], argv[2]
    engine = create_engine_for(url)
    owner = writer_owner(writer)
    if mode == "stress":
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        print("READY", flush=True)
        start_at, stop_at = map(float, sys.stdin.readline().split())
        result = write_until(engine, writer, start_at, stop_at, seed=sum(map(ord, writer)))
        print(result.to_json(), flush=True)
        return 0
    if mode == "hang":
        s = Session(engine)
        s.begin()
        conv = create_conversation(s, owner, model_id="killed")
        _, bot = save_turn(s, owner, conv.id, prompt="never committed", answer="lost")
        set_feedback(s, owner, bot.id, rating="like")
        s.flush()
        pid = (s.scalar(text("SELECT pg_backend_pid()"))
               if engine.dialect.name == "postgresql" else 0)
        print(f"READY {pid}", flush=True)
        time.sleep(120)
        return 1
    if mode == "loop":
        seq = 0
        while True:
            with Session(engine) as s, s.begin():
                conv = create_conversation(s, owner, model_id="loop")
                for _ in range(3):  # each conversation is written whole or not at all
                    save_turn(s, owner, conv.id, prompt=f"q{seq}", answer=f"a{seq}")
                    seq += 1
            if seq == 3:
                print("READY", flush=True)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
