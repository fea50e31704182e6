"""alerts of other kinds (tamper, impossible_travel): the tag joins the unique key

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch_op:
        batch_op.drop_constraint("uq_alerts_visit", type_="unique")
        batch_op.create_unique_constraint(
            "uq_alerts_visit", ["case_id", "kind", "tag", "station", "visit_first_ms"])


def downgrade() -> None:
    with op.batch_alter_table("alerts") as batch_op:
        batch_op.drop_constraint("uq_alerts_visit", type_="unique")
        batch_op.create_unique_constraint(
            "uq_alerts_visit", ["case_id", "kind", "station", "visit_first_ms"])
