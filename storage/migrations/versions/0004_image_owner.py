"""Image ownership: `image_owner` records who uploaded each stored image.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Images are stored once by content hash; before this revision any owner could attach (and so
read back) any stored image by naming its hash, and learn whether a picture had ever been
uploaded. From now on an owner may attach only images they uploaded. Existing attachments
become ownership: every owner whose messages already show an image owns it (dated by their
first such message). An image uploaded but never attached had no recorded uploader; it stays
stored and is attachable again once someone uploads it.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_owner",
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("owner_kind", sa.String(16), nullable=False),
        sa.Column("owner_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("owner_kind IN ('session', 'user')", name=op.f("ck_image_owner_owner_kind")),
        sa.ForeignKeyConstraint(["image_sha256"], ["image.sha256"],
                                name=op.f("fk_image_owner_image_sha256_image")),
        sa.PrimaryKeyConstraint("image_sha256", "owner_kind", "owner_id", name=op.f("pk_image_owner")),
    )
    op.create_index("ix_image_owner_owner", "image_owner", ["owner_kind", "owner_id"])
    op.execute(
        "INSERT INTO image_owner (image_sha256, owner_kind, owner_id, created_at) "
        "SELECT mi.image_sha256, c.owner_kind, c.owner_id, MIN(m.created_at) "
        "FROM message_image mi JOIN message m ON m.id = mi.message_id "
        "JOIN conversation c ON c.id = m.conversation_id "
        "GROUP BY mi.image_sha256, c.owner_kind, c.owner_id"
    )


def downgrade() -> None:
    op.drop_index("ix_image_owner_owner", table_name="image_owner")
    op.drop_table("image_owner")
