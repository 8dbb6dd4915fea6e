"""Feedback history (append-only `feedback_event`, backfilled) and indexes for export/stats.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

Before this revision a feedback change overwrote the previous one. Each existing feedback
row becomes the first event of its history, dated when it was last changed.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback_event",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("rating", sa.String(8), nullable=True),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("corrected", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("rating IS NULL OR rating IN ('like', 'dislike')",
                           name=op.f("ck_feedback_event_rating")),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"], ondelete="CASCADE",
                                name=op.f("fk_feedback_event_message_id_message")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback_event")),
    )
    op.create_index(op.f("ix_feedback_event_message_id"), "feedback_event", ["message_id"])
    op.execute(
        "INSERT INTO feedback_event (message_id, rating, comment, corrected, tags, created_at) "
        "SELECT message_id, rating, comment, corrected, tags, updated_at FROM feedback "
        "ORDER BY updated_at, message_id"
    )
    op.create_index("ix_conversation_updated_at", "conversation", ["updated_at"])
    op.create_index("ix_message_created_at", "message", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_message_created_at", table_name="message")
    op.drop_index("ix_conversation_updated_at", table_name="conversation")
    op.drop_index(op.f("ix_feedback_event_message_id"), table_name="feedback_event")
    op.drop_table("feedback_event")
