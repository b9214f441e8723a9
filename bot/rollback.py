"""Build the plan of a rollback run from the run it undoes.

A rollback runs the runbook's rollback groups that cover the phase the run
failed in. Before them come the inverses of the succeeded steps of those
phases whose executors can undo them, newest first, such as restoring the
previous value of an environment variable.
"""

from __future__ import annotations

from bot.errors import UsageError
from bot.i18n import translate
from bot.plan import Plan, RollbackGroupPlan, Step
from steps import has_executor, load_executor
from storage import RunRecord, StepRecord

ROLLBACK_FROM = ("failed", "aborted")


def build_rollback_plan(run: RunRecord, records: list[StepRecord], locale_title: str) -> Plan:
    if run.kind != "run":
        raise UsageError("rollback.not_a_forward_run", run_id=run.id)
    if run.status not in ROLLBACK_FROM:
        raise UsageError("rollback.wrong_status", run_id=run.id, status=translate(f"status.{run.status}"))

    plan = Plan.model_validate(run.plan)
    phase = run.failed_phase if run.failed_phase is not None else run.current_phase
    groups = [group for group in plan.rollback if phase is not None and phase in group.phases]
    if phase is None and plan.rollback:
        groups = list(plan.rollback)
    covered = {number for group in groups for number in group.phases} or ({phase} if phase is not None else set())

    steps_by_id = {step.id: step for step in plan.steps()}
    inverses: list[Step] = []
    for record in reversed(records):
        step = steps_by_id.get(record.step_id)
        if step is None or record.status != "succeeded" or step.phase not in covered:
            continue
        if not step.automated or not has_executor(step.kind) or step.kind in ("manual", "approval"):
            continue
        if not load_executor(step.kind).has_inverse(step):
            continue
        inverse = step.model_copy(deep=True)
        inverse.id = f"u.{step.id}"
        inverse.title = f"{locale_title}: {step.title}"
        inverse.undoes = step.id
        inverse.requires_approval = False
        inverse.phase = None
        inverses.append(inverse)

    rollback_groups: list[RollbackGroupPlan] = []
    if inverses:
        rollback_groups.append(RollbackGroupPlan(phases=sorted(covered), title=locale_title, source_line=0,
                                                 steps=inverses))
    for group in groups:
        copied = group.model_copy(deep=True)
        for step in copied.steps:
            step.phase = None
        rollback_groups.append(copied)
    if not any(group.steps for group in rollback_groups):
        raise UsageError("rollback.nothing_to_do", run_id=run.id, phase=phase if phase is not None else "-")

    succeeded = {record.step_id for record in records if record.status == "succeeded"}
    undo_lines = sorted({
        step.task_line for step in plan.steps()
        if step.id in succeeded and step.phase in covered and step.task_line is not None and step.automated
    })
    return plan.model_copy(update={"phases": [], "verification": [], "rollback": rollback_groups, "emergency": [],
                                   "undo_task_lines": undo_lines})


def inverse_source(records: list[StepRecord], step: Step) -> dict:
    """Return the stored data of the step an inverse undoes."""
    for record in records:
        if record.step_id == step.undoes:
            return dict(record.data or {})
    return {}
