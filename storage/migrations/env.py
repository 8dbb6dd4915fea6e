"""Alembic environment for the store.

Migrations run through `storage.db.upgrade(engine)`, which opens the transaction, takes the
migration lock and hands the connection in `config.attributes["connection"]`; there is no
alembic.ini. Offline (SQL script) mode is not supported.
"""
from __future__ import annotations

from alembic import context

from storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run storage migrations with storage.db.upgrade(engine) "
                       "or `python -m storage migrate`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
