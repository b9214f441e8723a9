"""Write a run's progress back into the runbook file it started from.

Ticks the checkboxes of finished tasks, sets `## Status`, fills Merged and
Completed, and appends Notes entries in the file's own style. Each write
re-reads the file, changes only the lines it must, and replaces the file
atomically, so edits made by people meanwhile are kept.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bot.gates import RunEvent
from bot.i18n import translate
from bot.plan import Step

_STATUS_LINE = re.compile(r"^(##\s*(?:Status|ステータス|状態)\s*[:：]\s*)(.*?)(\s*)$", re.I)
_MERGE_LINE = re.compile(r"^(\s*[-*]\s*(?P<key>Merged|Completed|マージ日|完了日)\s*[:：]\s*)(?P<value>.*?)(\s*)$", re.I)
_CHECKBOX = re.compile(r"^(\s*[-*+]\s*\[)( )(\].*)$")
_NOTES_HEADING = re.compile(r"^##\s*(?:Notes|メモ|ノート|実行ログ)\s*$", re.I)
_H2 = re.compile(r"^##\s")
_PLACEHOLDER = re.compile(r"^\(?(?:未マージ|未完了|pending|not merged|not completed|tbd|-)?\)?$|^（.*）$", re.I)

STATUS_WORDS = {
    "running": "in-progress",
    "completed": "completed",
    "failed": "failed",
    "aborted": "failed",
    "rolled_back": "rolled-back",
}


def atomic_write(path: Path, text: str) -> None:
    """Replace path with text through a temporary file in the same folder, keeping its mode."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RunbookWriteback:
    """A notifier that edits the runbook as the run goes."""

    def __init__(self, path: Path, language: str) -> None:
        self.path = path
        self.language = language
        self.run_started: float | None = None

    def output_line(self, run_id: str, step: Step, line: str) -> None:
        return None

    async def notify(self, event: RunEvent) -> None:
        handler = {
            "run.started": self._on_run_started,
            "run.resumed": self._on_run_resumed,
            "step.succeeded": self._on_step_done,
            "step.approved": self._on_step_done,
            "phase.finished": self._on_phase_finished,
            "run.completed": self._on_run_finished,
            "run.failed": self._on_run_finished,
            "run.aborted": self._on_run_finished,
            "incident.opened": self._on_incident_opened,
            "incident.closed": self._on_incident_closed,
        }.get(event.type)
        if handler is not None:
            handler(event)

    # -- events -----------------------------------------------------------

    def _on_run_resumed(self, event: RunEvent) -> None:
        self.run_started = event.data.get("started_at") or time.time()
        self._edit(lambda lines: _append_note(lines, _stamp(), self._t("writeback.note_resumed"),
                                              [self._t("writeback.started_detail", run_id=event.run_id,
                                                       environment=event.plan.environment)]))

    def _on_run_started(self, event: RunEvent) -> None:
        self.run_started = event.data.get("started_at") or time.time()
        stamp = _stamp()
        if event.data.get("kind") in ("rollback", "emergency"):
            details = [self._t("writeback.started_detail", run_id=event.run_id, environment=event.plan.environment)]
            if event.data["kind"] == "emergency":
                # Name the action, since a runbook may list several under 緊急時.
                details += [f"{step.id} {step.title}" for group in event.plan.rollback for step in group.steps]
            self._edit(lambda lines: _append_note(lines, stamp, self._t(f"writeback.note_{event.data['kind']}_started"),
                                                  details))
            return

        def change(lines: list[str]) -> list[str]:
            lines = _set_status(lines, "in-progress")
            # NOTE: the merge time itself is unknown here, so Merged gets the time the
            # post-merge run started, and only while it still contains a placeholder.
            lines = _fill_merge_field(lines, ("merged", "マージ日"), stamp)
            return _append_note(lines, stamp, self._t("writeback.note_started"),
                                [self._t("writeback.started_detail", run_id=event.run_id,
                                         environment=event.plan.environment)])

        self._edit(change)

    def _on_step_done(self, event: RunEvent) -> None:
        step = event.step
        if step is None or step.task_line is None or step.prerequisite_of or step.undoes:
            return
        if step.kind == "http" and step.task is None:
            return
        self._edit(lambda lines: _tick(lines, step.task_line, step.task))

    def _on_phase_finished(self, event: RunEvent) -> None:
        plan = event.plan
        phase = next((phase for phase in plan.phases if phase.number == event.phase), None)
        if phase is None:
            return
        actual_minutes = round(event.data.get("actual_seconds", 0) / 60, 1)
        details = []
        if phase.planned_seconds:
            planned_minutes = round(phase.planned_seconds / 60, 1)
            details.append(self._t("writeback.phase_actual", title=phase.title, actual=_num(actual_minutes),
                                   planned=_num(planned_minutes)))
            if actual_minutes > planned_minutes:
                details.append(self._t("writeback.phase_overrun", minutes=_num(round(actual_minutes - planned_minutes, 1))))
        else:
            details.append(self._t("writeback.phase_actual_unplanned", title=phase.title, actual=_num(actual_minutes)))
        heading = self._t("writeback.note_phase_done", number=phase.number)
        self._edit(lambda lines: _append_note(lines, _stamp(), heading, details))

    def _on_run_finished(self, event: RunEvent) -> None:
        status = event.type.removeprefix("run.")
        stamp = _stamp()
        is_rollback = event.data.get("kind") == "rollback"
        details: list[str] = []
        if event.data.get("error"):
            details.append(self._t("writeback.failure", error=_one_line(event.data["error"])))
        if event.data.get("failed_step"):
            details.append(self._t("writeback.failed_step", step=event.data["failed_step"]))
        if self.run_started is not None:
            details.append(self._t("writeback.elapsed", minutes=_num(round((time.time() - self.run_started) / 60, 1))))

        if event.data.get("kind") == "emergency":
            word = None
            heading = self._t(f"writeback.note_emergency_{status}")
        elif is_rollback:
            word = "rolled-back" if status == "completed" else None
            heading = self._t(f"writeback.note_rollback_{status}")
        else:
            word = STATUS_WORDS.get(status)
            heading = self._t(f"writeback.note_run_{status}")

        untick = event.plan.undo_task_lines if is_rollback and status == "completed" else []

        def change(lines: list[str]) -> list[str]:
            if word:
                lines = _set_status(lines, word)
            for line_number in untick:
                lines = _untick(lines, line_number)
            if status == "completed" and event.data.get("kind", "run") == "run":
                lines = _fill_merge_field(lines, ("completed", "完了日"), stamp)
            return _append_note(lines, stamp, heading, details)

        self._edit(change)

    def _on_incident_opened(self, event: RunEvent) -> None:
        reason = self._t(f"incident.reason_{event.data.get('reason', 'failed')}")
        heading = self._t("writeback.note_incident_opened", incident_id=event.data["incident"], reason=reason)
        # A later round means a retry or the rollback failed, and a decision is needed again.
        details = [self._t("writeback.incident_round", round=event.data["round"])] if event.data.get("round", 1) > 1 \
            else []
        self._edit(lambda lines: _append_note(lines, _stamp(), heading, details))

    def _on_incident_closed(self, event: RunEvent) -> None:
        resolution = self._t(f"incident.resolution_{event.data.get('resolution')}")
        heading = self._t("writeback.note_incident_closed", incident_id=event.data["incident"], resolution=resolution)
        details = [self._t("writeback.incident_closed_by", actor=event.data.get("actor") or "-")]
        self._edit(lambda lines: _append_note(lines, _stamp(), heading, details))

    # -- file edits -------------------------------------------------------

    def _t(self, key: str, **params) -> str:
        return translate(key, self.language, **params)

    def _edit(self, change) -> None:
        # Bytes, not read_text: universal newlines would turn CRLF into LF.
        text = self.path.read_bytes().decode("utf-8")
        newline = "\r\n" if "\r\n" in text else "\n"
        trailing = text.endswith(("\n", "\r\n"))
        lines = text.splitlines()
        changed = change(list(lines))
        if changed == lines:
            return
        result = newline.join(changed)
        if trailing or changed[-1:] != lines[-1:]:
            result += newline
        atomic_write(self.path, result)


def _stamp() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")


def _num(value: float) -> str:
    return f"{value:g}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _set_status(lines: list[str], word: str) -> list[str]:
    for index, line in enumerate(lines):
        match = _STATUS_LINE.match(line)
        if match:
            lines[index] = f"{match.group(1)}{word}{match.group(3)}"
            return lines
    return lines


def _fill_merge_field(lines: list[str], keys: tuple[str, ...], value: str) -> list[str]:
    for index, line in enumerate(lines):
        match = _MERGE_LINE.match(line)
        if match and match.group("key").casefold() in keys:
            if _PLACEHOLDER.match(match.group("value").strip()):
                lines[index] = f"{match.group(1)}{value}"
            return lines
    return lines


def _tick(lines: list[str], line_number: int, title: str | None) -> list[str]:
    """Tick the checkbox at line_number, or, if the file moved, the unticked one with the title."""
    candidates = [line_number - 1]
    if title:
        candidates += [index for index, line in enumerate(lines) if title in line and _CHECKBOX.match(line)]
    for index in candidates:
        if 0 <= index < len(lines):
            match = _CHECKBOX.match(lines[index])
            if match and (title is None or title in lines[index] or index == line_number - 1):
                lines[index] = f"{match.group(1)}x{match.group(3)}"
                return lines
    return lines


def _untick(lines: list[str], line_number: int) -> list[str]:
    index = line_number - 1
    if 0 <= index < len(lines):
        match = re.match(r"^(\s*[-*+]\s*\[)[xX](\].*)$", lines[index])
        if match:
            lines[index] = f"{match.group(1)} {match.group(2)}"
    return lines


def _append_note(lines: list[str], stamp: str, heading: str, details: list[str]) -> list[str]:
    """Append `### stamp - heading` with bullet details at the end of the Notes section."""
    entry = [f"### {stamp} - {heading}"] + [f"- {detail}" for detail in details]
    start = next((index for index, line in enumerate(lines) if _NOTES_HEADING.match(line)), None)
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        return lines + ["", "## Notes", "", *entry]

    end = next((index for index in range(start + 1, len(lines)) if _H2.match(lines[index])), len(lines))
    insert_at = end
    while insert_at > start + 1 and not lines[insert_at - 1].strip():
        insert_at -= 1
    block = ["", *entry]
    if end < len(lines):
        block.append("")
    return lines[:insert_at] + block + lines[insert_at:]
