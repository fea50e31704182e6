"""station uptime: transitions history, per-station timeout, last read

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "station_transitions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("station", sa.String(length=64), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("up", sa.Boolean(), nullable=False),
        sa.Column("cause", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_station_transitions")),
    )
    op.create_index("ix_station_transitions_station_at", "station_transitions",
                    ["station", "at_ms"])
    op.create_index("ix_station_transitions_at", "station_transitions", ["at_ms"])
    with op.batch_alter_table("stations") as batch_op:
        batch_op.add_column(sa.Column("last_read_ms", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("timeout_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stations") as batch_op:
        batch_op.drop_column("timeout_s")
        batch_op.drop_column("last_read_ms")
    op.drop_index("ix_station_transitions_at", "station_transitions")
    op.drop_index("ix_station_transitions_station_at", "station_transitions")
    op.drop_table("station_transitions")
