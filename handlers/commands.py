"""The `/postmerge` slash command. Each handler acks first, then calls the service."""

from __future__ import annotations

import logging

from bot.errors import PostmergeError
from bot.i18n import translate

log = logging.getLogger(__name__)


def register(app, service) -> None:
    @app.command("/postmerge")
    async def postmerge_command(ack, command, client):
        await ack()
        await dispatch(service, client, command)


async def dispatch(service, client, command: dict) -> None:
    user = command["user_id"]
    channel = command["channel_id"]
    words = (command.get("text") or "").split()
    locale = service.settings.locale

    async def say_private(text: str) -> None:
        try:
            await client.chat_postEphemeral(channel=channel, user=user, text=text)
        except Exception as error:  # noqa: BLE001 - the reply is lost but nothing ran on it
            log.warning("ephemeral reply to %s failed: %s", user, error)

    subcommand = words[0].lower() if words else "help"
    arguments = words[1:]
    try:
        if subcommand == "help":
            await say_private(translate("slack.usage", locale))
        elif subcommand == "start" and 1 <= len(arguments) <= 2:
            environment = arguments[1] if len(arguments) == 2 else "sandbox"
            run_id = await service.start_run(arguments[0], environment, user, channel)
            await say_private(translate("slack.started", locale, runbook=arguments[0], environment=environment,
                                        run_id=run_id))
        elif subcommand == "plan" and 1 <= len(arguments) <= 2:
            await say_private(await plan_summary(service, arguments[0], arguments[1] if len(arguments) == 2 else "sandbox"))
        elif subcommand == "status" and len(arguments) <= 1:
            await say_private(await status_text(service, arguments[0] if arguments else None, locale))
        elif subcommand == "rerun" and len(arguments) == 2 and arguments[1].isdigit():
            run = await service.rerun_phase(arguments[0], int(arguments[1]), user)
            await say_private(translate("slack.rerun_started", locale, run_id=run.id, phase=arguments[1]))
        elif subcommand == "abort" and len(arguments) == 1:
            run = await service.request_abort(arguments[0], user)
            await say_private(translate("slack.abort_requested", locale, run_id=run.id))
        else:
            await say_private(translate("slack.unknown_subcommand", locale, command=" ".join(words)[:100],
                                        usage=translate("slack.usage", locale)))
    except PostmergeError as error:
        await say_private(error.render(locale))


async def plan_summary(service, runbook_name: str, environment_name: str) -> str:
    from bot.commands import load_and_plan

    environment = service.environment(environment_name)
    locale = service.locale(environment)
    path = service.find_runbook(runbook_name, environment)
    _, plan, _ = load_and_plan(path, environment)
    steps = plan.steps()
    return translate(
        "slack.plan_summary", locale, runbook=plan.runbook, environment=environment.name, phases=len(plan.phases),
        steps=len(steps), automated=sum(1 for step in steps if step.automated),
        manual=sum(1 for step in steps if not step.automated),
        approvals=sum(1 for step in steps if step.requires_approval),
        minutes=(plan.total_planned_seconds or 0) // 60,
    )


async def status_text(service, runbook: str | None, locale: str) -> str:
    runs = await service.store.list_runs(limit=20)
    if runbook:
        runs = [run for run in runs if run.runbook == runbook]
    if not runs:
        return translate("slack.no_runs", locale)
    from bot.commands import incident_summary

    lines = []
    for run in runs[:10]:
        line = translate("slack.status_line", locale, run_id=run.id, runbook=run.runbook,
                         environment=run.environment, status=translate(f"status.{run.status}", locale),
                         phase=run.current_phase or "-")
        if run.kind != "run":
            line += " " + translate(f"slack.status_{run.kind}_of", locale, run_id=run.parent_run_id or "-")
        incident = await service.store.incident_of_run(run.id) if run.kind == "run" else None
        if incident is not None:
            line += " · " + incident_summary(vars(incident), locale)
        lines.append(line)
    return "\n".join(lines)
