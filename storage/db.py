"""Engines, settings and migrations-on-start.

SQLite is the embedded default: one file in a data folder (e.g. `/data` on a Hugging Face
Space), the images beside it. Any SQLAlchemy URL works; PostgreSQL is tested.

SQLite connections get WAL (readers never block the writer), foreign keys and a busy
timeout. Transactions start with `BEGIN IMMEDIATE`: a writer takes the write lock up
front and waits its turn, instead of starting as a reader and failing with "database is
locked" when it tries to upgrade. Long reads (export, stats) should use `read_only(engine)`,
which begins deferred so they do not hold the write lock.

Sessions are the caller's (`with Session(store.engine) as s, s.begin(): ...`).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicCommandError
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url

from .images import ImageLimits, ImageStore

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
DEFAULT_DB_NAME = "sphinx.db"
_PG_MIGRATION_LOCK = 0x5350_4858  # advisory lock key: one migrator at a time per database
_BEGIN_OPTION = "sphinx_sqlite_begin"


class StorageError(RuntimeError):
    """A storage problem worth a one-line message (missing database, bad settings)."""


@dataclass(frozen=True)
class StorageSettings:
    """Where the store lives. `url=None` means SQLite at `data_dir/sphinx.db`."""

    data_dir: Path = Path("data")
    url: str | None = None
    images_dir: Path | None = None  # default: data_dir/images
    busy_timeout_s: float = 30.0  # SQLite: how long a writer waits for the lock
    sqlite_synchronous: str = "NORMAL"  # WAL + NORMAL survives process crashes
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    @staticmethod
    def from_env(env: Mapping[str, str] = os.environ) -> StorageSettings:
        """`SPHINX_DATA_DIR` (default `data`), `SPHINX_DB_URL` (default SQLite in it)."""
        images = env.get("SPHINX_IMAGES_DIR")
        return StorageSettings(data_dir=Path(env.get("SPHINX_DATA_DIR", "data")),
                               url=env.get("SPHINX_DB_URL") or None,
                               images_dir=Path(images) if images else None)

    @property
    def database_url(self) -> URL:
        if self.url:
            return make_url(self.url)
        return URL.create("sqlite", database=str(self.data_dir / DEFAULT_DB_NAME))

    @property
    def image_root(self) -> Path:
        return self.images_dir if self.images_dir is not None else self.data_dir / "images"


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for other backends or in-memory)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def create_engine_for(url: str | URL, *, busy_timeout_s: float = 30.0,
                      sqlite_synchronous: str = "NORMAL", **kwargs: Any) -> Engine:
    """An engine for any SQLAlchemy URL, with the SQLite settings described above."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    if sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise StorageError(f"bad sqlite_synchronous {sqlite_synchronous!r}")
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"timeout": busy_timeout_s, "check_same_thread": False,
                    **kwargs.pop("connect_args", {})}
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    _install_sqlite_hooks(engine, busy_timeout_s, sqlite_synchronous.upper())
    return engine


class _WriteGate:
    """Queues one engine's SQLite writers on a lock, in this process.

    SQLite's own busy handler makes a waiting writer sleep and retry (1 ms, 2 ms, ... up to
    100 ms); with several threads that starves some writers and wastes most of the time
    asleep. Threads of one process instead wait on this lock, which is released when the
    transaction ends (just before its COMMIT/ROLLBACK, so the next writer may spin on the
    busy handler for a millisecond). Correctness never depends on it: SQLite's lock still
    decides, and other processes still use the busy timeout. If the lock cannot be had
    within the busy timeout, the writer goes ahead without it.
    """

    _KEY = "sphinx_write_gate"

    def __init__(self, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._timeout_s = timeout_s

    def enter(self, info: dict[Any, Any]) -> None:
        if not info.get(self._KEY) and self._lock.acquire(timeout=self._timeout_s):
            info[self._KEY] = True

    def leave(self, info: dict[Any, Any] | None) -> None:
        if info is not None and info.pop(self._KEY, False):
            self._lock.release()


def _install_sqlite_hooks(engine: Engine, busy_timeout_s: float, synchronous: str) -> None:
    gate = _WriteGate(busy_timeout_s)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see below)
        cur = dbapi_connection.cursor()
        _set_wal(cur, busy_timeout_s)
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        if mode == "IMMEDIATE":
            gate.enter(conn.info)
        try:
            conn.exec_driver_sql(f"BEGIN {mode}")
        except BaseException:
            gate.leave(conn.info)
            raise

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _on_end(conn: Any) -> None:
        gate.leave(conn.info)

    @event.listens_for(engine.pool, "checkin")
    @event.listens_for(engine.pool, "invalidate")
    def _on_release(_dbapi_connection: Any, record: Any, *_args: Any) -> None:
        gate.leave(record.info if record is not None else None)  # never leak the lock


def _set_wal(cursor: Any, timeout_s: float) -> None:
    """`PRAGMA journal_mode=WAL`, retried while the database is busy.

    Switching a fresh file to WAL needs a moment of exclusive access, and SQLite answers
    "database is locked" at once, without its busy handler, when another connection is doing
    the same: several processes opening a new store together would fail now and then.
    """
    deadline, delay = time.monotonic() + timeout_s, 0.002
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", sqlite3.SQLITE_BUSY) != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def read_only(engine: Engine) -> Engine:
    """The same engine, but SQLite transactions begin DEFERRED (for long reads)."""
    return engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})


# --- migrations ----------------------------------------------------------------------
def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def known_revisions() -> list[str]:
    return [r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()]


def check_revision(revision: str, *, allow_base: bool = False) -> None:
    """One line instead of alembic's traceback for a revision that does not exist."""
    known = known_revisions()
    if revision in ("head", "heads", *known) or (allow_base and revision == "base"):
        return
    raise StorageError(f"unknown revision {revision!r} (known: head, {', '.join(sorted(known))})")


def refuse_downgrade(engine: Engine, revision: str) -> None:
    """`migrate` only upgrades: a target older than the database is an error, not a silent no-op."""
    current = current_revision(engine)
    if current is None or revision in ("head", "heads", current):
        return
    older = {r.revision for r in ScriptDirectory.from_config(alembic_config()).iterate_revisions(current, "base")}
    if revision in older:
        raise StorageError(f"the database is at revision {current}, newer than {revision}; "
                           "migrate only upgrades (downgrading loses data: use storage.db.downgrade deliberately)")


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (idempotent; safe when several processes start at once)."""
    check_revision(revision)
    _migrate(engine, lambda cfg: command.upgrade(cfg, revision))


def downgrade(engine: Engine, revision: str) -> None:
    check_revision(revision, allow_base=True)
    _migrate(engine, lambda cfg: command.downgrade(cfg, revision))


def _migrate(engine: Engine, run: Callable[[Config], None]) -> None:
    cfg = alembic_config()
    with engine.connect() as conn:
        is_sqlite = conn.dialect.name == "sqlite"
        if is_sqlite:
            # Table rebuilds (batch mode) must not fire ON DELETE CASCADE; the pragma only
            # takes effect outside a transaction, so set it on the raw connection first.
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():  # SQLite: BEGIN IMMEDIATE serialises concurrent migrators
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                 {"k": _PG_MIGRATION_LOCK})
                cfg.attributes["connection"] = conn
                try:
                    run(cfg)
                except AlembicCommandError as e:  # e.g. "upgrade" to a revision older than the database
                    raise StorageError(f"cannot migrate: {str(e).splitlines()[0]}") from None
                if is_sqlite:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if bad:
                        raise StorageError(f"migration left dangling foreign keys: {bad[:3]}")
        finally:
            if is_sqlite:
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


# --- the store -----------------------------------------------------------------------
@dataclass(frozen=True)
class Store:
    """What the app holds: the engine and the image folder. Sessions come from the caller."""

    engine: Engine
    images: ImageStore
    settings: StorageSettings

    def dispose(self) -> None:
        self.engine.dispose()


def open_store(settings: StorageSettings, *, migrate: bool = True,
               must_exist: bool = False) -> Store:
    """Open (and by default upgrade) the store; the app calls this once at start.

    `must_exist=True` refuses to create a new SQLite file (for the CLI's read commands).
    """
    url = settings.database_url
    path = sqlite_path(url)
    if must_exist and path is not None and not path.is_file():
        raise StorageError(f"no database at {path} (start the app or run "
                           "`python -m storage migrate` to create one)")
    engine = create_engine_for(url, busy_timeout_s=settings.busy_timeout_s,
                               sqlite_synchronous=settings.sqlite_synchronous)
    if migrate:
        upgrade(engine)
    return Store(engine, ImageStore(settings.image_root, settings.image_limits), settings)
