"""ledger shards: tokens.slot (the package root's hash slot) and the per-shard fencing epochs

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 11:00:00

Existing tokens get their root's slot (see ledger.core.shards.slot_of, repeated here so that this
revision never changes when the code does). Nothing else is rewritten: balances, usage rows,
admin events and alerts are untouched.
"""

from __future__ import annotations

import zlib

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SLOTS = 4096


def upgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slot", sa.Integer(), nullable=False, server_default="0"))
        batch_op.create_index(batch_op.f("ix_tokens_slot"), ["slot"], unique=False)
    conn = op.get_bind()
    roots = [r[0] for r in conn.execute(sa.text("SELECT DISTINCT root_id FROM tokens"))]
    if roots:
        conn.execute(
            sa.text("UPDATE tokens SET slot = :slot WHERE root_id = :root"),
            [{"slot": zlib.crc32(r.encode()) % SLOTS, "root": r} for r in roots],
        )
    op.create_table(
        "ledger_shards",
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.String(length=120), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("shard"),
    )


def downgrade() -> None:
    op.drop_table("ledger_shards")
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tokens_slot"))
        batch_op.drop_column("slot")
