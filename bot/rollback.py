"""Build the plan of a rollback run from the run it undoes, and of an emergency action.

A rollback runs the runbook's rollback groups that cover the phase the run
failed in. Before them come the inverses of the succeeded steps of those
phases whose executors can undo them, newest first, such as restoring the
previous value of an environment variable. Log collection steps of the
groups run first of all, while the objects they read still exist. A step
of a rollback group that nothing can undo, such as `pg_restore`, waits for
an approval first.
"""

from __future__ import annotations

import re

from bot.errors import UsageError
from bot.i18n import translate
from bot.plan import Plan, RollbackGroupPlan, Step
from steps import has_executor, load_executor
from storage import RunRecord, StepRecord

ROLLBACK_FROM = ("failed", "aborted")
# Shell commands that only look, so a rollback runs them without asking.
_CHECK_WORDS = re.compile(r"verify|check|status|検証|確認|チェック", re.I)
_SIGNAL = re.compile(r"^kill\s+-\w+\s+<pid>$")


def build_rollback_plan(run: RunRecord, records: list[StepRecord], locale_title: str, *,
                        check_status: bool = True, locale: str | None = None) -> Plan:
    """Return the rollback plan of a failed or aborted run; with check_status=False, of any run, to preview it."""
    if run.kind != "run":
        raise UsageError("rollback.not_a_forward_run", run_id=run.id)
    if check_status and run.status not in ROLLBACK_FROM:
        raise UsageError("rollback.wrong_status", run_id=run.id, status=translate(f"status.{run.status}", locale))

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

    # Logs are collected before anything is deleted, or nothing would be left to collect.
    evidence: list[Step] = []
    copied_groups = []
    for group in groups:
        copied = group.model_copy(deep=True)
        evidence += [step for step in copied.steps if collects_logs(step)]
        copied.steps = [step for step in copied.steps if not collects_logs(step)]
        copied_groups.append(copied)

    rollback_groups: list[RollbackGroupPlan] = []
    if evidence:
        for step in evidence:
            step.phase = None
        rollback_groups.append(RollbackGroupPlan(phases=sorted(covered), title=translate("rollback.evidence_title", locale),
                                                 source_line=evidence[0].source_line, steps=evidence))
    if inverses:
        rollback_groups.append(RollbackGroupPlan(phases=sorted(covered), title=locale_title, source_line=0,
                                                 steps=inverses))
    for copied in copied_groups:
        for step in copied.steps:
            step.phase = None
            if cannot_be_undone(step):
                step.requires_approval = True
                step.approval_note = translate("rollback.cannot_undo_note", locale)
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


def collects_logs(step: Step) -> bool:
    """Return whether a step reads the logs of pods, which a rollback runs before anything is deleted."""
    if step.kind != "kubernetes" or not step.automated:
        return False
    from steps.kubernetes import action_of

    return action_of(step) == "logs"


def cannot_be_undone(step: Step) -> bool:
    """Return whether an automated step changes something that no executor can put back.

    Reads (sql, logs, GET requests, checks), signals to a step's own process,
    and traffic sent back to green are safe. A step whose executor has an
    inverse can be undone.
    """
    if not step.automated or step.kind in ("manual", "approval", "sql", "monitor", "traffic"):
        return False
    if not has_executor(step.kind):
        return False
    executor = load_executor(step.kind)
    if executor.has_inverse(step):
        return False
    if step.kind == "http":
        return executor.repeat_safe(step) is False
    if step.kind == "kubernetes":
        from steps.kubernetes import action_of

        return action_of(step) not in ("logs", "wait_pods")
    if step.kind == "datadog":
        return step.params.get("action") != "readings"
    if step.kind == "nginx":
        return step.params.get("action") != "reload"
    command = step.run_command or (step.commands[0] if step.commands else "")
    original = step.commands[0] if step.commands else ""
    if _SIGNAL.match(command.strip()) or _CHECK_WORDS.search(original or command):
        return False
    return True


def rollback_steps(plan: Plan) -> list[Step]:
    """Return the steps of a rollback or emergency plan in the order they run."""
    return [step for group in plan.rollback for step in group.steps]


def build_emergency_plan(run: RunRecord, number: int, locale_title: str) -> Plan:
    """Return a one-step plan that carries out the emergency action e.N of a run's runbook."""
    plan = Plan.model_validate(run.plan)
    step = next((item for item in plan.emergency if item.id == f"e.{number}"), None)
    if step is None:
        listed = ", ".join(f"{item.id.removeprefix('e.')}: {item.title}" for item in plan.emergency) or "-"
        raise UsageError("rollback.unknown_emergency", run_id=run.id, number=number, listed=listed)
    if not step.automated:
        instructions = " ".join(step.instructions) or step.title
        raise UsageError("rollback.emergency_not_automated", step_id=step.id, title=step.title, what=instructions)
    copied = step.model_copy(deep=True)
    copied.phase = None
    copied.requires_approval = False
    group = RollbackGroupPlan(phases=[], title=locale_title, source_line=step.source_line, steps=[copied])
    return plan.model_copy(update={"phases": [], "verification": [], "rollback": [group], "emergency": [],
                                   "undo_task_lines": []})


def inverse_source(records: list[StepRecord], step: Step) -> dict:
    """Return the stored data of the step an inverse undoes."""
    for record in records:
        if record.step_id == step.undoes:
            return dict(record.data or {})
    return {}
