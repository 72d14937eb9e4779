"""match profiles get a narrow table of their own

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 07:57:04.522284

The profiles stored in `records` are dropped, not moved: they are sealed under
each record's key, which a migration does not hold. Checks make them again as
they meet each record (`server/dedup_check.py`), or a `dedup scan` does at once.
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "match_profiles",
        sa.Column("record_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("profile_seq", sa.BigInteger(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("record_id"),
    )
    # In place (SQLite >= 3.35 drops a column itself): copying every record into
    # a new table, as a batch rebuild would, takes minutes on a large hub.
    with op.batch_alter_table("records", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("match_profile")
        batch_op.drop_column("profile_seq")


def downgrade() -> None:
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("profile_seq", sa.BigInteger(), server_default="-1", nullable=False)
        )
        batch_op.add_column(sa.Column("match_profile", sa.LargeBinary(), nullable=True))
    op.drop_table("match_profiles")
