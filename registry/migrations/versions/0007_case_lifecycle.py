"""case lifecycle: acknowledgements of cases and alerts, and who changed what

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "case_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("case_id", sa.String(length=64), nullable=True),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("alert_id", sa.String(length=26), nullable=True),
        sa.Column("note", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["theft_cases.case_id"],
                                name=op.f("fk_case_events_case_id_theft_cases")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_case_events")),
    )
    op.create_index(op.f("ix_case_events_case_id"), "case_events", ["case_id"])
    with op.batch_alter_table("theft_cases") as batch_op:
        batch_op.add_column(sa.Column("acked_ms", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("acked_by", sa.String(length=100), nullable=True))
    with op.batch_alter_table("alerts") as batch_op:
        batch_op.add_column(sa.Column("acked_ms", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("acked_by", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("alerts") as batch_op:
        batch_op.drop_column("acked_by")
        batch_op.drop_column("acked_ms")
    with op.batch_alter_table("theft_cases") as batch_op:
        batch_op.drop_column("acked_by")
        batch_op.drop_column("acked_ms")
    op.drop_index(op.f("ix_case_events_case_id"), "case_events")
    op.drop_table("case_events")
