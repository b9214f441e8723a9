"""Typed model of a parsed runbook.

Every element keeps the 1-based line of the runbook where it starts, so the
planner, lint and write-back can point back at the source.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


class Problem(BaseModel):
    """One finding of the parser or planner, addressed by source line."""

    line: int
    severity: Severity
    key: str
    params: dict[str, str | int | float] = Field(default_factory=dict)


class Attribute(BaseModel):
    """A `key: value` sub-item of a task, such as `所要時間: 約30秒`."""

    key: str
    value: str
    line: int
    commands: list[str] = Field(default_factory=list)
    code_blocks: list[CodeBlock] = Field(default_factory=list)
    items: list[str] = Field(default_factory=list)


class CodeBlock(BaseModel):
    language: str
    text: str
    line: int


class Task(BaseModel):
    """One checkbox item under Tasks, the Pre-execution Checklist or Verification."""

    title: str
    text: str
    line: int
    section: str
    category: str | None = None
    checked: bool = False
    commands: list[str] = Field(default_factory=list)
    value: str | None = None
    attributes: list[Attribute] = Field(default_factory=list)
    code_blocks: list[CodeBlock] = Field(default_factory=list)
    children: list[Task] = Field(default_factory=list)

    def attribute(self, *keys: str) -> Attribute | None:
        wanted = {key.casefold() for key in keys}
        for attribute in self.attributes:
            if attribute.key.casefold() in wanted:
                return attribute
        return None

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


class PhaseLine(BaseModel):
    """One numbered line of a phase in the Execution Order."""

    text: str
    line: int
    commands: list[str] = Field(default_factory=list)


class Phase(BaseModel):
    number: int
    title: str
    planned_seconds: int | None
    line: int
    lines: list[PhaseLine] = Field(default_factory=list)


class RollbackLine(BaseModel):
    text: str
    line: int
    commands: list[str] = Field(default_factory=list)
    url: str | None = None


class RollbackGroup(BaseModel):
    """One failure case of the Rollback Plan, such as `Phase 1-2 失敗（データベース）`."""

    phases: list[int]
    title: str
    line: int
    lines: list[RollbackLine] = Field(default_factory=list)


class MergeInfo(BaseModel):
    branch: str | None = None
    base: str | None = None
    created: str | None = None
    pr: str | None = None
    merged: str | None = None
    completed: str | None = None


class Runbook(BaseModel):
    name: str
    path: str
    language: str
    status: str | None = None
    status_line: int | None = None
    merge_info: MergeInfo = Field(default_factory=MergeInfo)
    tasks: list[Task] = Field(default_factory=list)
    checklist: list[Task] = Field(default_factory=list)
    verification: list[Task] = Field(default_factory=list)
    phases: list[Phase] = Field(default_factory=list)
    phased: bool = True
    rollback: list[RollbackGroup] = Field(default_factory=list)
    emergency: list[RollbackLine] = Field(default_factory=list)
    total_planned_seconds: int | None = None
    categories: list[str] = Field(default_factory=list)
    problems: list[Problem] = Field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [problem for problem in self.problems if problem.severity is Severity.ERROR]


Attribute.model_rebuild()
Task.model_rebuild()
