"""Approval and manual-step messages with their buttons, and their decided form."""

from __future__ import annotations

import json

from bot.gates import GateRequest
from bot.i18n import translate
from bot.slack.blocks import MAX_BUTTON_CHARS, fit_blocks
from bot.slack.text import cut_end, mask_secrets

ACTION_APPROVE = "postmerge:approve"
ACTION_ABORT = "postmerge:abort"
ACTION_DONE = "postmerge:done"
ACTION_SKIP = "postmerge:skip"
ACTION_RETRY = "postmerge:retry"

_BUTTONS = {
    "approved": (ACTION_APPROVE, "slack.button_approve", "primary"),
    "done": (ACTION_DONE, "slack.button_done", "primary"),
    "skipped": (ACTION_SKIP, "slack.button_skip", None),
    "retry": (ACTION_RETRY, "slack.button_retry", None),
    "abort": (ACTION_ABORT, "slack.button_abort", "danger"),
}


def gate_value(approval_id: int) -> str:
    return json.dumps({"approval": approval_id})


def gate_message(request: GateRequest, locale: str) -> tuple[str, list[dict]]:
    step = request.step
    title = translate(f"slack.gate_{request.kind}", locale, step_id=step.id, title=mask_secrets(step.title))
    lines = [f"*{cut_end(title, 2900)}*"]
    if request.kind == "interrupted":
        lines.append(translate("slack.gate_interrupted_help", locale))
    next_line = translate("slack.gate_next", locale, what=mask_secrets(" / ".join(step.commands) or step.title))
    lines.append(cut_end(next_line, 1500))
    for detail in request.details:
        lines.append(cut_end("• " + mask_secrets(detail), 500))
    buttons = []
    for choice in request.choices:
        if choice not in _BUTTONS:
            continue
        action_id, label_key, style = _BUTTONS[choice]
        button = {
            "type": "button",
            "action_id": action_id,
            "value": gate_value(request.approval_id),
            "text": {"type": "plain_text", "text": cut_end(translate(label_key, locale), MAX_BUTTON_CHARS)},
        }
        if style:
            button["style"] = style
        buttons.append(button)
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": cut_end("\n".join(lines), 3000)}},
        {"type": "actions", "block_id": f"gate:{request.approval_id}", "elements": buttons},
    ]
    return cut_end(title, 3000), fit_blocks(blocks)


def decided_message(request: GateRequest, row: dict, locale: str) -> tuple[str, list[dict]]:
    from bot.slack.service import decided_at_text

    step = request.step
    text = translate("slack.gate_decided", locale, step_id=step.id, title=mask_secrets(step.title),
                     decision=translate(f"slack.decision_{row['decision']}", locale),
                     user=f"<@{row['decided_by']}>", at=decided_at_text(row["decided_at"]))
    return cut_end(text, 3000), [{"type": "section", "text": {"type": "mrkdwn", "text": cut_end(text, 3000)}}]
