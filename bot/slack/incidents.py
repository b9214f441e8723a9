"""The incident message in the incidents channel, its buttons, and keeping it in step with the store.

Everything posted about an incident goes through `SlackIncidents.sync`. It
posts the message the first time. Afterwards it edits the message and adds a
line to its thread whenever the stored incident changed (an action chosen,
a new round, the incident closed). Actions taken from the terminal reach
Slack the same way, when the bot's watcher syncs open incidents.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from bot.gates import RunEvent
from bot.i18n import translate
from bot.incidents import IncidentView, incident_view
from bot.plan import Step
from bot.slack.blocks import MAX_BUTTON_CHARS, MAX_HEADER_CHARS, _context, _section, fit_blocks, output_block
from bot.slack.text import cut_end, mask_secrets
from storage import IncidentRecord

log = logging.getLogger(__name__)

ACTION_PREFIX = "postmerge:incident:"
EMERGENCY_PREFIX = "postmerge:emergency:"
_BUTTON_STYLES = {"rollback": "danger", "acknowledge": "primary"}


def mention(entry: str) -> str:
    """Return the Slack mention of a user (U…/W…) or a user group (S…)."""
    return f"<!subteam^{entry}>" if entry.startswith("S") else f"<@{entry}>"


def person(actor: str | None) -> str:
    if not actor:
        return "-"
    return f"<@{actor}>" if actor[:1] in ("U", "W") else actor


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp or 0))


def _readings_text(readings: dict, locale: str) -> str:
    def number(key: str, digits: int) -> str:
        value = readings.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    return translate("incident.readings", locale, p95=number("p95_ms", 0), error_rate=number("error_rate_percent", 2),
                     throughput=number("throughput_rps", 1), requests=readings.get("requests", "-"),
                     seconds=number("seconds", 0))


def _step_line(step: Step, locale: str) -> str:
    mode = translate("incident.step_manual", locale) if not step.automated else ""
    if step.requires_approval:
        mode = translate("incident.step_approval", locale)
    command = step.run_command or (step.commands[0] if step.commands else "")
    line = f"`{step.id}` {mask_secrets(step.title)} ({step.kind}{', ' + mode if mode else ''})"
    if command and step.undoes:
        line += " — " + translate("rollback.undoes", locale, command=f"`{cut_end(mask_secrets(command), 120)}`")
    elif command and command != step.title:
        line += f" — `{cut_end(mask_secrets(command), 120)}`"
    return line


def incident_message(view: IncidentView, locale: str, *, run_link: str | None,
                     oncall: list[str]) -> tuple[str, list[dict]]:
    """Return the fallback text and blocks of an incident message in its current state."""
    t = lambda key, **params: translate(key, locale, **params)  # noqa: E731 - local shorthand
    incident, run, plan = view.incident, view.run, view.plan
    data = incident.data or {}
    phase = next((item for item in plan.phases if item.number == incident.phase), None)
    phase_text = t("incident.phase", number=phase.number, title=phase.title) if phase else "-"
    header_key = "incident.header_closed" if not incident.open else "incident.header"
    header = cut_end(t(header_key, runbook=run.runbook, environment=run.environment,
                       reason=t(f"incident.reason_{incident.reason}")), MAX_HEADER_CHARS)

    lines = [t("incident.where", phase=phase_text, incident_id=incident.id, run_id=run.id)]
    if incident.step_id:
        seconds = data.get("seconds")
        lines.append(t("incident.failed_step", step_id=incident.step_id,
                       title=mask_secrets(data.get("step_title") or "-"), kind=data.get("step_kind") or "-",
                       seconds="-" if seconds is None else f"{seconds:g}"))
    if data.get("error"):
        lines.append(t("incident.error", error=cut_end(mask_secrets(str(data["error"])), 1200)))
    if data.get("readings"):
        lines.append(_readings_text(data["readings"], locale))
    if data.get("traffic_weight") is not None:
        lines.append(t("incident.traffic", weight=data["traffic_weight"]))
    lines.append(t("incident.started_by", user=person(run.started_by)))
    if run_link:
        lines.append(t("incident.run_thread", link=run_link))
    dashboards = [f"<{link.url}|{link.title}>" + (" 🆘" if link.emergency else "") for link in plan.links]
    if dashboards:
        lines.append(t("incident.dashboards", links=" · ".join(dashboards)))
    if oncall and incident.open:
        lines.append(t("incident.oncall", mentions=" ".join(mention(entry) for entry in oncall)))

    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        _section("\n".join(lines)),
    ]
    if data.get("tail"):
        blocks.append(output_block(list(data["tail"])))
    if incident.open and view.rollback_preview and "rollback" in view.actions:
        preview = [_step_line(step, locale) for step in view.rollback_preview]
        blocks.append(_section(t("incident.rollback_preview") + "\n" + "\n".join(preview)))
    others = [step for step in plan.emergency if not step.automated]
    if others and incident.open:
        blocks.append(_context(t("incident.emergency_notes") + " " + " · ".join(
            mask_secrets(step.title) for step in others)))

    state = _state_lines(view, locale)
    if state:
        blocks.append(_context("\n".join(state)))

    buttons = _buttons(view, locale)
    if buttons:
        blocks.append({"type": "actions", "block_id": f"incident:{incident.id}:{incident.round}",
                       "elements": buttons[:25]})
    return cut_end(header, 3000), fit_blocks(blocks)


def _state_lines(view: IncidentView, locale: str) -> list[str]:
    incident = view.incident
    lines = []
    for step_id, (actor, at) in sorted(view.emergency_done.items()):
        step = next((item for item in view.plan.emergency if item.id == step_id), None)
        lines.append(translate("incident.emergency_done", locale, step_id=step_id,
                               title=mask_secrets(step.title if step else step_id), user=person(actor), at=_when(at)))
    if incident.action:
        lines.append(translate("incident.action_taken", locale, user=person(incident.action_by),
                               action=translate(f"incident.action_{incident.action}", locale),
                               at=_when(incident.action_at)))
    if incident.rollback_run_id:
        lines.append(translate("incident.rollback_run", locale, run_id=incident.rollback_run_id))
    if not incident.open:
        lines.append(translate("incident.closed_line", locale,
                               resolution=translate(f"incident.resolution_{incident.resolution}", locale),
                               user=person(incident.closed_by), at=_when(incident.closed_at)))
    return lines


def _buttons(view: IncidentView, locale: str) -> list[dict]:
    incident = view.incident
    if not incident.open:
        return []
    value = json.dumps({"incident": incident.id, "round": incident.round})
    buttons = []

    def button(action_id: str, label: str, style: str | None, button_value: str = value) -> dict:
        item = {"type": "button", "action_id": action_id, "value": button_value,
                "text": {"type": "plain_text", "text": cut_end(label, MAX_BUTTON_CHARS)}}
        if style:
            item["style"] = style
        return item

    # Emergency actions stay available while the incident is open, even during its rollback.
    emergency = [button(EMERGENCY_PREFIX + step.id.removeprefix("e."),
                        translate("incident.button_emergency", locale, title=step.title), None,
                        json.dumps({"incident": incident.id, "round": incident.round, "step": step.id}))
                 for step in view.emergency if step.id not in view.emergency_done]
    if "rollback" not in view.actions:
        buttons += emergency
    for action in view.actions:
        if action == "rollback":
            buttons.append(button(ACTION_PREFIX + action, translate("incident.button_rollback", locale), "danger"))
            buttons += emergency
        elif action == "rerun":
            buttons.append(button(ACTION_PREFIX + action,
                                  translate("incident.button_rerun", locale, phase=view.rerun_phase), None))
        else:
            buttons.append(button(ACTION_PREFIX + action, translate(f"incident.button_{action}", locale),
                                  _BUTTON_STYLES.get(action)))
    return buttons


def _signature(incident: IncidentRecord, emergency_done: dict) -> dict:
    return {"round": incident.round, "action": incident.action, "status": incident.status,
            "rollback": incident.rollback_run_id, "emergency": sorted(emergency_done)}


class SlackIncidents:
    """Post and keep up to date the incident messages of one Slack bot."""

    def __init__(self, service) -> None:
        self.service = service
        self._locks: dict[str, asyncio.Lock] = {}

    async def sync(self, incident_id: str) -> None:
        """Bring the incident's message and thread up to date with the store. A Slack error is logged and retried later."""
        lock = self._locks.setdefault(incident_id, asyncio.Lock())
        async with lock:
            try:
                await self._sync(incident_id)
            except Exception:  # noqa: BLE001 - the watcher syncs again; the incident's state is in the store
                log.warning("incident %s: Slack could not be updated", incident_id, exc_info=True)

    async def _sync(self, incident_id: str) -> None:
        service = self.service
        store = service.store
        incident = await store.get_incident(incident_id)
        run = await store.get_run(incident.run_id)
        environments = service.environments()
        environment = environments.get(run.environment)
        if environment is None:
            log.warning("incident %s: environment %s is not configured any more", incident.id, run.environment)
            return
        locale = service.locale(environment)
        run_slack = (run.options or {}).get("slack") or {}
        view = await incident_view(store, incident, locale)
        signature = _signature(incident, view.emergency_done)
        data = dict(incident.data or {})
        if incident.ts is not None and data.get("posted_state") == signature:
            return

        client = service.client
        if data.get("run_link") is None and run_slack.get("ts"):
            data["run_link"] = await self._permalink(run_slack["channel"], run_slack["ts"])
        text, blocks = incident_message(view, locale, run_link=data.get("run_link"), oncall=environment.oncall)

        if incident.ts is None:
            channel = environment.slack_incidents_channel or run_slack.get("channel")
            if channel is None:
                return
            await service.pacer.space_posts(channel)
            response = await client.chat_postMessage(channel=channel, text=text, blocks=blocks)
            data["posted_state"] = signature
            await store.update_incident(incident.id, channel=channel, ts=response["ts"], data=data)
            link = await self._permalink(channel, response["ts"])
            await self._run_note(run_slack, translate("incident.opened_in_run", locale, incident_id=incident.id,
                                                      link=link or channel))
            return

        posted = data.get("posted_state") or {}
        await service.pacer.space_updates(incident.channel)
        await client.chat_update(channel=incident.channel, ts=incident.ts, text=text, blocks=blocks)
        notes = []
        if signature["round"] != posted.get("round") and incident.open:
            notes.append(translate("incident.new_round", locale, reason=translate(f"incident.reason_{incident.reason}",
                                                                                  locale),
                                   step_id=incident.step_id or "-",
                                   error=cut_end(mask_secrets(str(data.get("error") or "-")), 800)))
        if incident.action and incident.action != posted.get("action"):
            notes.append(translate("incident.action_taken", locale, user=person(incident.action_by),
                                   action=translate(f"incident.action_{incident.action}", locale),
                                   at=_when(incident.action_at)))
        for step_id in signature["emergency"]:
            if step_id not in (posted.get("emergency") or []):
                actor, at = view.emergency_done[step_id]
                notes.append(translate("incident.emergency_started", locale, step_id=step_id,
                                       user=person(actor), at=_when(at)))
        closed_now = not incident.open and posted.get("status") != "closed"
        if closed_now:
            notes.append(translate("incident.closed_note", locale,
                                   resolution=translate(f"incident.resolution_{incident.resolution}", locale),
                                   user=person(incident.closed_by)))
        for note in notes:
            await service.pacer.space_posts(incident.channel)
            await client.chat_postMessage(channel=incident.channel, thread_ts=incident.ts, text=note)
        data["posted_state"] = signature
        await store.update_incident(incident.id, data=data)
        if closed_now:
            await self._refresh_run_message(run)
            await self._run_note(run_slack, translate("incident.closed_in_run", locale, incident_id=incident.id,
                                                      resolution=translate(f"incident.resolution_{incident.resolution}",
                                                                           locale),
                                                      user=person(incident.closed_by)))

    async def _permalink(self, channel: str, ts: str) -> str | None:
        try:
            response = await self.service.client.chat_getPermalink(channel=channel, message_ts=ts)
            return response.get("permalink")
        except Exception as error:  # noqa: BLE001 - a message without the link is still useful
            log.warning("permalink of %s/%s failed: %s", channel, ts, error)
            return None

    async def _run_note(self, run_slack: dict, text: str) -> None:
        if not run_slack.get("ts"):
            return
        await self.service.pacer.space_posts(run_slack["channel"])
        await self.service.client.chat_postMessage(channel=run_slack["channel"],
                                                   thread_ts=run_slack.get("thread_ts") or run_slack["ts"], text=text)

    async def _refresh_run_message(self, run) -> None:
        """Show the run's final state (such as rolled back) in its root message, which no engine edits any more."""
        from bot.plan import Plan
        from bot.slack.blocks import root_message
        from bot.slack.views import build_run_view

        run = await self.service.store.get_run(run.id)
        run_slack = (run.options or {}).get("slack") or {}
        if not run_slack.get("ts"):
            return
        environment = self.service.environments().get(run.environment)
        text, blocks = root_message(build_run_view(run, Plan.model_validate(run.plan),
                                                   await self.service.store.steps(run.id)),
                                    self.service.locale(environment))
        await self.service.pacer.space_updates(run_slack["channel"])
        await self.service.client.chat_update(channel=run_slack["channel"], ts=run_slack["ts"], text=text,
                                              blocks=blocks)


class IncidentNotifier:
    """An engine notifier that syncs the incident message when the engine opens, reopens or closes an incident."""

    def __init__(self, incidents: SlackIncidents) -> None:
        self.incidents = incidents

    def output_line(self, run_id: str, step, line: str) -> None:
        return None

    async def notify(self, event: RunEvent) -> None:
        if event.type.startswith("incident.") and event.data.get("incident"):
            await self.incidents.sync(event.data["incident"])
