"""The plan: resolved, ordered steps of a runbook for one environment.

A plan is stored with its run, so a resumed run executes exactly the steps
that were shown when it started, even if the runbook changed since.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

StepKind = Literal[
    "shell",
    "http",
    "sql",
    "env",
    "kubernetes",
    "nginx",
    "cdn",
    "datadog",
    "sentry",
    "traffic",
    "monitor",
    "approval",
    "manual",
]
STEP_KINDS: tuple[str, ...] = StepKind.__args__


class TaskMatch(BaseModel):
    """The rule and task a phase line was resolved to, so the plan can explain it."""

    task: str
    task_line: int
    reason: Literal["exact", "contains", "category", "similar", "command", "pattern", "smoke"]
    score: float = 1.0


class Step(BaseModel):
    id: str
    title: str
    kind: StepKind
    automated: bool = True
    requires_approval: bool = False
    source_line: int
    task: str | None = None
    task_line: int | None = None
    phase: int | None = None
    commands: list[str] = Field(default_factory=list)
    # The command that runs in the environment, after its substitutions.
    run_command: str | None = None
    match: TaskMatch | None = None
    # Why a step is manual, as a catalog key, and what the person should do.
    manual_reason: str | None = None
    # Values the manual_reason message names, such as the missing settings section.
    manual_params: dict[str, str] = Field(default_factory=dict)
    instructions: list[str] = Field(default_factory=list)
    approval_note: str | None = None
    planned_seconds: int | None = None
    timeout_seconds: float | None = None
    repeat_safe: bool = False
    # http
    url: str | None = None
    target_url: str | None = None
    method: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    expect_status: int | None = None
    expect_json: Any = None
    fail_on_http_error: bool = False
    unchecked_expectations: list[str] = Field(default_factory=list)
    # shell: text the output must contain
    expect_output: list[str] = Field(default_factory=list)
    # sql
    query: str | None = None
    # env
    variables: dict[str, str] = Field(default_factory=dict)
    file: str | None = None
    # Executor parameters for kubernetes, nginx, cdn, datadog and sentry
    # steps, filled by the planner. Each executor documents its keys.
    params: dict[str, Any] = Field(default_factory=dict)
    # traffic and monitor
    weight: int | None = None
    duration_seconds: int | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    # a step that runs before its task and must succeed first
    prerequisite_of: str | None = None
    # rollback: the step id this step undoes, for executor inverses
    undoes: str | None = None

    def reason_params(self) -> dict[str, str]:
        """Return the values the manual_reason message names."""
        return {"kind": self.kind, **self.manual_params}

    def contract(self) -> dict[str, Any]:
        """Return the step as the JSON contract of `postmerge plan --json`."""
        data: dict[str, Any] = {
            "id": self.id,
            "title": self.title,
            "kind": self.kind,
            "automated": self.automated,
            "requires_approval": self.requires_approval,
            "source_line": self.source_line,
            "task": self.task,
            "commands": self.commands,
        }

        # Fields of the step's kind.
        if self.kind == "http":
            data.update(
                url=self.url,
                expect_json=self.expect_json,
                timeout_seconds=self.timeout_seconds,
                method=self.method,
                expect_status=self.expect_status,
            )
            if self.target_url and self.target_url != self.url:
                data["target_url"] = self.target_url
        if self.kind == "env":
            data.update(variables=self.variables, file=self.file)
        if self.kind == "traffic":
            data["weight"] = self.weight
        if self.kind == "monitor":
            data.update(duration_seconds=self.duration_seconds, thresholds=self.thresholds)
        if self.kind == "sql":
            data["query"] = self.query

        # Fields that explain the step, present only when they apply.
        if self.kind != "http" and self.timeout_seconds is not None:
            data["timeout_seconds"] = self.timeout_seconds
        if self.run_command and self.commands and self.run_command != self.commands[0]:
            data["run_command"] = self.run_command
        if self.match is not None:
            data["match"] = self.match.model_dump()
        if self.manual_reason:
            data["manual_reason"] = self.manual_reason
        if self.params:
            data["params"] = self.params
        if self.prerequisite_of:
            data["prerequisite_of"] = self.prerequisite_of
        if self.planned_seconds is not None:
            data["planned_seconds"] = self.planned_seconds

        return data


class PlanPhase(BaseModel):
    number: int
    title: str
    planned_seconds: int | None
    source_line: int
    steps: list[Step] = Field(default_factory=list)


class RollbackGroupPlan(BaseModel):
    phases: list[int]
    title: str
    source_line: int
    steps: list[Step] = Field(default_factory=list)
    # The phase that a line such as "修正後、Phase 6を再実行" names to run again once the cause is fixed.
    rerun_phase: int | None = None


class Link(BaseModel):
    """A page the runbook names for people, such as a dashboard; emergency marks one listed under 緊急時."""

    title: str
    url: str
    source_line: int
    emergency: bool = False


class Plan(BaseModel):
    runbook: str
    runbook_path: str
    environment: str
    language: str
    total_planned_seconds: int | None
    phases: list[PlanPhase] = Field(default_factory=list)
    verification: list[Step] = Field(default_factory=list)
    rollback: list[RollbackGroupPlan] = Field(default_factory=list)
    emergency: list[Step] = Field(default_factory=list)
    links: list[Link] = Field(default_factory=list)
    # Runbook lines of the tasks a rollback plan undoes, unticked when it completes.
    undo_task_lines: list[int] = Field(default_factory=list)

    def steps(self) -> list[Step]:
        """Return the forward steps in execution order: every phase, then verification."""
        ordered = [step for phase in self.phases for step in phase.steps]
        ordered.extend(self.verification)
        return ordered

    def contract(self) -> dict[str, Any]:
        return {
            "runbook": self.runbook,
            "environment": self.environment,
            "total_planned_seconds": self.total_planned_seconds or 0,
            "phases": [
                {
                    "number": phase.number,
                    "title": phase.title,
                    "planned_seconds": phase.planned_seconds or 0,
                    "source_line": phase.source_line,
                    "steps": [step.contract() for step in phase.steps],
                }
                for phase in self.phases
            ],
            "verification": [step.contract() for step in self.verification],
            "rollback": [
                {
                    "phases": group.phases,
                    "title": group.title,
                    "source_line": group.source_line,
                    "steps": [step.contract() for step in group.steps],
                    "rerun_phase": group.rerun_phase,
                }
                for group in self.rollback
            ],
            "emergency": [step.contract() for step in self.emergency],
            "links": [link.model_dump() for link in self.links],
        }
