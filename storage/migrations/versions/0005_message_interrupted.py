"""An `interrupted` flag on messages: the turn was written ahead and its answer never completed.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

The app stores a chat turn when its prompt is submitted (the answer empty and `interrupted`
true), writes the answer as it streams, and clears the flag when the answer is complete. A
flag still set after a restart means the app died mid-answer. Every existing message was
stored complete, so the column is added with the server default false.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("message") as batch:
        batch.add_column(sa.Column("interrupted", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("message") as batch:
        batch.drop_column("interrupted")
