"""Buttons: approve, abort, done, skip and retry. Each handler acks first, then records the decision once."""

from __future__ import annotations

import json
import logging

from bot.errors import PostmergeError
from bot.i18n import translate
from bot.slack.gates import ACTION_ABORT, ACTION_APPROVE, ACTION_DONE, ACTION_RETRY, ACTION_SKIP

log = logging.getLogger(__name__)

DECISIONS = {ACTION_APPROVE: "approved", ACTION_DONE: "done", ACTION_SKIP: "skipped", ACTION_RETRY: "retry",
             ACTION_ABORT: "abort"}


def register(app, service) -> None:
    for action_id in DECISIONS:
        app.action(action_id)(_handler(service, action_id))


def _handler(service, action_id: str):
    async def handle(ack, body, action, client):
        await ack()
        await decide(service, client, body, action, DECISIONS[action_id])

    return handle


async def decide(service, client, body: dict, action: dict, decision: str) -> None:
    from bot.slack.service import decided_at_text

    user = body["user"]["id"]
    channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
    locale = service.settings.locale

    async def say_private(text: str) -> None:
        try:
            await client.chat_postEphemeral(channel=channel, user=user, text=text)
        except Exception as error:  # noqa: BLE001 - the reply is lost; the decision state is in the store
            log.warning("ephemeral reply to %s failed: %s", user, error)

    try:
        value = json.loads(action.get("value") or "")
    except json.JSONDecodeError:
        # The root message's Abort button carries the run id itself.
        value = {"run": action.get("value")}
    try:
        if "approval" in value:
            won, row = await service.decide(int(value["approval"]), decision, user)
            if not won:
                await say_private(translate(
                    "slack.already_decided", locale, user=f"<@{row['decided_by']}>",
                    at=decided_at_text(row["decided_at"]), decision=translate(f"slack.decision_{row['decision']}", locale),
                ))
        elif "run" in value and decision == "abort":
            run = await service.request_abort(str(value["run"]), user)
            await say_private(translate("slack.abort_requested", locale, run_id=run.id))
    except PostmergeError as error:
        await say_private(error.render(locale))
