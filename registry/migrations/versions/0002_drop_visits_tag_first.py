"""drop ix_visits_tag_first: uq_visits_tag_station_first already leads with tag

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("visits") as batch_op:
        batch_op.drop_index("ix_visits_tag_first")


def downgrade() -> None:
    with op.batch_alter_table("visits") as batch_op:
        batch_op.create_index("ix_visits_tag_first", ["tag", "first_ms"], unique=False)
