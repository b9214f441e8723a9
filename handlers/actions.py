"""Buttons: approve, abort, done, skip and retry, and an incident's actions. Each handler acks first, then records the decision once."""

from __future__ import annotations

import json
import logging
import re

from bot.errors import PostmergeError
from bot.i18n import translate
from bot.slack.gates import ACTION_ABORT, ACTION_APPROVE, ACTION_DONE, ACTION_RETRY, ACTION_SKIP

log = logging.getLogger(__name__)

DECISIONS = {ACTION_APPROVE: "approved", ACTION_DONE: "done", ACTION_SKIP: "skipped", ACTION_RETRY: "retry",
             ACTION_ABORT: "abort"}


def register(app, service) -> None:
    for action_id in DECISIONS:
        app.action(action_id)(_handler(service, action_id))

    @app.action(re.compile(r"^postmerge:(?:incident|emergency):"))
    async def incident_button(ack, body, action, client):
        await ack()
        await incident(service, client, body, action)


def _private_replier(client, body: dict):
    """Return a function that replies to the person who pressed a button, visible only to them."""
    user = body["user"]["id"]
    channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")

    async def say_private(text: str) -> None:
        try:
            await client.chat_postEphemeral(channel=channel, user=user, text=text)
        except Exception as error:  # noqa: BLE001 - the reply is lost; the state is in the store
            log.warning("ephemeral reply to %s failed: %s", user, error)

    return say_private


async def incident(service, client, body: dict, action: dict) -> None:
    """Carry out an incident button: roll back, an emergency action, retry, skip, re-run a phase or acknowledge."""
    from bot.slack.incidents import ACTION_PREFIX

    user = body["user"]["id"]
    locale = service.settings.locale
    say_private = _private_replier(client, body)

    try:
        value = json.loads(action.get("value") or "")
        incident_id, round_number = str(value["incident"]), int(value["round"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("incident button %s with an unreadable value from %s", action.get("action_id"), user)
        await say_private(translate("incident.unreadable_button", locale))
        return
    try:
        action_id = action.get("action_id") or ""
        if action_id.startswith(ACTION_PREFIX):
            await service.incident_action(incident_id, round_number, action_id.removeprefix(ACTION_PREFIX), user)
        else:
            await service.emergency_action(incident_id, round_number, str(value.get("step")), user)
    except PostmergeError as error:
        await say_private(error.render(locale))


def _handler(service, action_id: str):
    async def handle(ack, body, action, client):
        await ack()
        await decide(service, client, body, action, DECISIONS[action_id])

    return handle


async def decide(service, client, body: dict, action: dict, decision: str) -> None:
    from bot.slack.service import decided_at_text

    user = body["user"]["id"]
    locale = service.settings.locale
    say_private = _private_replier(client, body)

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
