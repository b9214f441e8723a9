"""Durable storage of runs: SQLite by default, PostgreSQL by URL."""

from storage.store import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    IncidentRecord,
    RunRecord,
    StepRecord,
    Store,
    lease_held,
    owner_id,
)

__all__ = ["ACTIVE_STATUSES", "TERMINAL_STATUSES", "IncidentRecord", "RunRecord", "StepRecord", "Store", "lease_held", "owner_id"]
