"""Subcommands of the `postmerge` command line. bot/cli.py parses their arguments."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bot.config import SANDBOX, Environment, Settings, default_environment, load_environments
from pydantic import ValidationError

from bot.errors import ConfigError, RunbookError, UsageError
from bot.i18n import translate
from bot.model import Problem, Runbook, Severity
from bot.parser import read_runbook
from bot.plan import Plan
from bot.planner import build_plan

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    try:
        settings = Settings()
    except ValidationError as error:
        first = error.errors()[0]
        name = "POSTMERGE_" + str(first["loc"][0]).upper() if first["loc"] else "POSTMERGE_*"
        raise ConfigError("config.invalid_setting", name=name, error=first["msg"]) from None
    if getattr(args, "config", None):
        settings.config = args.config
        # A config file named on the command line is read now, so a mistake in it shows at once.
        load_environments(settings)
    return settings


def format_problem(path: str, problem: Problem, locale: str) -> str:
    severity = translate(f"lint.severity_{problem.severity.value}", locale)
    message = translate(problem.key, locale, **problem.params)
    return f"{path}:{problem.line}: {severity}: {message}"


def load_and_plan(path: Path, environment: Environment | None) -> tuple[Runbook, Plan, list[Problem]]:
    runbook = read_runbook(path)
    plan, planner_problems = build_plan(runbook, environment)
    problems = sorted(runbook.problems + planner_problems, key=lambda problem: problem.line)
    return runbook, plan, problems


def _print_problems(console: Console, path: Path, problems: list[Problem], locale: str, *, errors_only: bool = False) -> None:
    for problem in problems:
        if errors_only and problem.severity is not Severity.ERROR:
            continue
        style = "red" if problem.severity is Severity.ERROR else "yellow"
        console.print(Text(format_problem(str(path), problem, locale), style=style), soft_wrap=True)


def _refuse_unsound(console: Console, path: Path, problems: list[Problem], locale: str) -> None:
    if any(problem.severity is Severity.ERROR for problem in problems):
        _print_problems(Console(stderr=True, highlight=False), path, problems, locale, errors_only=True)
        raise RunbookError("runbook.unsound", path=str(path))


def resolve_environment(settings: Settings, name: str | None, locale: str | None = None) -> Environment:
    if name is None:
        return default_environment()
    environments = load_environments(settings)
    if name not in environments:
        if name == SANDBOX:
            raise UsageError("cli.sandbox_not_up")
        known = ", ".join(sorted(environments)) or "-"
        config = settings.config or Path("postmerge.toml")
        where = str(config.resolve()) if config.is_file() else translate("cli.config_missing", locale, path=str(config))
        raise UsageError("cli.unknown_environment", name=name, known=known, config=where)
    return environments[name]


# -- lint and plan ------------------------------------------------------------

def lint_command(args: argparse.Namespace, console: Console, locale: str) -> int:
    try:
        _, _, problems = load_and_plan(args.file, None)
    except RunbookError as error:
        # The file could not be read at all: a usage error, not an unsound runbook.
        console.print(Text(f"{args.file}:1: {translate('lint.severity_error', locale)}: {error.render(locale)}",
                           style="red"), soft_wrap=True)
        return EXIT_USAGE
    _print_problems(console, args.file, problems, locale)
    if any(problem.severity is Severity.ERROR for problem in problems):
        return EXIT_FAILED
    if not problems:
        console.print(Text(translate("lint.ok", locale, path=str(args.file)), style="green"))
    return EXIT_OK


def plan_command(args: argparse.Namespace, console: Console, locale: str) -> int:
    environment = resolve_environment(_settings(args), args.env, locale)
    _, plan, problems = load_and_plan(args.file, environment)
    _refuse_unsound(console, args.file, problems, locale)
    if args.json:
        contract = plan.contract()
        contract["problems"] = [
            {"line": problem.line, "severity": problem.severity.value, "key": problem.key,
             "message": translate(problem.key, locale, **problem.params)}
            for problem in problems
        ]
        print(json.dumps(contract, ensure_ascii=False, indent=2))
        return EXIT_OK
    print_plan(console, plan, locale)
    _print_problems(console, args.file, problems, locale)
    return EXIT_OK


def print_plan(console: Console, plan: Plan, locale: str, *, dry_run: bool = False) -> None:
    t = lambda message_key, **params: translate(message_key, locale, **params)  # noqa: E731 - local shorthand
    total = (plan.total_planned_seconds or 0) // 60
    console.print(Text(t("plan.header", runbook=plan.runbook, environment=plan.environment, minutes=total),
                       style="bold"))
    sections = [(f"Phase {phase.number}: {phase.title}", phase.planned_seconds, phase.steps) for phase in plan.phases]
    if plan.verification:
        sections.append((t("plan.verification"), None, plan.verification))
    for group in plan.rollback:
        phases = ", ".join(str(number) for number in group.phases)
        sections.append((t("plan.rollback_group", phases=phases, title=group.title), None, group.steps))
    if plan.emergency:
        sections.append((t("plan.emergency"), None, plan.emergency))

    for title, planned, steps in sections:
        heading = title + (f"  ({t('plan.planned_minutes', minutes=planned // 60)})" if planned else "")
        table = Table(title=heading, title_justify="left", title_style="bold cyan", show_lines=False, expand=True)
        table.add_column("ID", no_wrap=True)
        table.add_column(t("plan.col_kind"), no_wrap=True)
        table.add_column(t("plan.col_mode"), no_wrap=True)
        # fold breaks long Japanese text without spaces instead of cutting it off.
        table.add_column(t("plan.col_step"), overflow="fold")
        table.add_column(t("plan.col_detail"), overflow="fold")
        for step in steps:
            mode = t("plan.automated") if step.automated else t("plan.manual")
            if step.requires_approval:
                mode += " + " + t("plan.approval")
            table.add_row(step.id, step.kind, mode, step.title, describe_step(step, locale, dry_run=dry_run))
        console.print(table)


def describe_step(step, locale: str, *, dry_run: bool = False) -> str:
    t = lambda message_key, **params: translate(message_key, locale, **params)  # noqa: E731 - local shorthand
    parts: list[str] = []
    if step.kind == "http":
        parts.append(t("plan.detail_http", method=step.method or "GET", url=step.target_url or step.url,
                       status=step.expect_status or "2xx", timeout=f"{step.timeout_seconds or 0:g}"))
        if step.expect_json is not None:
            parts.append(t("plan.detail_expect_json", json=json.dumps(step.expect_json, ensure_ascii=False)))
    elif step.kind == "env":
        for key, value in step.variables.items():
            parts.append(t("plan.detail_env", key=key, value=value, file=step.file))
    elif step.kind == "sql":
        parts.append(t("plan.detail_sql", query=step.query))
    elif step.kind == "traffic":
        parts.append(t("plan.detail_traffic", weight=step.weight))
    elif step.kind == "monitor":
        thresholds = ", ".join(f"{key}={value:g}" for key, value in step.thresholds.items())
        parts.append(t("plan.detail_monitor", seconds=step.duration_seconds, thresholds=thresholds or "-"))
        if step.params.get("time_scale"):
            scale = step.params["time_scale"]
            parts.append(t("plan.detail_time_scale", scale=f"{scale:g}",
                           seconds=f"{(step.duration_seconds or 0) * scale:g}"))
    elif step.run_command:
        parts.append(t("plan.detail_shell", command=step.run_command))
        if step.commands and step.run_command != step.commands[0]:
            parts.append(t("plan.detail_substituted", command=step.commands[0]))
    elif step.commands:
        parts.append(" / ".join(step.commands))
    if step.manual_reason:
        parts.append(t(step.manual_reason, **step.reason_params()))
    if step.prerequisite_of:
        parts.append(t("plan.detail_prerequisite", step_id=step.prerequisite_of))
    if step.id.startswith("r") and step.kind == "kubernetes" and step.automated:
        from bot.rollback import collects_logs

        if collects_logs(step):
            parts.append(t("plan.detail_logs_first"))
    if step.match is not None:
        parts.append(t(f"plan.match_{step.match.reason}", task=step.match.task, line=step.match.task_line,
                       score=step.match.score))
    if step.approval_note:
        parts.append(t("gate.approval_note", note=step.approval_note))
    for expectation in step.unchecked_expectations:
        parts.append(t("plan.detail_unchecked", text=expectation))
    if dry_run and step.automated and step.kind not in ("manual", "approval"):
        parts.insert(0, t("plan.would_run"))
    return "\n".join(parts)


# -- commands that use the store --------------------------------------------------

async def run_async_command(args: argparse.Namespace, console: Console, locale: str) -> int:
    settings = _settings(args)
    if args.command == "sandbox":
        return await sandbox_command(args, console, locale, settings)
    if args.command == "run" and args.dry_run:
        return dry_run_command(args, console, locale, settings)

    from storage import Store

    if args.command == "serve":
        settings.locale = locale
        return await serve_command(args, console, settings)

    prepared = None
    if args.command == "run":
        # Check the runbook before the store is opened, so an unsound one leaves nothing behind.
        prepared = _prepare_run(args, console, locale, settings)

    store = await Store.open(settings.store_url(args.db))
    try:
        if prepared is not None:
            return await run_command(args, console, locale, settings, store, prepared)
        if args.command == "status":
            return await status_command(args, console, locale, store)
        if args.command == "resume":
            return await resume_command(args, console, locale, settings, store)
        if args.command == "abort":
            return await abort_command(args, console, locale, store)
        if args.command == "rollback":
            return await rollback_command(args, console, locale, settings, store)
        if args.command == "emergency":
            return await emergency_command(args, console, locale, settings, store)
    finally:
        await store.close()
    raise UsageError("cli.unknown_command", command=args.command)


def dry_run_command(args, console: Console, locale: str, settings: Settings) -> int:
    environment = resolve_environment(settings, args.env, locale)
    _, plan, problems = load_and_plan(args.file, environment)
    _refuse_unsound(console, args.file, problems, locale)
    console.print(Text(translate("cli.dry_run_header", locale, workdir=str(environment.workdir)), style="bold"))
    print_plan(console, plan, locale, dry_run=True)
    return EXIT_OK


def _engine(settings: Settings, store, environment: Environment, locale: str, console: Console, *,
            yes: bool, runbook_path: Path | None, language: str, on_interrupted: str | None = None):
    from bot.engine import Engine
    from bot.terminal import AutoInteraction, TerminalInteraction, TerminalView, terminal_actor
    from bot.writeback import RunbookWriteback

    if yes and environment.protected:
        raise UsageError("cli.yes_protected", environment=environment.name)
    view = TerminalView(console, locale)
    actor = terminal_actor()
    interaction = AutoInteraction(console, locale, f"{actor} (--yes)") if yes else TerminalInteraction(console, view, locale)
    notifiers = [view]
    if environment.writeback and runbook_path is not None and runbook_path.is_file():
        notifiers.append(RunbookWriteback(runbook_path, language))
    return Engine(store, environment, interaction, notifiers, home=settings.home, locale=locale, actor=actor,
                  on_interrupted=on_interrupted)


def _prepare_run(args, console: Console, locale: str, settings: Settings) -> tuple[Environment, Runbook, Plan]:
    environment = resolve_environment(settings, args.env, locale)
    if args.yes and environment.protected:
        raise UsageError("cli.yes_protected", environment=environment.name)
    if not environment.workdir.is_dir():
        raise ConfigError("cli.workdir_missing", environment=environment.name, path=str(environment.workdir))
    runbook, plan, problems = load_and_plan(args.file, environment)
    _refuse_unsound(console, args.file, problems, locale)
    plan.runbook_path = str(args.file.resolve())
    return environment, runbook, plan


async def run_command(args, console: Console, locale: str, settings: Settings, store,
                      prepared: tuple[Environment, Runbook, Plan]) -> int:
    from bot.terminal import terminal_actor

    environment, runbook, plan = prepared
    engine = _engine(settings, store, environment, locale, console, yes=args.yes, runbook_path=args.file.resolve(),
                     language=runbook.language)
    run_id = await engine.start(plan, started_by=terminal_actor())
    console.print(Text(translate("cli.run_created", locale, run_id=run_id), style="dim"))
    outcome = await engine.drive(run_id)
    return outcome.exit_code


async def resume_command(args, console: Console, locale: str, settings: Settings, store) -> int:
    run = await store.get_run(args.run_id)
    environment = resolve_environment(settings, None if run.environment == "default" else run.environment, locale)
    plan = Plan.model_validate(run.plan)
    engine = _engine(settings, store, environment, locale, console, yes=args.yes,
                     runbook_path=Path(run.runbook_path), language=plan.language, on_interrupted=args.on_interrupted)
    incident = await store.incident_of_run(run.id)
    if incident is not None and incident.open and incident.reason != "interrupted" and run.status != "paused":
        # A resume is the incident's retry (or re-run). It is recorded once, so the Slack message shows who chose it.
        action = "rerun" if args.phase is not None else "retry"
        if incident.action is None:
            won, incident = await store.take_incident_action(incident.id, incident.round, action, engine.actor)
        if incident.action not in ("retry", "rerun", "skip"):
            raise UsageError("incident.acted_already", incident_id=incident.id,
                             action=translate(f"incident.action_{incident.action}", locale),
                             actor=incident.action_by or "-", at=_when(incident.action_at))
    if args.phase is not None:
        # "修正後、Phase 6を再実行": the whole phase runs again from its first step.
        await engine.reopen_phase(run.id, args.phase)
    else:
        # A failed run resumes at its failed step, for example after an API outage was fixed.
        await engine.reopen(run.id)
    outcome = await engine.drive(run.id)
    return outcome.exit_code


async def rollback_command(args, console: Console, locale: str, settings: Settings, store) -> int:
    from bot.plan import Plan
    from bot.rollback import build_rollback_plan, rollback_steps
    from bot.terminal import terminal_actor

    run = await store.get_run(args.run_id)
    environment = resolve_environment(settings, None if run.environment == "default" else run.environment, locale)
    actor = terminal_actor()
    incident = await store.incident_of_run(run.id)
    if incident is not None and incident.open and incident.rollback_run_id is not None:
        rollback = await store.get_run(incident.rollback_run_id)
        if rollback.active or rollback.status == "completed":
            raise UsageError("cli.rollback_exists", run_id=run.id, rollback_id=rollback.id,
                             actor=incident.action_by or "-", status=translate(f"status.{rollback.status}", locale))
    if incident is not None and incident.open and incident.action not in (None, "rollback"):
        from bot import incidents

        incidents.check_action(incident, Plan.model_validate(run.plan), "rollback", locale)
    records = await store.steps(run.id)
    rollback_plan = build_rollback_plan(run, records, translate("rollback.inverse_title", locale), locale=locale)
    engine = _engine(settings, store, environment, locale, console, yes=args.yes,
                     runbook_path=Path(run.runbook_path), language=rollback_plan.language)
    steps = rollback_steps(rollback_plan)
    if not args.yes and not await _confirm_rollback(console, locale, run.id, steps):
        console.print(Text(translate("cli.rollback_cancelled", locale, run_id=run.id)), style="yellow")
        return EXIT_USAGE
    if incident is not None and incident.open and incident.action is None:
        # Recorded on the incident, so its Slack message shows who chose the rollback and no second one starts.
        won, incident = await store.take_incident_action(incident.id, incident.round, "rollback", actor)
        if not won and incident.action != "rollback":
            raise UsageError("incident.acted_already", incident_id=incident.id,
                             action=translate(f"incident.action_{incident.action}", locale),
                             actor=incident.action_by or "-", at=_when(incident.action_at))
    rollback_id = await engine.start(rollback_plan, started_by=actor, kind="rollback",
                                     parent_run_id=run.id, steps=steps)
    if incident is not None and incident.open:
        await store.update_incident(incident.id, rollback_run_id=rollback_id, event_type="incident.rollback_started",
                                    actor=actor, event_data={"rollback_run_id": rollback_id})
    console.print(Text(translate("cli.rollback_created", locale, run_id=rollback_id, parent=run.id), style="dim"))
    outcome = await engine.drive(rollback_id)
    return outcome.exit_code


async def emergency_command(args, console: Console, locale: str, settings: Settings, store) -> int:
    """Carry out the emergency action e.N that the run's runbook lists under 緊急時."""
    from bot.rollback import build_emergency_plan, rollback_steps
    from bot.terminal import terminal_actor

    run = await store.get_run(args.run_id)
    if run.kind != "run":
        raise UsageError("rollback.not_a_forward_run", run_id=run.id)
    environment = resolve_environment(settings, None if run.environment == "default" else run.environment, locale)
    plan = build_emergency_plan(run, args.number, translate("incident.emergency_title", locale))
    steps = rollback_steps(plan)
    engine = _engine(settings, store, environment, locale, console, yes=args.yes,
                     runbook_path=Path(run.runbook_path), language=plan.language)
    if not args.yes and not await _confirm_rollback(console, locale, run.id, steps, heading="cli.emergency_steps"):
        console.print(Text(translate("cli.emergency_cancelled", locale, run_id=run.id)), style="yellow")
        return EXIT_USAGE
    actor = terminal_actor()
    incident = await store.incident_of_run(run.id)
    emergency_id = await engine.start(plan, started_by=actor, kind="emergency", parent_run_id=run.id, steps=steps)
    if incident is not None and incident.open:
        await store.append_event(run.id, "incident.emergency", actor=actor,
                                 data={"incident": incident.id, "step_id": steps[0].id})
    console.print(Text(translate("cli.emergency_created", locale, run_id=emergency_id, parent=run.id,
                                 step_id=steps[0].id), style="dim"))
    outcome = await engine.drive(emergency_id)
    return outcome.exit_code


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp or 0).strftime("%Y-%m-%d %H:%M:%S")


async def _confirm_rollback(console: Console, locale: str, run_id: str, steps, *,
                            heading: str = "cli.rollback_steps") -> bool:
    """Show the rollback (or emergency) steps and ask whether to start them."""
    from bot.terminal import StdinLines

    console.print(Text(translate(heading, locale, run_id=run_id), style="bold"))
    for step in steps:
        mode = translate("plan.automated" if step.automated else "plan.manual", locale)
        if step.requires_approval:
            mode += " + " + translate("plan.approval", locale)
        console.print(Text(f"  {step.id}  [{step.kind}, {mode}]  {step.title}"), highlight=False)
        command = step.run_command or (step.commands[0] if step.commands else None)
        if command and step.undoes:
            # An inverse runs the executor's undo of the command, not the command itself.
            console.print(Text("        " + translate("rollback.undoes", locale, command=command), style="dim"),
                          highlight=False)
        elif command:
            console.print(Text(f"        $ {command}", style="dim"), highlight=False)
    reader = StdinLines.shared()
    while True:
        console.print(Text(translate("cli.rollback_confirm", locale)), end="")
        answer = await reader.readline()
        if answer is None:
            return False
        if answer.strip().lower() in ("y", "yes"):
            return True
        if answer.strip().lower() in ("a", "n", "no"):
            return False


async def abort_command(args, console: Console, locale: str, store) -> int:
    from bot.terminal import terminal_actor
    from storage.store import owner_alive

    run = await store.get_run(args.run_id)
    if not run.active:
        raise UsageError("cli.abort_not_active", run_id=run.id, status=translate(f"status.{run.status}", locale))
    actor = terminal_actor()
    await store.request_abort(run.id, actor)
    if run.owner and owner_alive(run.owner):
        console.print(Text(translate("cli.abort_requested", locale, run_id=run.id, owner=run.owner)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            current = await store.get_run(run.id)
            if not current.active:
                console.print(Text(translate("cli.abort_done", locale, run_id=run.id, status=translate(f"status.{current.status}", locale))))
                return EXIT_OK
            import asyncio

            await asyncio.sleep(0.5)
        console.print(Text(translate("cli.abort_pending", locale, run_id=run.id)), style="yellow")
        return EXIT_FAILED
    # No live process owns the run, so the abort takes effect here, including
    # on step processes that outlived the process that started them.
    from bot.engine import abort_unowned

    await abort_unowned(store, run, actor, locale, on_stop=lambda step_id, pgid: console.print(
        Text(translate("cli.abort_stopping_process", locale, step_id=step_id, pgid=pgid))))
    console.print(Text(translate("cli.abort_done", locale, run_id=run.id, status=translate("status.aborted", locale))))
    return EXIT_OK


async def status_command(args, console: Console, locale: str, store) -> int:
    from storage.store import owner_alive

    runs = await store.list_runs(active_only=False, limit=50 if args.all else 20)
    rows = []
    for run in runs:
        steps = await store.steps(run.id)
        done = sum(1 for step in steps if step.status in ("succeeded", "skipped", "approved"))
        current = next((step for step in steps if step.status in ("running", "waiting", "interrupted")), None)
        # A running or waiting run whose process is gone needs `postmerge resume`.
        orphaned = run.status in ("running", "waiting") and not owner_alive(run.owner)
        traffic = await store.last_event(run.id, "traffic.changed")
        incident = await store.incident_of_run(run.id) if run.kind == "run" else None
        rows.append({
            "id": run.id,
            "kind": run.kind,
            "parent_run_id": run.parent_run_id,
            "runbook": run.runbook,
            "environment": run.environment,
            "status": run.status,
            "started_by": run.started_by,
            "created_at": run.created_at,
            "finished_at": run.finished_at,
            "current_phase": run.current_phase,
            "current_step": current.step_id if current else None,
            "current_step_status": current.status if current else None,
            "failed_step": run.failed_step,
            "steps_done": done,
            "steps_total": len(steps),
            "error": run.error,
            "owner": run.owner,
            "orphaned": orphaned,
            # Blue's (v2's) share of traffic after the run's last traffic change, if it made one.
            "traffic_weight": (traffic["data"] or {}).get("weight") if traffic else None,
            "incident": None if incident is None else {
                "id": incident.id, "status": incident.status, "reason": incident.reason, "round": incident.round,
                "action": incident.action, "action_by": incident.action_by, "resolution": incident.resolution,
                "closed_by": incident.closed_by, "rollback_run_id": incident.rollback_run_id,
            },
        })
    if args.json:
        print(json.dumps({"runs": rows}, ensure_ascii=False, indent=2))
        return EXIT_OK
    if not rows:
        console.print(translate("status.none", locale))
        return EXIT_OK
    t = lambda message_key, **params: translate(message_key, locale, **params)  # noqa: E731 - local shorthand
    table = Table(expand=True)
    for column in ("run", "runbook", "environment", "status", "phase", "progress", "started"):
        table.add_column(t(f"status.col_{column}"), overflow="fold")
    for row in rows:
        phase = str(row["current_phase"] or "-")
        if row["current_step"]:
            phase += f" ({row['current_step']} {t('status.step_' + row['current_step_status'])})"
        if row["failed_step"]:
            phase += " " + t("status.failed_at", step=row["failed_step"])
        if row["traffic_weight"] is not None:
            phase += " " + t("status.traffic", weight=row["traffic_weight"])
        if row["incident"] is not None:
            phase += " " + incident_summary(row["incident"], locale)
        kind = {"run": "", "emergency": f" ⚡ {row['parent_run_id']}"}.get(row["kind"], f" ↩ {row['parent_run_id']}")
        state = t(f"status.{row['status']}")
        if row["orphaned"]:
            state = t("status.orphaned", run_id=row["id"])
        table.add_row(row["id"] + kind, row["runbook"], row["environment"], state,
                      phase, f"{row['steps_done']}/{row['steps_total']}",
                      datetime.fromtimestamp(row["created_at"]).strftime("%m-%d %H:%M"))
    console.print(table)
    return EXIT_OK


def incident_summary(incident: dict, locale: str) -> str:
    """Describe a run's incident in one phrase for `status`: open and what was chosen, or how it closed."""
    if incident["status"] == "open":
        if incident["action"]:
            return translate("status.incident_acting", locale, incident_id=incident["id"],
                             action=translate(f"incident.action_{incident['action']}", locale),
                             actor=incident["action_by"] or "-")
        return translate("status.incident_open", locale, incident_id=incident["id"],
                         reason=translate(f"incident.reason_{incident['reason']}", locale))
    return translate("status.incident_closed", locale, incident_id=incident["id"],
                     resolution=translate(f"incident.resolution_{incident['resolution']}", locale))


async def serve_command(args, console: Console, settings: Settings) -> int:
    """Serve the Slack bot until interrupted."""
    from bot.slack.app import serve
    from bot.slack.service import load_slack_settings
    from storage import Store

    slack = load_slack_settings()
    # Read postmerge.toml now, so a broken file stops start-up rather than the first command.
    load_environments(settings)
    store = await Store.open(settings.store_url(args.db))
    # SIGTERM (as Kubernetes sends it) stops the bot the way Ctrl-C does: runs stop
    # between commits, release their leases, and the next bot picks them up.
    serving = asyncio.ensure_future(serve(settings, slack, store, args.port,
                                          announce=lambda text: console.print(Text(text, style="green"))))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        log.info("stopped on SIGTERM")
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await store.close()
    return EXIT_OK


async def sandbox_command(args, console: Console, locale: str, settings: Settings) -> int:
    import bot.sandbox as sandbox

    home = settings.home
    action = args.sandbox_command
    if action == "up":
        state = await sandbox.up(home, reset=args.reset)
        params = dict(database=state.get("database", ""), rows=state.get("rows", ""),
                      workdir=str(state.get("workdir", "")), url=(state.get("service") or {}).get("url", ""))
        if args.reset:
            console.print(Text(translate("sandbox.up_reset_done", locale, **params), style="green"))
        console.print(Text(translate("sandbox.up_ready", locale, **params), style="green"))
        if state.get("nginx"):
            console.print(Text(translate("sandbox.up_systems", locale, nginx=state["nginx"]["url"],
                                         kubeconfig=str(home / "sandbox" / "kubeconfig"),
                                         rate=(state["services"].get("loadgen") or {}).get("rate", "-"))))
        else:
            console.print(Text(translate("sandbox.up_without_nginx", locale), style="yellow"))
        return EXIT_OK
    if action == "down":
        before = sandbox.sandbox_status(home)
        await sandbox.down(home, purge=args.purge)
        if args.purge:
            console.print(Text(translate("sandbox.down_purged", locale, database=before.get("database") or "-",
                                         path=str(home / "sandbox"))))
        else:
            console.print(Text(translate("sandbox.down_done", locale)))
        return EXIT_OK
    if action == "switch":
        from bot.sandbox._state import parse_switch_value

        value = parse_switch_value(args.name, args.value)
        sandbox.set_switch(home, args.name, value)
        if isinstance(value, bool):
            console.print(Text(translate(f"sandbox.switch_{'on' if value else 'off'}", locale, name=args.name)))
        else:
            console.print(Text(translate("sandbox.switch_value", locale, name=args.name, value=f"{value:g}")))
        return EXIT_OK
    print(json.dumps(sandbox.sandbox_status(home), ensure_ascii=False, indent=2, default=str))
    return EXIT_OK

