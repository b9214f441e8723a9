"""The run store: runs, their steps, an append-only event log, approvals and locks.

Every state change is one transaction that updates a row and appends the
event announcing it, committed before the engine acts on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, event, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bot.errors import ConfigError, RunConflict, RunNotFound, StoreError
from storage.schema import approvals, events, incidents, run_locks, run_steps, runs

HEAD_REVISION = "0002"
# Any constant shared by every postmerge process; it names the advisory lock
# that serializes schema migrations on PostgreSQL.
MIGRATION_LOCK_KEY = 7_042_001
MIGRATIONS = Path(__file__).parent / "migrations"
ACTIVE_STATUSES = ("pending", "running", "waiting", "paused")
TERMINAL_STATUSES = ("completed", "failed", "aborted", "rolled_back")
# A run whose owner has not written a heartbeat for this long may be taken over.
LEASE_SECONDS = 30.0


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def lease_held(run: RunRecord, now: float | None = None) -> bool:
    """Return whether a live owner has the run's lease: its heartbeat is recent and its process still exists."""
    if not run.owner:
        return False
    now = time.time() if now is None else now
    expired = run.heartbeat_at is None or now - run.heartbeat_at > LEASE_SECONDS
    return not expired and owner_alive(run.owner)


def owner_alive(owner: str | None) -> bool:
    """Return whether owner is a live process; owners on other hosts count as alive."""
    if not owner:
        return False
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    # A killed process that its parent has not reaped yet is a zombie: dead all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


@dataclass
class RunRecord:
    id: str
    kind: str
    parent_run_id: str | None
    runbook: str
    runbook_path: str
    environment: str
    status: str
    plan: dict
    started_by: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    current_phase: int | None
    failed_phase: int | None
    failed_step: str | None
    error: str | None
    abort_requested_by: str | None
    owner: str | None
    heartbeat_at: float | None
    options: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


@dataclass
class IncidentRecord:
    id: str
    run_id: str
    status: str
    reason: str
    phase: int | None
    step_id: str | None
    round: int
    action: str | None
    action_by: str | None
    action_at: float | None
    rollback_run_id: str | None
    resolution: str | None
    closed_by: str | None
    opened_at: float
    closed_at: float | None
    channel: str | None
    ts: str | None
    data: dict = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return self.status == "open"


@dataclass
class StepRecord:
    run_id: str
    step_id: str
    position: int
    phase: int | None
    kind: str
    title: str
    status: str
    attempt: int
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    output: str | None
    error: str | None
    data: dict
    decided_by: str | None


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- lifecycle --------------------------------------------------------

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect, tune SQLite for a local file, and migrate the schema to the head."""
        if not url.startswith(("sqlite", "postgresql+asyncpg://")):
            raise ConfigError("store.unsupported_url", url=_safe_url(url))
        try:
            if url.startswith("sqlite"):
                database = url.split("///", 1)[-1]
                if database and database != ":memory:":
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                engine = SyncSQLiteEngine(url)
            else:
                engine = create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)
        except (OSError, SQLAlchemyError) as error:
            raise StoreError("store.unavailable", url=_safe_url(url), error=_first_line(error)) from None
        store = cls(engine)
        try:
            await store.migrate()
        except (OSError, SQLAlchemyError) as error:
            await engine.dispose()
            raise StoreError("store.unavailable", url=_safe_url(url), error=_first_line(error)) from None
        return store

    async def close(self) -> None:
        await self.engine.dispose()

    async def migrate(self) -> None:
        """Bring the schema to the head revision; concurrent processes migrate one at a time."""
        if await self._schema_revision() == HEAD_REVISION:
            return
        if isinstance(self.engine, SyncSQLiteEngine):
            with self.engine.migration_lock():
                if await self._schema_revision() != HEAD_REVISION:
                    async with self.engine.begin() as connection:
                        await connection.run_sync(_upgrade)
            return
        async with self.engine.begin() as connection:
            # The lock is held until this transaction ends, and PostgreSQL runs
            # Alembic's DDL inside the same transaction.
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            await connection.run_sync(_upgrade)

    async def _schema_revision(self) -> str | None:
        async with self.engine.connect() as connection:
            try:
                result = await connection.execute(text("SELECT version_num FROM alembic_version"))
                current = result.scalar()
            except (OperationalError, SQLAlchemyError):
                current = None
            await connection.rollback()
        return current

    # -- runs -------------------------------------------------------------

    async def create_run(
        self,
        plan: dict,
        steps: list[dict],
        *,
        runbook: str,
        runbook_path: str,
        environment: str,
        started_by: str | None,
        kind: str = "run",
        parent_run_id: str | None = None,
        options: dict | None = None,
        lock: bool = True,
    ) -> str:
        """Insert a pending run, its steps and its lock; RunConflict if the lock is held."""
        run_id = secrets.token_hex(4)
        now = time.time()
        try:
            async with self.engine.begin() as connection:
                await connection.execute(
                    insert(runs).values(
                        id=run_id,
                        kind=kind,
                        parent_run_id=parent_run_id,
                        runbook=runbook,
                        runbook_path=runbook_path,
                        environment=environment,
                        status="pending",
                        plan=plan,
                        started_by=started_by,
                        created_at=now,
                        options=options or {},
                    )
                )
                if steps:
                    await connection.execute(
                        insert(run_steps),
                        [
                            dict(
                                run_id=run_id,
                                step_id=step["id"],
                                position=index,
                                phase=step.get("phase"),
                                kind=step["kind"],
                                title=step["title"],
                                status="pending",
                                attempt=0,
                                data={},
                            )
                            for index, step in enumerate(steps)
                        ],
                    )
                if lock:
                    await connection.execute(
                        insert(run_locks).values(runbook=runbook, environment=environment, run_id=run_id, created_at=now)
                    )
                await self._event(connection, run_id, "run.created", actor=started_by, data={"kind": kind})
        except IntegrityError:
            holder = await self.lock_holder(runbook, environment)
            raise RunConflict(
                "store.run_conflict", runbook=runbook, environment=environment, run_id=holder or "?"
            ) from None
        return run_id

    async def lock_holder(self, runbook: str, environment: str) -> str | None:
        async with self.engine.connect() as connection:
            result = await connection.execute(
                select(run_locks.c.run_id).where(
                    and_(run_locks.c.runbook == runbook, run_locks.c.environment == environment)
                )
            )
            return result.scalar()

    async def take_lock(self, run_id: str) -> None:
        """Take the runbook lock again for a run that is being resumed or rolled back."""
        run = await self.get_run(run_id)
        try:
            async with self.engine.begin() as connection:
                await connection.execute(
                    insert(run_locks).values(
                        runbook=run.runbook, environment=run.environment, run_id=run_id, created_at=time.time()
                    )
                )
        except IntegrityError:
            holder = await self.lock_holder(run.runbook, run.environment)
            if holder != run_id:
                raise RunConflict(
                    "store.run_conflict", runbook=run.runbook, environment=run.environment, run_id=holder or "?"
                ) from None

    async def get_run(self, run_id: str) -> RunRecord:
        """Return a run by id or by a unique id prefix."""
        async with self.engine.connect() as connection:
            result = await connection.execute(select(runs).where(runs.c.id.startswith(run_id, autoescape=True)).limit(2))
            rows = result.mappings().all()
        if not rows:
            raise RunNotFound("store.run_not_found", run_id=run_id)
        if len(rows) > 1 and rows[0]["id"] != run_id:
            raise RunNotFound("store.run_ambiguous", run_id=run_id)
        return RunRecord(**rows[0])

    async def list_runs(self, *, active_only: bool = False, limit: int = 50) -> list[RunRecord]:
        query = select(runs).order_by(runs.c.created_at.desc()).limit(limit)
        if active_only:
            query = query.where(runs.c.status.in_(ACTIVE_STATUSES))
        async with self.engine.connect() as connection:
            result = await connection.execute(query)
            return [RunRecord(**row) for row in result.mappings().all()]

    async def update_run(self, run_id: str, *, event_type: str | None = None, actor: str | None = None,
                         event_data: dict | None = None, **values: Any) -> None:
        async with self.engine.begin() as connection:
            if values:
                await connection.execute(update(runs).where(runs.c.id == run_id).values(**values))
            if values.get("status") in TERMINAL_STATUSES:
                await connection.execute(delete(run_locks).where(run_locks.c.run_id == run_id))
            if event_type:
                await self._event(connection, run_id, event_type, actor=actor, data=event_data)

    async def request_abort(self, run_id: str, actor: str) -> bool:
        """Record an abort request once; return False if the run is no longer active."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(runs)
                .where(and_(runs.c.id == run_id, runs.c.status.in_(ACTIVE_STATUSES), runs.c.abort_requested_by.is_(None)))
                .values(abort_requested_by=actor)
            )
            if result.rowcount:
                await self._event(connection, run_id, "run.abort_requested", actor=actor)
            return bool(result.rowcount)

    async def abort_requested(self, run_id: str) -> str | None:
        async with self.engine.connect() as connection:
            result = await connection.execute(select(runs.c.abort_requested_by).where(runs.c.id == run_id))
            return result.scalar()

    # -- leases -----------------------------------------------------------

    async def claim(self, run_id: str, owner: str) -> bool:
        """Take ownership of a run whose owner is gone or whose lease expired."""
        run = await self.get_run(run_id)
        now = time.time()
        if run.owner and run.owner != owner and lease_held(run, now):
            return False
        async with self.engine.begin() as connection:
            condition = runs.c.owner.is_(None) if run.owner is None else runs.c.owner == run.owner
            result = await connection.execute(
                update(runs).where(and_(runs.c.id == run.id, condition)).values(owner=owner, heartbeat_at=now)
            )
            if result.rowcount:
                await self._event(connection, run.id, "run.claimed", actor=owner, data={"previous_owner": run.owner})
            return bool(result.rowcount)

    async def heartbeat(self, run_id: str, owner: str) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(runs).where(and_(runs.c.id == run_id, runs.c.owner == owner)).values(heartbeat_at=time.time())
            )

    async def release(self, run_id: str, owner: str) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(runs).where(and_(runs.c.id == run_id, runs.c.owner == owner)).values(owner=None)
            )

    # -- steps ------------------------------------------------------------

    async def steps(self, run_id: str) -> list[StepRecord]:
        async with self.engine.connect() as connection:
            result = await connection.execute(
                select(run_steps).where(run_steps.c.run_id == run_id).order_by(run_steps.c.position)
            )
            return [StepRecord(**row) for row in result.mappings().all()]

    async def update_step(self, run_id: str, step_id: str, *, event_type: str, actor: str | None = None,
                          event_data: dict | None = None, run_values: dict | None = None, **values: Any) -> None:
        """Change a step (and optionally its run) and append the event, in one transaction."""
        async with self.engine.begin() as connection:
            await connection.execute(
                update(run_steps)
                .where(and_(run_steps.c.run_id == run_id, run_steps.c.step_id == step_id))
                .values(**values)
            )
            if run_values:
                await connection.execute(update(runs).where(runs.c.id == run_id).values(**run_values))
            await self._event(connection, run_id, event_type, step_id=step_id, actor=actor, data=event_data)

    async def checkpoint_step(self, run_id: str, step_id: str, data: dict) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(run_steps)
                .where(and_(run_steps.c.run_id == run_id, run_steps.c.step_id == step_id))
                .values(data=data)
            )

    # -- approvals --------------------------------------------------------

    async def request_decision(self, run_id: str, step_id: str, attempt: int, kind: str) -> int:
        """Create the pending decision for a gate, or return the one that exists."""
        async with self.engine.begin() as connection:
            existing = await connection.execute(
                select(approvals.c.id).where(
                    and_(
                        approvals.c.run_id == run_id,
                        approvals.c.step_id == step_id,
                        approvals.c.attempt == attempt,
                        approvals.c.kind == kind,
                    )
                )
            )
            found = existing.scalar()
            if found is not None:
                return found
            result = await connection.execute(
                insert(approvals).values(
                    run_id=run_id, step_id=step_id, attempt=attempt, kind=kind, requested_at=time.time()
                )
            )
            await self._event(connection, run_id, f"{kind}.requested", step_id=step_id)
            return result.inserted_primary_key[0]

    async def decide(self, approval_id: int, decision: str, actor: str) -> tuple[bool, dict]:
        """Record a decision exactly once; return whether this call decided, and the decision row."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(approvals)
                .where(and_(approvals.c.id == approval_id, approvals.c.decision.is_(None)))
                .values(decision=decision, decided_by=actor, decided_at=time.time())
            )
            row = (await connection.execute(select(approvals).where(approvals.c.id == approval_id))).mappings().one()
            if result.rowcount:
                await self._event(
                    connection, row["run_id"], f"{row['kind']}.decided", step_id=row["step_id"], actor=actor,
                    data={"decision": decision},
                )
            return bool(result.rowcount), dict(row)

    async def get_decision(self, approval_id: int) -> dict:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(approvals).where(approvals.c.id == approval_id))).mappings().first()
        if row is None:
            raise RunNotFound("store.decision_not_found", approval_id=approval_id)
        return dict(row)

    # -- incidents --------------------------------------------------------

    async def open_incident(self, run_id: str, *, reason: str, phase: int | None, step_id: str | None,
                            data: dict, keep_rollback: bool = True) -> tuple[IncidentRecord, bool]:
        """Open an incident for a run, or start a new round of its open one; return it and whether it needs a decision.

        With keep_rollback, an open incident whose rollback was chosen keeps
        that decision: the failure that follows is the run stopping for the
        rollback. A failed rollback passes keep_rollback=False to ask again.
        """
        now = time.time()
        async with self.engine.begin() as connection:
            found = (await connection.execute(
                select(incidents).where(and_(incidents.c.run_id == run_id, incidents.c.status == "open"))
                .order_by(incidents.c.opened_at.desc()).limit(1)
            )).mappings().first()
            if found is not None and found["action"] == "rollback" and keep_rollback:
                return IncidentRecord(**found), False
            if found is not None:
                await connection.execute(
                    update(incidents).where(incidents.c.id == found["id"]).values(
                        reason=reason, phase=phase, step_id=step_id, round=found["round"] + 1, action=None,
                        action_by=None, action_at=None, data=data)
                )
                incident_id = found["id"]
                await self._event(connection, run_id, "incident.reopened", step_id=step_id,
                                  data={"incident": incident_id, "reason": reason, "round": found["round"] + 1})
            else:
                incident_id = secrets.token_hex(4)
                await connection.execute(insert(incidents).values(
                    id=incident_id, run_id=run_id, status="open", reason=reason, phase=phase, step_id=step_id,
                    round=1, opened_at=now, data=data))
                await self._event(connection, run_id, "incident.opened", step_id=step_id,
                                  data={"incident": incident_id, "reason": reason, "phase": phase})
            row = (await connection.execute(select(incidents).where(incidents.c.id == incident_id))).mappings().one()
        return IncidentRecord(**row), True

    async def get_incident(self, incident_id: str) -> IncidentRecord:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(incidents).where(incidents.c.id == incident_id))).mappings().first()
        if row is None:
            raise RunNotFound("store.incident_not_found", incident_id=incident_id)
        return IncidentRecord(**row)

    async def incident_of_run(self, run_id: str) -> IncidentRecord | None:
        """Return the run's latest incident, open or closed."""
        async with self.engine.connect() as connection:
            row = (await connection.execute(
                select(incidents).where(incidents.c.run_id == run_id).order_by(incidents.c.opened_at.desc()).limit(1)
            )).mappings().first()
        return IncidentRecord(**row) if row else None

    async def list_incidents(self, *, open_only: bool = False, limit: int = 100) -> list[IncidentRecord]:
        query = select(incidents).order_by(incidents.c.opened_at.desc()).limit(limit)
        if open_only:
            query = query.where(incidents.c.status == "open")
        async with self.engine.connect() as connection:
            return [IncidentRecord(**row) for row in (await connection.execute(query)).mappings().all()]

    async def take_incident_action(self, incident_id: str, round_number: int, action: str,
                                   actor: str) -> tuple[bool, IncidentRecord]:
        """Record the action of an open incident's round exactly once; return whether this call won, and the row."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(incidents).where(and_(incidents.c.id == incident_id, incidents.c.round == round_number,
                                             incidents.c.status == "open", incidents.c.action.is_(None)))
                .values(action=action, action_by=actor, action_at=time.time())
            )
            row = (await connection.execute(select(incidents).where(incidents.c.id == incident_id))).mappings().first()
            if row is None:
                raise RunNotFound("store.incident_not_found", incident_id=incident_id)
            if result.rowcount:
                await self._event(connection, row["run_id"], "incident.action", actor=actor,
                                  data={"incident": incident_id, "action": action, "round": round_number})
        return bool(result.rowcount), IncidentRecord(**row)

    async def update_incident(self, incident_id: str, *, event_type: str | None = None, actor: str | None = None,
                              event_data: dict | None = None, **values: Any) -> None:
        async with self.engine.begin() as connection:
            if values:
                await connection.execute(update(incidents).where(incidents.c.id == incident_id).values(**values))
            if event_type:
                run_id = (await connection.execute(
                    select(incidents.c.run_id).where(incidents.c.id == incident_id))).scalar()
                await self._event(connection, run_id, event_type, actor=actor,
                                  data={"incident": incident_id, **(event_data or {})})

    async def close_incident(self, incident_id: str, resolution: str, actor: str | None) -> bool:
        """Close an open incident once; return False if it was already closed."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(incidents).where(and_(incidents.c.id == incident_id, incidents.c.status == "open"))
                .values(status="closed", resolution=resolution, closed_by=actor, closed_at=time.time())
            )
            if result.rowcount:
                run_id = (await connection.execute(
                    select(incidents.c.run_id).where(incidents.c.id == incident_id))).scalar()
                await self._event(connection, run_id, "incident.closed", actor=actor,
                                  data={"incident": incident_id, "resolution": resolution})
        return bool(result.rowcount)

    # -- events -----------------------------------------------------------

    async def append_event(self, run_id: str, event_type: str, *, step_id: str | None = None,
                           actor: str | None = None, data: dict | None = None) -> None:
        async with self.engine.begin() as connection:
            await self._event(connection, run_id, event_type, step_id=step_id, actor=actor, data=data)

    async def events(self, run_id: str) -> list[dict]:
        async with self.engine.connect() as connection:
            result = await connection.execute(select(events).where(events.c.run_id == run_id).order_by(events.c.id))
            return [dict(row) for row in result.mappings().all()]

    async def events_of_type(self, run_id: str, event_type: str) -> list[dict]:
        """Return the run's events of one type, oldest first."""
        query = select(events).where(and_(events.c.run_id == run_id, events.c.type == event_type)).order_by(events.c.id)
        async with self.engine.connect() as connection:
            return [dict(row) for row in (await connection.execute(query)).mappings().all()]

    async def last_event(self, run_id: str, event_type: str) -> dict | None:
        """Return the run's most recent event of a type, or None."""
        query = (select(events).where(and_(events.c.run_id == run_id, events.c.type == event_type))
                 .order_by(events.c.id.desc()).limit(1))
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).mappings().first()
        return dict(row) if row else None

    async def count_events(self, run_id: str) -> int:
        async with self.engine.connect() as connection:
            result = await connection.execute(select(func.count()).select_from(events).where(events.c.run_id == run_id))
            return int(result.scalar() or 0)

    @staticmethod
    async def _event(connection: AsyncConnection, run_id: str, event_type: str, *, step_id: str | None = None,
                     actor: str | None = None, data: dict | None = None) -> None:
        await connection.execute(
            insert(events).values(
                run_id=run_id, step_id=step_id, type=event_type, actor=actor, data=data or {}, created_at=time.time()
            )
        )

    async def runs_needing_owner(self) -> list[RunRecord]:
        """Return active runs whose owner is gone, for a bot that restarts."""
        now = time.time()
        async with self.engine.connect() as connection:
            result = await connection.execute(
                select(runs).where(
                    and_(
                        runs.c.status.in_(ACTIVE_STATUSES),
                        or_(runs.c.owner.is_(None), runs.c.heartbeat_at < now - LEASE_SECONDS),
                    )
                )
            )
            return [RunRecord(**row) for row in result.mappings().all()]


class _SyncConnection:
    """An AsyncConnection look-alike over a synchronous SQLAlchemy connection."""

    def __init__(self, connection) -> None:
        self._connection = connection
        self.dialect = connection.dialect

    async def execute(self, statement, parameters=None):
        return self._connection.execute(statement, parameters)

    async def run_sync(self, function, *args):
        return function(self._connection, *args)

    async def rollback(self) -> None:
        self._connection.rollback()


class _SyncContext:
    def __init__(self, opener) -> None:
        self._opener = opener
        self._context = None

    async def __aenter__(self) -> _SyncConnection:
        self._context = self._opener()
        return _SyncConnection(self._context.__enter__())

    async def __aexit__(self, *exc_info) -> bool | None:
        return self._context.__exit__(*exc_info)


class SyncSQLiteEngine:
    """Run SQLite statements synchronously on the event loop's thread.

    A local SQLite transaction of the store takes about 0.3 ms this way and
    about 1.2 ms through aiosqlite's worker thread (bench/engine_overhead.py,
    2 cores, x86_64), and the engine writes two per step.
    NOTE: a statement that waits for another process's write lock blocks the
    event loop while it waits, for at most busy_timeout. The store's own
    transactions hold the lock for milliseconds.
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        sync_url = url.replace("sqlite+aiosqlite://", "sqlite://", 1)
        # Every transaction ends in COMMIT or ROLLBACK, so the pool need not roll back again.
        self.sync_engine = create_engine(sync_url, connect_args={"timeout": 30}, pool_reset_on_return=None)
        event.listen(self.sync_engine, "connect", _tune_sqlite)

    @contextlib.contextmanager
    def migration_lock(self):
        """Hold an exclusive file lock beside the database while one process migrates it."""
        database = self.sync_engine.url.database
        if not database or database == ":memory:":
            yield
            return
        with open(f"{database}.migrate-lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def begin(self) -> _SyncContext:
        return _SyncContext(self.sync_engine.begin)

    def connect(self) -> _SyncContext:
        return _SyncContext(self.sync_engine.connect)

    async def dispose(self) -> None:
        self.sync_engine.dispose()


def _tune_sqlite(dbapi_connection, _record) -> None:
    # WAL with synchronous=NORMAL keeps every committed transaction across a
    # process crash (the case the engine must survive) and skips the fsync
    # per commit; a power loss may drop the last commits.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _upgrade(sync_connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = sync_connection
    command.upgrade(config, "head")


def _safe_url(url: str) -> str:
    """Hide the password of a database URL, and the async driver name added to it, before it is shown."""
    import re

    displayed = re.sub(r"^(postgresql|sqlite)\+(asyncpg|aiosqlite)://", r"\1://", url)
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", displayed)


def _first_line(error: BaseException) -> str:
    message = str(getattr(error, "orig", None) or error)
    return message.splitlines()[0] if message else type(error).__name__
