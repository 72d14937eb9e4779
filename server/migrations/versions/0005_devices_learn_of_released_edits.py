"""Devices learn of their edits released from quarantine.

An edit parked as record.unknown and applied once its record arrived is noted
with the change-log row that applied it, so the device that sent it hears of
it in its next pull page.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 08:40:02.354583
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "released_edits",
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("hub_seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "hub_seq"),
    )


def downgrade() -> None:
    op.drop_table("released_edits")
