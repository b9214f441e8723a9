"""Block Kit messages of a run: the root message edited in place, and phase replies.

Every message built here stays within Slack's limits: 50 blocks, 3,000
characters in a section, 150 in a header and 75 in button text. It also keeps
a margin under the roughly 12,000 characters across a message's blocks at
which chat.update fails with msg_blocks_too_long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.i18n import translate
from bot.slack.text import cut_end, mask_secrets, tail_lines

MAX_BLOCKS = 50
MAX_SECTION_CHARS = 3000
MAX_HEADER_CHARS = 150
MAX_BUTTON_CHARS = 75
# Slack rejects about 12,000 characters across blocks; keep a margin for
# the fields Slack counts that these builders do not.
MAX_MESSAGE_BLOCK_CHARS = 11000
MAX_FALLBACK_TEXT_CHARS = 3000
OUTPUT_TAIL_CHARS = 2500
PROGRESS_CELLS = 14

ACTION_ABORT = "postmerge:abort"

STATUS_ICONS = {
    "pending": "⬜",
    "running": "▶️",
    "waiting": "⏸",
    "done": "✅",
    "failed": "❌",
    "aborted": "✋",
}


@dataclass
class PhaseView:
    number: int | None
    title: str
    status: str
    planned_seconds: int | None = None
    elapsed_seconds: float = 0.0
    steps_done: int = 0
    steps_total: int = 0


@dataclass
class RunView:
    run_id: str
    runbook: str
    environment: str
    status: str
    started_by: str | None = None
    branch: str | None = None
    pr: str | None = None
    phases: list[PhaseView] = field(default_factory=list)
    current_step: str | None = None
    elapsed_seconds: float = 0.0
    remaining_seconds: float = 0.0
    kind: str = "run"
    parent_run_id: str | None = None

    @property
    def progress(self) -> float:
        total = sum(phase.steps_total for phase in self.phases)
        done = sum(phase.steps_done for phase in self.phases)
        return done / total if total else 0.0


def _minutes(seconds: float) -> int:
    return int(round(seconds / 60))


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes:02d}:{rest:02d}"


def _section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": cut_end(text, MAX_SECTION_CHARS)}}


def _context(text: str) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": cut_end(text, MAX_SECTION_CHARS)}]}


def block_chars(blocks: list[dict]) -> int:
    """Count the characters of every text string inside blocks, as Slack's limit does."""
    total = 0

    def walk(value) -> None:
        nonlocal total
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "text" and isinstance(item, str):
                    total += len(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(blocks)
    return total


def phase_line(phase: PhaseView, locale: str) -> str:
    icon = STATUS_ICONS.get(phase.status, "⬜")
    label = (translate("slack.phase_label", locale, number=phase.number, title=phase.title)
             if phase.number is not None else phase.title)
    if phase.status == "pending":
        return f"{icon} {label}"
    if phase.number is None and phase.planned_seconds is None:
        # A rollback step: how long it took, without a plan to compare with.
        return f"{icon} {label}　{phase.elapsed_seconds:.1f}s" if phase.elapsed_seconds else f"{icon} {label}"
    planned = translate("slack.planned", locale, minutes=_minutes(phase.planned_seconds or 0))
    if phase.status == "running":
        timing = f"{_clock(phase.elapsed_seconds)} / {planned}"
    else:
        timing = f"{translate('slack.minutes', locale, minutes=_minutes(phase.elapsed_seconds))} / {planned}"
    line = f"{icon} {label}　{timing}"
    if phase.planned_seconds and phase.elapsed_seconds > phase.planned_seconds and phase.status != "pending":
        over = _minutes(phase.elapsed_seconds - phase.planned_seconds)
        if over:
            line += "　" + translate("slack.overrun", locale, minutes=over)
    return line


def root_message(view: RunView, locale: str) -> tuple[str, list[dict]]:
    """Return the fallback text and the blocks of a run's root message."""
    finished = view.status in ("completed", "failed", "aborted", "rolled_back")
    header_key = f"slack.header_{view.status}" if finished else "slack.header_running"
    if view.kind != "run":
        header_key = f"slack.header_{view.kind}_{view.status if finished else 'running'}"
    header = cut_end(translate(header_key, locale, runbook=view.runbook), MAX_HEADER_CHARS)

    details = [view.environment]
    if view.parent_run_id:
        details.append(translate("slack.parent_run", locale, run_id=view.parent_run_id))
    if view.pr:
        details.append(f"PR {view.pr}")
    if view.branch:
        details.append(f"`{view.branch}`")
    if view.started_by:
        details.append(f"<@{view.started_by}>" if view.started_by.startswith("U") else view.started_by)
    details.append(translate("slack.run_id", locale, run_id=view.run_id))

    lines = [phase_line(phase, locale) for phase in view.phases]
    phases_text = _fit_lines(lines, MAX_SECTION_CHARS)

    filled = round(view.progress * PROGRESS_CELLS)
    progress = "▓" * filled + "░" * (PROGRESS_CELLS - filled)
    summary = translate(
        "slack.progress",
        locale,
        bar=progress,
        percent=round(view.progress * 100),
        elapsed=_minutes(view.elapsed_seconds),
        remaining=_minutes(view.remaining_seconds),
    )

    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        _context(" · ".join(details)),
        _section(phases_text),
    ]
    if view.current_step and view.status in ("running", "waiting"):
        blocks.append(_context(translate("slack.current_step", locale, step=mask_secrets(view.current_step))))
    blocks.append(_section(summary))
    if view.status in ("running", "waiting", "paused", "pending"):
        blocks.append({
            "type": "actions",
            "block_id": f"run:{view.run_id}",
            "elements": [{
                "type": "button",
                "action_id": ACTION_ABORT,
                "style": "danger",
                "value": view.run_id,
                "text": {"type": "plain_text", "text": cut_end(translate("slack.abort", locale), MAX_BUTTON_CHARS)},
            }],
        })

    text = cut_end(f"{header} — {summary}", MAX_FALLBACK_TEXT_CHARS)
    return text, fit_blocks(blocks)


@dataclass
class StepReport:
    step_id: str
    title: str
    status: str
    seconds: float | None = None
    output_lines: list[str] = field(default_factory=list)
    error: str | None = None


def phase_reply(phase: PhaseView, steps: list[StepReport], locale: str) -> tuple[str, list[dict]]:
    """Return the thread reply of one phase: a line per step, and output tails of failures and the last step."""
    title = phase_line(phase, locale)
    blocks: list[dict] = [_section(f"*{title}*")]
    step_lines = []
    for step in steps:
        icon = {"succeeded": "✅", "approved": "✅", "skipped": "⏭", "failed": "❌", "timed_out": "⏱",
                "rejected": "✋", "running": "▶️", "waiting": "⏸"}.get(step.status, "⬜")
        seconds = f" ({step.seconds:.1f}s)" if step.seconds is not None else ""
        step_lines.append(f"{icon} `{step.step_id}` {mask_secrets(step.title)}{seconds}")
    blocks.append(_section(_fit_lines(step_lines, MAX_SECTION_CHARS)))

    for step in steps:
        if step.error:
            blocks.append(_section(cut_end(f"❌ `{step.step_id}` {mask_secrets(step.error)}", MAX_SECTION_CHARS)))
        if step.output_lines and (step.status in ("failed", "timed_out") or step is steps[-1]):
            blocks.append(output_block(step.output_lines))

    text = cut_end(title, MAX_FALLBACK_TEXT_CHARS)
    return text, fit_blocks(blocks)


def failure_reply(step: StepReport, locale: str) -> tuple[str, list[dict]]:
    """Return the reply about one failed step of a rollback or emergency run, with its output tail."""
    title = translate("slack.step_failed_reply", locale, step_id=step.step_id, title=mask_secrets(step.title))
    blocks = [_section(f"*{cut_end(title, 2900)}*")]
    if step.error:
        blocks.append(_section(cut_end(mask_secrets(step.error), MAX_SECTION_CHARS)))
    if step.output_lines:
        blocks.append(output_block(step.output_lines))
    return cut_end(title, MAX_FALLBACK_TEXT_CHARS), fit_blocks(blocks)


def output_block(lines: list[str]) -> dict:
    """Return a section with the masked tail of a step's output in a code block."""
    masked = [mask_secrets(line).replace("```", "ˋˋˋ") for line in lines]
    tail = tail_lines(masked, OUTPUT_TAIL_CHARS)
    return _section(f"```{tail}```")


def _fit_lines(lines: list[str], limit: int) -> str:
    """Join lines within limit characters; lines that do not fit are counted in a last line."""
    kept: list[str] = []
    used = 0
    for index, line in enumerate(lines):
        line = cut_end(line, limit // 2)
        if used + len(line) + 1 > limit - 40:
            kept.append(f"… (+{len(lines) - index})")
            break
        kept.append(line)
        used += len(line) + 1
    return "\n".join(kept) or " "


def fit_blocks(blocks: list[dict]) -> list[dict]:
    """Keep a message within the block count and the character total Slack accepts."""
    fitted = blocks[:MAX_BLOCKS]
    while block_chars(fitted) > MAX_MESSAGE_BLOCK_CHARS:
        largest = max(
            (index for index, block in enumerate(fitted) if block.get("type") == "section"),
            key=lambda index: len(fitted[index]["text"]["text"]),
            default=None,
        )
        if largest is None:
            break
        text = fitted[largest]["text"]["text"]
        excess = block_chars(fitted) - MAX_MESSAGE_BLOCK_CHARS
        fitted[largest] = _section(cut_end(text, max(len(text) - excess - 1, 1)))
    return fitted
