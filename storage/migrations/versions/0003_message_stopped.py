"""A `stopped` flag on messages: the user stopped generation, so the answer is partial.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Existing messages were never stopped (the app that stops generation arrives with this
revision), so the column is added with the server default false.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("message") as batch:
        batch.add_column(sa.Column("stopped", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("message") as batch:
        batch.drop_column("stopped")
