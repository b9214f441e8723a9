"""Create incidents: one row per failure episode of a run, with the action a responder chose.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("phase", sa.Integer, nullable=True),
        sa.Column("step_id", sa.String(64), nullable=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("action", sa.String(32), nullable=True),
        sa.Column("action_by", sa.String(200), nullable=True),
        sa.Column("action_at", sa.Float, nullable=True),
        sa.Column("rollback_run_id", sa.String(32), nullable=True),
        sa.Column("resolution", sa.String(32), nullable=True),
        sa.Column("closed_by", sa.String(200), nullable=True),
        sa.Column("opened_at", sa.Float, nullable=False),
        sa.Column("closed_at", sa.Float, nullable=True),
        sa.Column("channel", sa.String(64), nullable=True),
        sa.Column("ts", sa.String(32), nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_index("ix_incidents_run_id", "incidents", ["run_id"])
    op.create_index("ix_incidents_status", "incidents", ["status"])


def downgrade() -> None:
    op.drop_index("ix_incidents_status", table_name="incidents")
    op.drop_index("ix_incidents_run_id", table_name="incidents")
    op.drop_table("incidents")
