"""`python -m storage {migrate,export,stats}`: maintenance of the conversation store.

    python -m storage [--data-dir DIR] [--db-url URL] migrate [--revision REV]
    python -m storage [...] export --out DIR [--since YYYY-MM-DD] [--only liked|corrected|all]
    python -m storage export --out DIR --from-hub hf://datasets/OWNER/NAME   # what the app's Hub sync pushed
    python -m storage [...] stats [--since YYYY-MM-DD] [--top N] [--json]

The database defaults to SQLite at DATA_DIR/sphinx.db (`SPHINX_DATA_DIR`, default `data`);
`SPHINX_DB_URL` (or --db-url) selects any SQLAlchemy URL. Prefer the environment variable
for URLs with passwords: command lines are visible to other users.
Every failure it can foresee (bad arguments, no database, an unknown revision, an output
folder it may not write into, a database error) prints one `error:` line and exits 2;
anything unforeseen prints one line and exits 1 (`--debug` shows its traceback).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import NoReturn

from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from .db import (StorageError, StorageSettings, check_revision, current_revision, open_store, read_only,
                 refuse_downgrade, upgrade)
from .export import ONLY_CHOICES, export_training_data
from .feedback_folder import export_from_hub
from .stats import collect_stats, format_stats


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"error: {message} (see: python -m storage --help)\n")


def _iso_date(value: str) -> date:
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date YYYY-MM-DD, got {value!r}") from None


MAX_TOP = 10_000


def _positive(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_TOP:
        raise argparse.ArgumentTypeError(f"expected a positive integer up to {MAX_TOP}, got {value[:40]!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m storage", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, help="data folder (default $SPHINX_DATA_DIR or data)")
    p.add_argument("--db-url", help="SQLAlchemy URL (default $SPHINX_DB_URL or SQLite in the "
                                    "data folder)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("migrate", help="create or upgrade the database")
    m.add_argument("--revision", default="head", help="target revision (default head)")

    e = sub.add_parser("export", help="write training data (JSONL + images)")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument("--since", type=_iso_date, help="only conversations updated on/after "
                                                   "this UTC date (YYYY-MM-DD)")
    e.add_argument("--only", choices=ONLY_CHOICES, default="all",
                   help="which turns to keep (default all)")
    e.add_argument("--from-hub", metavar="hf://datasets/OWNER/NAME",
                   help="read a dataset repo the app's Hub sync pushed (through the Hugging Face cache) "
                        "instead of the database")

    s = sub.add_parser("stats", help="conversations and messages per day, likes, worst prompts")
    s.add_argument("--since", type=_iso_date, help="from this UTC date (YYYY-MM-DD)")
    s.add_argument("--top", type=_positive, default=10, help="most-disliked prompts to show")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def _settings(args: argparse.Namespace) -> StorageSettings:
    settings = StorageSettings.from_env()
    if args.data_dir is not None:
        settings = replace(settings, data_dir=args.data_dir)
    if args.db_url:
        settings = replace(settings, url=args.db_url)
    return settings


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.command == "migrate":
        check_revision(args.revision)  # before a database file is created for nothing
        store = open_store(settings, migrate=False)
        try:
            refuse_downgrade(store.engine, args.revision)
            upgrade(store.engine, args.revision)
            print(f"database at revision {current_revision(store.engine)}")
        finally:
            store.dispose()
        return 0

    if args.command == "export" and args.out.exists() and not args.out.is_dir():
        raise StorageError(f"--out {args.out} exists and is not a folder")
    if args.command == "export" and args.from_hub:
        if args.since is not None or args.only != "all":
            raise StorageError("--since and --only select from the database; --from-hub copies the repo's export")
        t0 = time.perf_counter()
        records, images = export_from_hub(args.from_hub, args.out)
        print(f"exported {records} samples, {images} images from {args.from_hub} to {args.out} "
              f"in {time.perf_counter() - t0:.1f}s")
        return 0
    store = open_store(settings, must_exist=True)
    try:
        with Session(read_only(store.engine)) as session, session.begin():
            if args.command == "export":
                t0 = time.perf_counter()
                report = export_training_data(session, store.images, args.out,
                                              since=args.since, only=args.only)
                print(f"exported {report.summary()} to {args.out} "
                      f"in {time.perf_counter() - t0:.1f}s")
                for note in report.notes:
                    print(f"warning: {note}", file=sys.stderr)
            else:
                stats = collect_stats(session, since=args.since, top=args.top)
                print(json.dumps(stats.to_dict(), ensure_ascii=False, indent=2) if args.json
                      else format_stats(stats))
    finally:
        store.dispose()
    return 0


def _one_line(err: BaseException) -> str:
    orig = getattr(err, "orig", None)  # DBAPI error inside a SQLAlchemy wrapper
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(orig if orig is not None else err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (StorageError, SQLAlchemyError, ArgumentError, OSError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last word: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
