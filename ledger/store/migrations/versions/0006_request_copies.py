"""copies of pending strict admissions: the `request_copies` table (DESIGN §3b, issue 17)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 23:40:00

A strict admission that Ray redelivered to several replicas is one debit with several named
copies; the debit is refunded only when no copy that is still being served is left. 0005 held the
copies in memory only, so a shard rebuilt after a restart let the first settlement decide for all:
a refunded copy could un-charge an answered one, and its unit was served again (simulator seed
14951). Nothing existing is rewritten: a database upgraded from 0005 has no copies recorded, so
its pending admissions keep 0005's rule (the first settlement decides) until they are settled.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_copies",
        sa.Column("row_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("copy", sa.String(length=120), nullable=False),
        sa.PrimaryKeyConstraint("row_id", "copy"),
    )


def downgrade() -> None:
    op.drop_table("request_copies")
