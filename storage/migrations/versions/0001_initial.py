"""Initial schema: conversations, messages, images, current feedback.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "conversation",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner_kind", sa.String(16), nullable=False),
        sa.Column("owner_id", sa.String(128), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(100), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint("owner_kind IN ('session', 'user')",
                           name=op.f("ck_conversation_owner_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversation")),
    )
    op.create_index("ix_conversation_owner", "conversation",
                    ["owner_kind", "owner_id", "updated_at"])
    op.create_table(
        "image",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(8), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint("format IN ('jpeg', 'png')", name=op.f("ck_image_format")),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_image")),
    )
    op.create_table(
        "message",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("conversation_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("boxes", sa.JSON(), nullable=True),
        sa.Column("settings", sa.JSON(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        _ts("created_at"),
        sa.CheckConstraint("role IN ('system', 'user', 'assistant')",
                           name=op.f("ck_message_role")),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversation.id"], ondelete="CASCADE",
                                name=op.f("fk_message_conversation_id_conversation")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message")),
        sa.UniqueConstraint("conversation_id", "position",
                            name=op.f("uq_message_conversation_id")),
    )
    op.create_table(
        "message_image",
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"], ondelete="CASCADE",
                                name=op.f("fk_message_image_message_id_message")),
        sa.ForeignKeyConstraint(["image_sha256"], ["image.sha256"],
                                name=op.f("fk_message_image_image_sha256_image")),
        sa.PrimaryKeyConstraint("message_id", "position", name=op.f("pk_message_image")),
    )
    op.create_index(op.f("ix_message_image_image_sha256"), "message_image", ["image_sha256"])
    op.create_table(
        "feedback",
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("rating", sa.String(8), nullable=True),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("corrected", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint("rating IS NULL OR rating IN ('like', 'dislike')",
                           name=op.f("ck_feedback_rating")),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"], ondelete="CASCADE",
                                name=op.f("fk_feedback_message_id_message")),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_feedback")),
    )


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_index(op.f("ix_message_image_image_sha256"), table_name="message_image")
    op.drop_table("message_image")
    op.drop_table("message")
    op.drop_table("image")
    op.drop_index("ix_conversation_owner", table_name="conversation")
    op.drop_table("conversation")
