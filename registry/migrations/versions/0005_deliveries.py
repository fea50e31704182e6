"""deliveries: alerts to webhooks, retried until delivered or dead-lettered

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("alert_id", sa.String(length=26), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("next_ms", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("delivered_ms", sa.BigInteger(), nullable=True),
        sa.Column("dead_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=False),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.alert_id"],
                                name=op.f("fk_deliveries_alert_id_alerts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint("alert_id", "channel", name="uq_deliveries_alert_channel"),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["channel", "next_ms"],
                    sqlite_where=sa.text("delivered_ms IS NULL AND dead_ms IS NULL"),
                    postgresql_where=sa.text("delivered_ms IS NULL AND dead_ms IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_deliveries_due", "deliveries")
    op.drop_table("deliveries")
