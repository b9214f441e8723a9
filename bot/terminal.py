"""Terminal progress and prompts with rich.

On a terminal, a live view shows a bar per phase, elapsed against planned
time, an ETA and the running step's last output line. Without a terminal
(pipes, CI) the same events print as plain lines.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import termios
import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from bot.gates import GateAnswer, GateRequest, RunEvent
from bot.i18n import translate
from bot.plan import Plan, Step

ICONS = {"pending": "⬜", "running": "▶️ ", "done": "✅", "failed": "❌"}


def terminal_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "terminal"


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes:02d}:{rest:02d}"


class TerminalView:
    """A notifier that renders run progress in the terminal."""

    def __init__(self, console: Console, locale: str) -> None:
        self.console = console
        self.locale = locale
        self.live: Live | None = None
        self.plan: Plan | None = None
        self.run_id = ""
        self.started = time.monotonic()
        self.phase_started: dict[int | None, float] = {}
        self.phase_finished: dict[int | None, float] = {}
        self.failed_phase: int | None = None
        self.current_phase: int | None = None
        self.current: Step | None = None
        self.last_line = ""
        self.done_steps: set[str] = set()
        self.interactive = console.is_terminal
        self.is_rollback = False

    def t(self, key: str, **params) -> str:
        return translate(key, self.locale, **params)

    # -- notifier ---------------------------------------------------------

    def output_line(self, run_id: str, step: Step, line: str) -> None:
        # Output scrolls above the live view, so query results stay on screen.
        self.last_line = line
        self.console.print(Text(f"    │ {line}", style="dim" if self.interactive else ""), highlight=False,
                           soft_wrap=True)
        self._refresh()

    async def notify(self, event: RunEvent) -> None:
        self.plan = event.plan
        self.run_id = event.run_id
        kind = event.type
        step = event.step
        if kind in ("run.started", "run.resumed"):
            self.started = time.monotonic() - event.data.get("elapsed_seconds", 0.0)
            self.is_rollback = event.data.get("kind") == "rollback"
            self.done_steps.update(event.data.get("done_steps", []))
            for number, seconds in event.data.get("finished_phases", {}).items():
                self.phase_started[int(number)] = time.monotonic() - seconds
                self.phase_finished[int(number)] = time.monotonic()
            for number, seconds in event.data.get("started_phases", {}).items():
                self.phase_started[int(number)] = time.monotonic() - seconds
            self._say("terminal.run_started" if kind == "run.started" else "terminal.run_resumed",
                      runbook=event.plan.runbook, environment=event.plan.environment, run_id=event.run_id)
            self._start_live()
        elif kind == "phase.started":
            self.phase_started[event.phase] = time.monotonic()
            if event.phase is None:
                self._say("terminal.stage_started", title=self._stage_title(event))
            else:
                self._say("terminal.phase_started", number=event.phase, title=self._phase_title(event.phase))
        elif kind == "phase.finished":
            self.phase_finished[event.phase] = time.monotonic()
            minutes = _minutes(event.data.get("actual_seconds", 0))
            if event.phase is None:
                self._say("terminal.stage_finished", title=self._stage_title(event), minutes=minutes)
            else:
                self._say("terminal.phase_finished", number=event.phase, minutes=minutes)
        elif kind == "step.started" and step is not None:
            self.current = step
            self.current_phase = step.phase
            self.last_line = ""
            self._say("terminal.step_started", step_id=step.id, title=step.title, kind=step.kind)
        elif kind.startswith("step.") and step is not None:
            status = kind.removeprefix("step.")
            if status in ("succeeded", "skipped", "approved"):
                self.done_steps.add(step.id)
            if status in ("failed", "timed_out"):
                self.failed_phase = step.phase
            self._say(f"terminal.step_{status}", step_id=step.id, title=step.title,
                      seconds=f"{event.data.get('seconds', 0):.1f}", error=event.data.get("error") or "",
                      actor=event.data.get("actor") or "")
        elif kind == "incident.opened":
            self._stop_live()
            reason = self.t(f"incident.reason_{event.data.get('reason', 'failed')}")
            self.console.print(Text(self.t("terminal.incident_opened", incident_id=event.data["incident"],
                                           reason=reason, run_id=event.data.get("parent_run_id") or event.run_id),
                                    style="bold red"))
            emergency = [step for step in event.plan.emergency if step.automated] if event.plan.emergency else []
            for step in emergency:
                self.console.print(Text(self.t("terminal.emergency_hint", run_id=event.data.get("parent_run_id") or event.run_id,
                                               number=step.id.removeprefix("e."), title=step.title)), highlight=False)
        elif kind == "incident.closed":
            resolution = self.t(f"incident.resolution_{event.data.get('resolution')}")
            self.console.print(Text(self.t("terminal.incident_closed", incident_id=event.data["incident"],
                                           resolution=resolution), style="bold green"))
        elif kind.startswith("run."):
            self._stop_live()
            status = kind.removeprefix("run.")
            style = {"completed": "bold green", "failed": "bold red"}.get(status, "bold yellow")
            message = self.t(f"terminal.run_{status}", run_id=event.run_id, error=event.data.get("error") or "")
            self.console.print(Text(message, style=style))
            if status in ("failed", "aborted") and event.data.get("kind") == "run":
                self.console.print(Text(self._recovery_hint(event, status)))
        self._refresh()

    def _recovery_hint(self, event: RunEvent, status: str) -> str:
        """Say what to run next after a failure or an abort, naming the phase where that helps."""
        failed = next((step for step in event.plan.steps() if step.id == event.data.get("failed_step")), None)
        if status == "failed" and failed is not None and failed.kind in ("traffic", "monitor"):
            # Traffic is back on green; the shift must start again from its first weight, not from the failed step.
            return self.t("terminal.rerun_hint", run_id=event.run_id, phase=failed.phase)
        if status == "failed":
            return self.t("terminal.rollback_hint", run_id=event.run_id)
        # An aborted run cannot be resumed, only rolled back or have a phase run again.
        return self.t("terminal.abort_hint", run_id=event.run_id, phase=self.current_phase or "N")

    # -- rendering --------------------------------------------------------

    def _say(self, key: str, **params) -> None:
        self.console.print(Text(self.t(key, **params)), highlight=False)

    def _stage_title(self, event: RunEvent) -> str:
        """Name the steps outside the phases: the rollback of a rollback run, else verification."""
        return self.t("terminal.rollback") if self.is_rollback else self.t("terminal.verification")

    def _phase_title(self, number: int | None) -> str:
        if self.plan is None:
            return ""
        for phase in self.plan.phases:
            if phase.number == number:
                return phase.title
        return self.t("terminal.verification") if number is None else ""

    def _start_live(self) -> None:
        if self.interactive and self.live is None:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def _stop_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def pause(self) -> None:
        self._stop_live()

    def resume(self) -> None:
        self._start_live()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def _render(self) -> Group:
        plan = self.plan
        table = Table.grid(padding=(0, 1))
        if plan is None:
            return Group(table)
        now = time.monotonic()
        planned_total = sum(phase.planned_seconds or 0 for phase in plan.phases)
        remaining = 0.0
        for phase in plan.phases:
            steps = phase.steps
            done = sum(1 for step in steps if step.id in self.done_steps)
            started = self.phase_started.get(phase.number)
            finished = self.phase_finished.get(phase.number)
            elapsed = ((finished or now) - started) if started else 0.0
            if finished:
                icon = ICONS["done"]
            elif self.failed_phase == phase.number:
                icon = ICONS["failed"]
            elif started:
                icon = ICONS["running"]
            else:
                icon = ICONS["pending"]
            planned = phase.planned_seconds or 0
            if not finished:
                remaining += max(planned - elapsed, 0)
            bar = ProgressBar(total=max(len(steps), 1), completed=done, width=20)
            timing = self.t("terminal.elapsed_planned", elapsed=_minutes(elapsed), planned=planned // 60)
            table.add_row(icon, f"Phase {phase.number} {phase.title}", bar, f"{done}/{len(steps)}", timing)

        elapsed_total = now - self.started
        footer = self.t("terminal.footer", elapsed=_minutes(elapsed_total), eta=_minutes(remaining),
                        planned=planned_total // 60)
        lines = [table, Text(footer, style="dim")]
        if self.current is not None:
            lines.append(Text(self.t("terminal.current", step_id=self.current.id, title=self.current.title),
                              style="cyan"))
            if self.last_line:
                lines.append(Text(f"  │ {self.last_line[:200]}", style="dim"))
        return Group(*lines)


class TerminalInteraction:
    """Answer gates at the terminal prompt."""

    def __init__(self, console: Console, view: TerminalView | None, locale: str) -> None:
        self.console = console
        self.view = view
        self.locale = locale
        self.reader = StdinLines.shared()

    async def answer(self, request: GateRequest) -> GateAnswer:
        if self.view is not None:
            self.view.pause()
        try:
            return await self._ask(request)
        finally:
            if self.view is not None:
                self.view.resume()

    async def _ask(self, request: GateRequest) -> GateAnswer:
        t = lambda message_key, **params: translate(message_key, self.locale, **params)  # noqa: E731 - local shorthand
        step = request.step
        title_key = f"gate.title_{request.kind}"
        if request.kind == "manual" and step.requires_approval:
            title_key = "gate.title_manual_approval"
        self.console.print(Text(t(title_key, step_id=step.id, title=step.title), style="bold yellow"))
        for line in request.details:
            self.console.print(Text(f"  {line}"), highlight=False)
        labels = {choice: t(f"gate.choice_{choice}") for choice in request.choices}
        keys = {label.split(")")[0].strip("("): choice for choice, label in labels.items()}
        prompt = " / ".join(labels.values())
        # Keys typed while steps were running must not answer this question.
        self.reader.discard_typeahead()
        while True:
            self.console.print(Text(f"{prompt}: "), end="")
            raw = await self.reader.readline()
            if raw is None:
                self.console.print(Text(t("gate.no_input", run_id=request.run_id)), style="red")
                return GateAnswer("defer", terminal_actor())
            choice = keys.get(raw.strip().lower())
            if choice is not None:
                return GateAnswer(choice, terminal_actor())
            self.console.print(Text(t("gate.invalid_choice", value=raw.strip(), choices=", ".join(keys))))


_SHARED_STDIN: StdinLines | None = None


class StdinLines:
    """Read lines of standard input on the event loop, without a thread.

    A prompt that an abort cancels must not leave a thread blocked in a read:
    the executor of asyncio.to_thread waits for it at exit, and a daemon thread
    holding the stdin buffer makes the interpreter abort at shutdown.
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.pending = b""
        self.closed = False

    @classmethod
    def shared(cls) -> StdinLines:
        """Return the process's one reader of standard input.

        Every prompt reads through it, so lines piped in advance and read in
        one chunk by an earlier prompt are kept for the later ones.
        """
        global _SHARED_STDIN
        if _SHARED_STDIN is None:
            _SHARED_STDIN = cls()
        return _SHARED_STDIN

    def discard_typeahead(self) -> None:
        """Drop what a person typed before the prompt appeared; only on a terminal.

        Piped input is a script of replies given in advance, so it is kept.
        """
        if not os.isatty(self.fd):
            return
        self.pending = b""
        termios.tcflush(self.fd, termios.TCIFLUSH)

    async def readline(self) -> str | None:
        """Return the next line without its newline, or None at end of input."""
        while b"\n" not in self.pending and not self.closed:
            chunk = await self._read_chunk()
            if not chunk:
                self.closed = True
            self.pending += chunk
        if not self.pending and self.closed:
            return None
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode("utf-8", "replace")

    async def _read_chunk(self) -> bytes:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        try:
            loop.add_reader(self.fd, lambda: ready.done() or ready.set_result(None))
        except (PermissionError, OSError, ValueError):
            # epoll rejects a regular file or /dev/null, and reading those does not block.
            return os.read(self.fd, 4096)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)
        return os.read(self.fd, 4096)


class AutoInteraction:
    """Decide every approval and manual step as yes, for `--yes`."""

    def __init__(self, console: Console, locale: str, actor: str) -> None:
        self.console = console
        self.locale = locale
        self.actor = actor

    async def answer(self, request: GateRequest) -> GateAnswer:
        if request.kind == "interrupted":
            # A step that may have had effects is never repeated without a person.
            self.console.print(Text(translate("gate.interrupted_needs_person", self.locale,
                                              step_id=request.step.id, run_id=request.run_id)), style="red")
            return GateAnswer("defer", self.actor)
        decision = "approved" if request.kind == "approval" else "done"
        self.console.print(Text(translate(f"gate.auto_{request.kind}", self.locale, step_id=request.step.id,
                                          title=request.step.title)), style="dim", highlight=False)
        return GateAnswer(decision, self.actor)
