"""Build the view of a run that Slack messages render, from the store's records."""

from __future__ import annotations

import time

from bot.plan import Plan
from bot.slack.blocks import PhaseView, RunView, StepReport
from storage import RunRecord, StepRecord

DONE = ("succeeded", "skipped", "approved")
ACTIVE = ("running", "waiting", "interrupted")


def build_run_view(run: RunRecord, plan: Plan, records: list[StepRecord], now: float | None = None) -> RunView:
    now = time.time() if now is None else now
    by_id = {record.step_id: record for record in records}
    phases: list[PhaseView] = []
    remaining = 0.0
    if run.kind != "run":
        # A rollback or an emergency action has no phases: each of its steps is a line.
        for report in rollback_reports(plan, records, now):
            status = {"succeeded": "done", "approved": "done", "skipped": "done", "failed": "failed",
                      "timed_out": "failed", "rejected": "failed"}.get(report.status, report.status)
            phases.append(PhaseView(number=None, title=f"`{report.step_id}` {report.title}", status=status,
                                    elapsed_seconds=report.seconds or 0.0,
                                    steps_done=1 if status == "done" else 0, steps_total=1))
    for phase in plan.phases:
        phase_records = [by_id[step.id] for step in phase.steps if step.id in by_id]
        done = sum(1 for record in phase_records if record.status in DONE)
        started = [record.started_at for record in phase_records if record.started_at]
        finished = [record.finished_at for record in phase_records if record.finished_at]
        if any(record.status in ("failed", "timed_out", "rejected") for record in phase_records):
            status = "failed"
        elif phase_records and done == len(phase_records):
            status = "done"
        elif any(record.status == "waiting" for record in phase_records):
            status = "waiting"
        elif started:
            status = "running"
        else:
            status = "pending"
        if status in ("done", "failed") and started and finished:
            elapsed = max(finished) - min(started)
        elif started:
            elapsed = now - min(started)
        else:
            elapsed = 0.0
        if status not in ("done", "failed"):
            remaining += max((phase.planned_seconds or 0) - elapsed, 0)
        phases.append(PhaseView(number=phase.number, title=phase.title, status=status,
                                planned_seconds=phase.planned_seconds, elapsed_seconds=elapsed,
                                steps_done=done, steps_total=len(phase_records)))

    current = next((record for record in records if record.status in ACTIVE), None)
    started_at = run.started_at or run.created_at
    finished_at = run.finished_at or now
    return RunView(
        kind=run.kind,
        parent_run_id=run.parent_run_id,
        run_id=run.id,
        runbook=run.runbook,
        environment=run.environment,
        status=run.status,
        started_by=run.started_by,
        phases=phases,
        current_step=f"{current.step_id} {current.title}" if current else None,
        elapsed_seconds=finished_at - started_at,
        remaining_seconds=remaining,
    )


def step_reports(plan: Plan, records: list[StepRecord], phase_number: int | None) -> list[StepReport]:
    by_id = {record.step_id: record for record in records}
    steps = [step for step in plan.steps() if step.phase == phase_number]
    reports = []
    for step in steps:
        record = by_id.get(step.id)
        if record is None:
            continue
        seconds = (record.finished_at - record.started_at) if record.finished_at and record.started_at else None
        reports.append(StepReport(step_id=step.id, title=step.title, status=record.status, seconds=seconds,
                                  output_lines=(record.output or "").splitlines(), error=record.error))
    return reports


def rollback_reports(plan: Plan, records: list[StepRecord], now: float | None = None) -> list[StepReport]:
    """Return a report per step of a rollback or emergency run, in the order they run."""
    now = time.time() if now is None else now
    by_id = {record.step_id: record for record in records}
    reports = []
    for group in plan.rollback:
        for step in group.steps:
            record = by_id.get(step.id)
            if record is None:
                continue
            seconds = None
            if record.started_at:
                seconds = (record.finished_at or now) - record.started_at
            reports.append(StepReport(step_id=step.id, title=step.title, status=record.status, seconds=seconds,
                                      output_lines=(record.output or "").splitlines(), error=record.error))
    return reports
