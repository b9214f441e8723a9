"""Gate requests that a person decides, and the notifications the engine sends.

The terminal decides gates with prompts (or `--yes`), and the Slack bot with
buttons. Either way the decision is recorded once in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from bot.plan import Plan, Step

GateKind = Literal["approval", "manual", "interrupted"]
Decision = Literal["approved", "rejected", "done", "skipped", "retry", "abort", "rollback"]

CHOICES: dict[str, tuple[str, ...]] = {
    "approval": ("approved", "abort"),
    "manual": ("done", "skipped", "abort"),
    "interrupted": ("retry", "done", "skipped", "abort"),
}


@dataclass
class GateRequest:
    run_id: str
    kind: GateKind
    step: Step
    attempt: int
    approval_id: int
    started_by: str | None
    locale: str
    choices: tuple[str, ...]
    # Free text for the person: what happens next, the approval note, readings.
    details: list[str] = field(default_factory=list)


@dataclass
class GateAnswer:
    decision: str
    actor: str


class Interaction(Protocol):
    async def answer(self, request: GateRequest) -> GateAnswer:
        """Wait for a person's decision on a gate."""
        ...


@dataclass
class RunEvent:
    """One notification from the engine to the terminal, Slack or the write-back."""

    type: str
    run_id: str
    plan: Plan
    step: Step | None = None
    phase: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Notifier(Protocol):
    async def notify(self, event: RunEvent) -> None: ...

    def output_line(self, run_id: str, step: Step, line: str) -> None: ...
