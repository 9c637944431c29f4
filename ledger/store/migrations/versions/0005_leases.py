"""quota leases: the `leases` table (DESIGN §3a)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 14:00:00

A lease escrows units of a token for one ingress replica. Nothing existing is rewritten: a
database upgraded from 0004 has no leases, so every token's `leased` is 0 and its balances,
usage rows, admin events and alerts are exactly as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("token_id", sa.String(length=40), nullable=False),
        sa.Column("root_id", sa.String(length=40), nullable=False),
        sa.Column("holder", sa.String(length=120), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("granted_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_leases_token_id"), "leases", ["token_id"], unique=False)
    op.create_index(op.f("ix_leases_root_id"), "leases", ["root_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_leases_root_id"), table_name="leases")
    op.drop_index(op.f("ix_leases_token_id"), table_name="leases")
    op.drop_table("leases")
