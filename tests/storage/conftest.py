"""Fixtures for the storage suite: every engine test runs on SQLite and, when
SPHINX_TEST_PG_URL is set (`.ci/postgres.sh` starts a server), on PostgreSQL."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for p in (str(REPO), str(HERE)):  # works with any pytest --import-mode
    if p not in sys.path:
        sys.path.insert(0, p)

from storage.db import Store, StorageSettings, open_store  # noqa: E402
from storagetest_support import PG_ENV, pg_schema_url  # noqa: E402

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database of each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'sphinx.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (run .ci/postgres.sh and export it)")
    with pg_schema_url(base) as url:
        yield url


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> StorageSettings:
    return StorageSettings(data_dir=tmp_path / "data", url=db_url)


@pytest.fixture
def store(settings: StorageSettings) -> Iterator[Store]:
    """A migrated store with its image folder."""
    s = open_store(settings)
    yield s
    s.dispose()
