"""Incidents: what a failed run opens, which actions responders may take, and what each one does.

An incident belongs to a forward run. It opens when the run fails (a failed
or timed-out step, a monitor breach), when it is aborted during a traffic
phase, or when a step that is not safe to repeat was interrupted. Each
request for a decision is a round. The store records one action per round,
however many people press at once. It closes when the run is rolled
back, when the run completes after a retry, skip or re-run, or when someone
acknowledges it.

The Slack bot and the terminal both use this module; only how they show the
incident and drive the runs differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from bot.errors import UsageError
from bot.i18n import translate
from bot.plan import Plan, Step
from storage import IncidentRecord, RunRecord, StepRecord, Store

ACTIONS = ("rollback", "retry", "skip", "rerun", "acknowledge")
RESOLUTIONS = ("rolled_back", "retried", "acknowledged")
TAIL_LINES = 20
# Readings a monitor failure reports, in the order they are shown.
READING_KEYS = ("p95_ms", "p99_ms", "error_rate_percent", "throughput_rps", "requests", "seconds")


def traffic_phase(plan: Plan, phase: int | None) -> bool:
    """Return whether a phase shifts traffic, so that stopping in it leaves users on a mixed split."""
    return any(step.kind in ("traffic", "monitor") for step in plan.steps() if step.phase == phase and phase is not None)


def failure_reason(status: str, step: Step | None) -> str:
    if status == "aborted":
        return "aborted"
    if step is not None and step.kind == "monitor":
        return "monitor"
    return "timed_out" if status == "timed_out" else "failed"


def rerun_phase_of(incident: IncidentRecord, plan: Plan) -> int | None:
    """Return the phase that the incident's "run the phase again" button runs, if the runbook offers one."""
    if incident.phase is None or incident.reason in ("rollback_failed", "interrupted"):
        return None
    for group in plan.rollback:
        if incident.phase in group.phases and group.rerun_phase is not None:
            return group.rerun_phase
    return incident.phase if traffic_phase(plan, incident.phase) else None


def allowed_actions(incident: IncidentRecord, plan: Plan) -> list[str]:
    """Return the actions the incident's current round offers, in the order of its buttons."""
    if not incident.open or incident.action is not None:
        return []
    actions = []
    if incident.reason != "rollback_failed":
        actions.append("rollback")
    if incident.reason in ("failed", "timed_out", "interrupted", "rollback_failed"):
        actions += ["retry", "skip"]
    if rerun_phase_of(incident, plan) is not None:
        actions.append("rerun")
    actions.append("acknowledge")
    return actions


def emergency_steps(plan: Plan) -> list[Step]:
    """Return the emergency actions under 緊急時 that postmerge can carry out."""
    return [step for step in plan.emergency if step.automated]


def check_action(incident: IncidentRecord, plan: Plan, action: str, locale: str | None = None,
                 name: Callable[[str | None], str] = lambda actor: actor or "-") -> None:
    """Raise UsageError naming what happened when the incident does not offer action now.

    name formats the person who acted, such as a Slack mention.
    """
    if not incident.open:
        raise UsageError("incident.closed_already", incident_id=incident.id,
                         resolution=translate(f"incident.resolution_{incident.resolution}", locale),
                         actor=name(incident.closed_by))
    if incident.action is not None:
        raise UsageError("incident.acted_already", incident_id=incident.id,
                         action=translate(f"incident.action_{incident.action}", locale), actor=name(incident.action_by),
                         at=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(incident.action_at or 0)))
    if action not in allowed_actions(incident, plan):
        raise UsageError("incident.action_not_offered", incident_id=incident.id,
                         action=translate(f"incident.action_{action}", locale),
                         reason=translate(f"incident.reason_{incident.reason}", locale))


def failure_details(run: RunRecord, records: list[StepRecord], step_id: str | None) -> dict:
    """Collect what an incident shows about the failed step: error, output tail, duration and readings."""
    record = next((item for item in records if item.step_id == step_id), None)
    details: dict = {"runbook": run.runbook, "environment": run.environment, "started_by": run.started_by,
                     "error": run.error}
    if record is None:
        return details
    seconds = None
    if record.started_at:
        seconds = round((record.finished_at or time.time()) - record.started_at, 1)
    output = (record.output or "").splitlines()
    details.update(step_title=record.title, step_kind=record.kind, seconds=seconds,
                   tail=output[-TAIL_LINES:], error=record.error or run.error)
    failure = (record.data or {}).get("failure") or {}
    readings = failure.get("window_readings") or failure.get("readings")
    if isinstance(readings, dict):
        details["readings"] = {key: readings[key] for key in READING_KEYS if readings.get(key) is not None}
    if failure.get("traffic_reset_seconds") is not None:
        details["traffic_reset_seconds"] = failure["traffic_reset_seconds"]
    return details


async def open_for_run(store: Store, run_id: str, status: str, step: Step | None) -> tuple[IncidentRecord, bool]:
    """Open the incident of a run that failed or was aborted; return it and whether it needs a new decision."""
    run = await store.get_run(run_id)
    records = await store.steps(run.id)
    step_id = step.id if step is not None else run.failed_step
    if step_id is None and status == "aborted":
        stopped = next((record for record in records if record.status in ("rejected", "failed", "running")), None)
        step_id = stopped.step_id if stopped else None
    data = failure_details(run, records, step_id)
    traffic = await store.last_event(run.id, "traffic.changed")
    if traffic is not None:
        data["traffic_weight"] = (traffic["data"] or {}).get("weight")
    phase = step.phase if step is not None and step.phase is not None else (run.failed_phase or run.current_phase)
    return await store.open_incident(run.id, reason=failure_reason(status, step), phase=phase, step_id=step_id,
                                     data=data)


async def open_for_interrupted(store: Store, run_id: str, step: Step, approval_id: int) -> tuple[IncidentRecord, bool]:
    """Open the incident of a step that died with its process and may not run again without a person."""
    current = await store.incident_of_run(run_id)
    if current is not None and current.open and current.data.get("approval_id") == approval_id:
        # The bot restarted again while the same question was open.
        return current, False
    run = await store.get_run(run_id)
    data = failure_details(run, await store.steps(run.id), step.id)
    data["approval_id"] = approval_id
    return await store.open_incident(run.id, reason="interrupted", phase=step.phase, step_id=step.id, data=data)


async def open_for_failed_rollback(store: Store, rollback: RunRecord, step: Step | None) -> tuple[IncidentRecord, bool] | None:
    """Ask the parent run's incident for a decision again when its rollback failed; None if it has no open incident."""
    incident = await store.incident_of_run(rollback.parent_run_id or "")
    if incident is None or not incident.open:
        return None
    rollback = await store.get_run(rollback.id)
    data = dict(incident.data)
    data.update(failure_details(rollback, await store.steps(rollback.id), step.id if step else rollback.failed_step))
    data["rollback_run_id"] = rollback.id
    return await store.open_incident(incident.run_id, reason="rollback_failed", phase=incident.phase,
                                     step_id=step.id if step else rollback.failed_step, data=data,
                                     keep_rollback=False)


async def close_if_settled(store: Store, incident: IncidentRecord) -> bool:
    """Close an open incident whose run was already rolled back or completed; return whether it closed.

    The engine closes the incident right after it finishes the run. This
    catches a process that died between the two.
    """
    if not incident.open:
        return False
    run = await store.get_run(incident.run_id)
    if run.status == "rolled_back":
        actor = incident.action_by
        if incident.rollback_run_id:
            actor = (await store.get_run(incident.rollback_run_id)).started_by or actor
        return await store.close_incident(incident.id, "rolled_back", actor)
    if run.status == "completed":
        return await store.close_incident(incident.id, "retried", incident.action_by)
    return False


@dataclass
class IncidentView:
    """Everything a message or a terminal line about an incident needs, read from the store."""

    incident: IncidentRecord
    run: RunRecord
    plan: Plan
    rollback_preview: list[Step]
    actions: list[str]
    emergency: list[Step]
    rerun_phase: int | None
    emergency_done: dict[str, tuple[str, float]]


async def incident_view(store: Store, incident: IncidentRecord, locale: str) -> IncidentView:
    from bot.rollback import build_rollback_plan, rollback_steps

    run = await store.get_run(incident.run_id)
    plan = Plan.model_validate(run.plan)
    try:
        preview = rollback_steps(build_rollback_plan(run, await store.steps(run.id),
                                                     translate("rollback.inverse_title", locale), check_status=False,
                                                     locale=locale))
    except UsageError:
        preview = []
    emergency_done = {}
    for event in await store.events_of_type(run.id, "incident.emergency"):
        if (event["data"] or {}).get("incident") == incident.id:
            emergency_done[event["data"]["step_id"]] = (event["actor"] or "-", event["created_at"])
    return IncidentView(incident=incident, run=run, plan=plan, rollback_preview=preview,
                        actions=allowed_actions(incident, plan), emergency=emergency_steps(plan),
                        rerun_phase=rerun_phase_of(incident, plan), emergency_done=emergency_done)
