"""Tables of the run store. Alembic migrations under storage/migrations create them.

Times are UNIX timestamps in seconds (float), which SQLite and PostgreSQL
store and compare the same way.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("id", String(32), primary_key=True),
    # "run" for a forward run, "rollback" for a run that undoes another.
    Column("kind", String(16), nullable=False, default="run"),
    Column("parent_run_id", String(32), ForeignKey("runs.id"), nullable=True),
    Column("runbook", String(200), nullable=False),
    Column("runbook_path", Text, nullable=False),
    Column("environment", String(100), nullable=False),
    Column("status", String(16), nullable=False),
    Column("plan", JSON, nullable=False),
    Column("started_by", String(200), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("current_phase", Integer, nullable=True),
    Column("failed_phase", Integer, nullable=True),
    Column("failed_step", String(64), nullable=True),
    Column("error", Text, nullable=True),
    Column("abort_requested_by", String(200), nullable=True),
    Column("owner", String(200), nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("options", JSON, nullable=False, default=dict),
)
Index("ix_runs_status", runs.c.status)
Index("ix_runs_runbook_environment", runs.c.runbook, runs.c.environment)

run_steps = Table(
    "run_steps",
    metadata,
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("step_id", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("phase", Integer, nullable=True),
    Column("kind", String(16), nullable=False),
    Column("title", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("output", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("data", JSON, nullable=False, default=dict),
    Column("decided_by", String(200), nullable=True),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(64), nullable=True),
    Column("type", String(64), nullable=False),
    Column("actor", String(200), nullable=True),
    Column("data", JSON, nullable=False, default=dict),
    Column("created_at", Float, nullable=False),
)
Index("ix_events_run_id", events.c.run_id, events.c.id)

approvals = Table(
    "approvals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    # "approval" before a gated step, "manual" for a manual step, "interrupted"
    # for a step that died under a crashed process.
    Column("kind", String(16), nullable=False),
    Column("requested_at", Float, nullable=False),
    Column("decision", String(16), nullable=True),
    Column("decided_by", String(200), nullable=True),
    Column("decided_at", Float, nullable=True),
    UniqueConstraint("run_id", "step_id", "attempt", "kind", name="uq_approvals_step_attempt"),
)

# One row per runbook and environment with an active run: the primary key
# is what makes a second concurrent start fail.
run_locks = Table(
    "run_locks",
    metadata,
    Column("runbook", String(200), primary_key=True),
    Column("environment", String(100), primary_key=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", Float, nullable=False),
)

# One row per failure episode of a forward run. `round` counts the requests
# for a decision. `action` is the decision of the current round, set once by a
# conditional update, so two clicks at once start one action.
incidents = Table(
    "incidents",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    # "open" or "closed"
    Column("status", String(16), nullable=False),
    # failed, timed_out, monitor, interrupted, aborted or rollback_failed
    Column("reason", String(32), nullable=False),
    Column("phase", Integer, nullable=True),
    Column("step_id", String(64), nullable=True),
    Column("round", Integer, nullable=False, default=1),
    # rollback, retry, skip, rerun or acknowledge
    Column("action", String(32), nullable=True),
    Column("action_by", String(200), nullable=True),
    Column("action_at", Float, nullable=True),
    Column("rollback_run_id", String(32), nullable=True),
    # rolled_back, retried or acknowledged
    Column("resolution", String(32), nullable=True),
    Column("closed_by", String(200), nullable=True),
    Column("opened_at", Float, nullable=False),
    Column("closed_at", Float, nullable=True),
    # The Slack message of the incident, once posted.
    Column("channel", String(64), nullable=True),
    Column("ts", String(32), nullable=True),
    Column("data", JSON, nullable=False, default=dict),
)
Index("ix_incidents_run_id", incidents.c.run_id)
Index("ix_incidents_status", incidents.c.status)
