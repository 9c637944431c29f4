"""usage_events.body_hash: a redelivered request id must carry the same body, across restarts

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 07:00:00

Rows written before this revision keep NULL: their body is unknown, and a redelivery of
such a request id is compared by model and units only.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("body_hash", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.drop_column("body_hash")
