"""The Slack side of postmerge: settings, permissions, and runs started from slash commands.

Handlers in handlers/ translate Slack payloads into calls on SlackService.
The service plans, stores and drives runs with the same engine as the
terminal, and it posts buttons for their gates.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.config import Environment, Settings, load_environments
from bot.errors import ConfigError, PostmergeError, UsageError
from bot.gates import GateAnswer, GateRequest
from bot.i18n import translate
from bot.slack.pacing import ChannelPacer
from storage import owner_id

log = logging.getLogger(__name__)

RUNBOOK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DECISION_POLL_SECONDS = 0.5
# An incident opened from a terminal is posted by a bot that starts within this time.
UNPOSTED_INCIDENT_MAX_AGE_SECONDS = 24 * 3600


class SlackSettings(BaseSettings):
    """Slack settings from the process environment."""

    model_config = SettingsConfigDict(extra="ignore")

    slack_bot_token: str = ""
    slack_signing_secret: str | None = None
    slack_app_token: str | None = None
    slack_api_url: str = "https://slack.com/api/"
    # Where `start` looks for runbooks unless the environment sets runbook_dir.
    postmerge_runbook_dir: Path = Field(default_factory=lambda: Path.cwd() / "runbooks")

    @model_validator(mode="after")
    def _normalize(self) -> SlackSettings:
        # An empty variable counts as unset, as shells and Kubernetes often leave one behind.
        self.slack_signing_secret = self.slack_signing_secret or None
        self.slack_app_token = self.slack_app_token or None
        if not self.slack_api_url.endswith("/"):
            self.slack_api_url += "/"
        return self


def load_slack_settings() -> SlackSettings:
    """Read the Slack settings from the process environment and check them; raise ConfigError naming the first problem."""
    from urllib.parse import urlsplit

    try:
        settings = SlackSettings()
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError("slack.invalid_setting", name=str(first["loc"][0]).upper(), error=first["msg"]) from None
    if not settings.slack_bot_token:
        raise ConfigError("slack.missing_setting", name="SLACK_BOT_TOKEN")
    if not settings.slack_bot_token.startswith("xoxb-"):
        raise ConfigError("slack.invalid_bot_token")
    if settings.slack_app_token is not None and not settings.slack_app_token.startswith("xapp-"):
        raise ConfigError("slack.invalid_app_token")
    if settings.slack_app_token is None and settings.slack_signing_secret is None:
        raise ConfigError("slack.missing_signing_secret")
    url = urlsplit(settings.slack_api_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("slack.invalid_api_url", url=settings.slack_api_url)
    return settings


class SlackService:
    def __init__(self, settings: Settings, slack: SlackSettings, store, client) -> None:
        self.settings = settings
        self.slack = slack
        self.store = store
        self.client = client
        self.tasks: dict[str, asyncio.Task] = {}
        self.pacer = ChannelPacer()
        self._runs_lock = asyncio.Lock()
        from bot.slack.incidents import SlackIncidents

        self.incidents = SlackIncidents(self)
        # Work started by a button that outlives the request, such as waiting for a run to stop before its rollback.
        self._background: set[asyncio.Task] = set()

    # -- lookups ------------------------------------------------------------

    def environments(self) -> dict[str, Environment]:
        return load_environments(self.settings)

    def environment(self, name: str) -> Environment:
        environments = self.environments()
        if name not in environments:
            raise UsageError("slack.unknown_environment", name=name, known=", ".join(sorted(environments)) or "-")
        return environments[name]

    def locale(self, environment: Environment | None) -> str:
        return (environment.locale if environment and environment.locale else None) or self.settings.locale

    def find_runbook(self, name: str, environment: Environment) -> Path:
        """Find a runbook by file name (without .md) or by its `# Post-Merge Tasks:` name."""
        if not RUNBOOK_NAME.match(name) or ".." in name:
            raise UsageError("slack.invalid_runbook_name", name=name)
        folder = environment.runbook_dir or self.slack.postmerge_runbook_dir
        candidate = folder / f"{name}.md"
        if candidate.is_file():
            return candidate
        if folder.is_dir():
            for path in sorted(folder.glob("*.md")):
                with path.open(encoding="utf-8", errors="replace") as handle:
                    first = handle.readline().strip()
                if re.sub(r"^#\s*(?:Post-Merge Tasks|マージ後タスク)\s*[:：]\s*", "", first) == name and first.startswith("#"):
                    return path
        raise UsageError("slack.runbook_not_found", name=name, folder=str(folder))

    async def is_member(self, user_id: str, allowed: list[str]) -> bool:
        """Return whether user_id is listed, directly or through a user group; an empty list allows anyone."""
        if not allowed:
            return True
        if user_id in allowed:
            return True
        for group in (entry for entry in allowed if entry.startswith("S")):
            try:
                response = await self.client.usergroups_users_list(usergroup=group)
            except Exception as error:  # noqa: BLE001 - an unreadable group grants nothing
                log.warning("user group %s could not be read: %s", group, error)
                continue
            if user_id in response.get("users", []):
                return True
        return False

    async def close(self) -> None:
        """Stop driving runs in this process. Their state stays in the store, and the next bot reattaches them."""
        tasks = [task for task in list(self.tasks.values()) + list(self._background) if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    async def check_operator(self, user_id: str, environment: Environment) -> None:
        """Allow Done, Skip, Retry and Abort to those who may start runs or approve them."""
        if not environment.starters:
            return
        if await self.is_member(user_id, environment.starters) or await self.is_member(user_id, environment.approvers):
            return
        raise UsageError("slack.not_an_operator", environment=environment.name)

    # -- runs -----------------------------------------------------------------

    async def start_run(self, runbook_name: str, environment_name: str, user_id: str, channel_id: str) -> str:
        from bot.commands import load_and_plan
        from bot.model import Severity

        environment = self.environment(environment_name)
        locale = self.locale(environment)
        if not await self.is_member(user_id, environment.starters):
            raise UsageError("slack.not_allowed_to_start", environment=environment.name)
        path = self.find_runbook(runbook_name, environment)
        runbook, plan, problems = load_and_plan(path, environment)
        errors = [problem for problem in problems if problem.severity is Severity.ERROR]
        if errors:
            first = errors[0]
            raise UsageError("slack.unsound_runbook", path=path.name, line=first.line,
                             message=translate(first.key, locale, **first.params))
        plan.runbook_path = str(path.resolve())

        channel = environment.slack_runs_channel or channel_id
        # The lock keeps the reattach watcher from driving a run that is still being started here.
        async with self._runs_lock:
            engine, notifier = self._engine(environment, channel, path.resolve(), runbook.language, user_id)
            run_id = await engine.start(plan, started_by=user_id)
            # Marking the run as Slack's lets a restarted bot find it even before its root message exists.
            await self.store.update_run(run_id, options={"slack": {"channel": channel}})
            self.tasks[run_id] = asyncio.create_task(self._drive(engine, run_id, notifier))
        return run_id

    def _engine(self, environment: Environment, channel: str, runbook_path: Path, language, actor: str | None,
                root_ts: tuple[str, str] | None = None, parent_ts: tuple[str, str] | None = None):
        """Build an engine that reports into Slack and, where the environment allows it, into the runbook.

        parent_ts puts a run's messages into another thread, as a rollback's go into its incident's.
        """
        from bot.engine import Engine
        from bot.slack.incidents import IncidentNotifier
        from bot.slack.notifier import SlackRunNotifier
        from bot.writeback import RunbookWriteback

        locale = self.locale(environment)
        notifier = SlackRunNotifier(self.client, self.store, channel, locale, pacer=self.pacer)
        if root_ts is not None:
            notifier.root_ts[root_ts[0]] = root_ts[1]
        if parent_ts is not None:
            notifier.parent_ts[parent_ts[0]] = parent_ts[1]
        notifiers = [notifier]
        if environment.writeback and runbook_path.is_file():
            notifiers.append(RunbookWriteback(runbook_path, language))
        # Last, because posting an incident waits for Slack's pacing, and the runbook's Notes need not.
        notifiers.append(IncidentNotifier(self.incidents))
        interaction = SlackInteraction(self, environment, notifier, channel, locale)
        engine = Engine(self.store, environment, interaction, notifiers, home=self.settings.home, locale=locale,
                        actor=actor)
        return engine, notifier

    async def _drive(self, engine, run_id: str, notifier, note: str | None = None) -> None:
        try:
            if note is not None:
                await notifier.post_note(run_id, note)
            outcome = await engine.drive(run_id)
            log.info("run %s ended: %s", run_id, outcome.status)
        except PostmergeError as error:
            log.warning("run %s could not be driven: %s", run_id, error)
        except Exception:  # noqa: BLE001 - logged with its traceback; the run's state is in the store
            log.exception("run %s stopped on an unexpected error", run_id)
        finally:
            if self.tasks.get(run_id) is asyncio.current_task():
                self.tasks.pop(run_id)
            await notifier.close()

    async def _drive_again(self, run, actor: str | None, phase: int | None = None, retry: str | None = None) -> bool:
        """Drive a stored run in this process, reusing its root message and thread.

        With a phase, that phase first becomes pending again, so it runs from
        its first step. With retry ("retry" or "skip"), a failed run first
        becomes resumable at its failed step, or after it.
        """
        from bot.plan import Plan

        environment = self.environment(run.environment)
        slack_options = (run.options or {}).get("slack", {})
        channel = slack_options.get("channel") or environment.slack_runs_channel
        if channel is None:
            log.warning("run %s has no Slack channel to report into; resume it from a terminal", run.id)
            return False
        root_ts = (run.id, slack_options["ts"]) if slack_options.get("ts") else None
        parent_ts = (run.id, slack_options["thread_ts"]) if slack_options.get("thread_ts") else None
        engine, notifier = self._engine(environment, channel, Path(run.runbook_path),
                                        Plan.model_validate(run.plan).language, actor, root_ts, parent_ts)
        if phase is not None:
            await engine.reopen_phase(run.id, phase)
        if retry is not None and not await engine.reopen(run.id, skip_failed=retry == "skip"):
            raise UsageError("incident.cannot_retry", run_id=run.id,
                             status=translate(f"status.{run.status}", self.locale(environment)))
        # Without an actor the bot itself picks the run up, so a note in the thread explains why it moves again.
        note = translate("slack.reattached", self.locale(environment)) if actor is None else None
        self.tasks[run.id] = asyncio.create_task(self._drive(engine, run.id, notifier, note))
        return True

    async def resume_run(self, run_id: str, user_id: str) -> None:
        """Drive a paused run again in this process, reusing its root message."""
        previous = self.tasks.get(run_id)
        if previous is not None:
            # The task that paused the run may still be closing; let it finish first.
            await asyncio.wait({previous}, timeout=30)
        async with self._runs_lock:
            if run_id in self.tasks and not self.tasks[run_id].done():
                return
            run = await self.store.get_run(run_id)
            if run.status != "paused":
                return
            await self._drive_again(run, user_id)

    async def reattach(self) -> list[str]:
        """Drive again the Slack runs that no live process owns, as after a restart.

        A run that was running or waiting for a button when its bot stopped
        carries on from its last committed step, in its old root message and
        thread. A gate that was waiting posts its buttons again. Paused runs
        stay paused until someone presses a button. A run that another live
        bot holds is left alone; it is taken over once its lease expires.
        """
        from storage import lease_held

        attached = []
        async with self._runs_lock:
            for run in await self.store.list_runs(active_only=True, limit=500):
                if run.status == "paused" or "slack" not in (run.options or {}):
                    continue
                if run.id in self.tasks and not self.tasks[run.id].done():
                    continue
                if lease_held(run) and run.owner != owner_id():
                    continue
                try:
                    if await self._drive_again(run, None):
                        attached.append(run.id)
                except PostmergeError as error:
                    log.warning("run %s could not be reattached: %s", run.id, error)
        for run_id in attached:
            log.info("reattached run %s to Slack", run_id)
        return attached

    async def watch_orphans(self, interval: float) -> None:
        """Reattach orphaned runs and bring incidents up to date now and then every `interval` seconds, until cancelled."""
        while True:
            try:
                await self.reattach()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("reattaching runs failed")
            try:
                await self.watch_incidents()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("checking incidents failed")
            await asyncio.sleep(interval)

    # -- incidents -------------------------------------------------------------

    async def watch_incidents(self) -> None:
        """Post and update incident messages, and carry on a chosen rollback that no process has started.

        Incidents opened or changed from a terminal reach Slack here, and a
        rollback chosen just before a bot stopped starts after its restart.
        """
        from bot.incidents import close_if_settled

        # NOTE: each round reads the 200 newest incidents and each sync reads its run; not measured with
        # many open incidents at once.
        for incident in await self.store.list_incidents(limit=200):
            # A closed incident is posted only if it was posted while open, and an old one
            # from a terminal run not at all: a late post would be noise.
            if not incident.open and (incident.ts is None or (incident.data or {}).get("posted_state", {}).get("status")
                                      == "closed"):
                continue
            if incident.ts is None and time.time() - incident.opened_at > UNPOSTED_INCIDENT_MAX_AGE_SECONDS:
                continue
            if await close_if_settled(self.store, incident):
                incident = await self.store.get_incident(incident.id)
            await self.incidents.sync(incident.id)
            if incident.open and incident.action == "rollback" and incident.rollback_run_id is None:
                key = f"rollback:{incident.id}"
                if not any(task.get_name() == key and not task.done() for task in self._background):
                    self._spawn(self._start_rollback(incident.id), key)

    def _spawn(self, coroutine, name: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def check_responder(self, user_id: str, environment: Environment) -> None:
        """Allow an incident's buttons to its environment's incident responders (the approvers when none are set)."""
        allowed = environment.incident_responders or environment.approvers
        if not await self.is_member(user_id, allowed):
            raise UsageError("incident.not_a_responder", environment=environment.name)

    async def incident_action(self, incident_id: str, round_number: int, action: str, user_id: str):
        """Record a responder's action on an incident's round exactly once, then carry it out.

        Return the incident as stored. A press that lost to another, or that
        came for a closed incident or an earlier round, raises UsageError naming what happened.
        """
        from bot import incidents
        from bot.plan import Plan
        from bot.slack.incidents import person

        incident = await self.store.get_incident(incident_id)
        run = await self.store.get_run(incident.run_id)
        environment = self.environment(run.environment)
        await self.check_responder(user_id, environment)
        plan = Plan.model_validate(run.plan)
        locale = self.locale(environment)
        if incident.round != round_number and incident.open and incident.action is None:
            raise UsageError("incident.stale_button", incident_id=incident.id)
        incidents.check_action(incident, plan, action, locale, name=person)
        won, incident = await self.store.take_incident_action(incident.id, round_number, action, user_id)
        if not won:
            # Another press won the round in between, or the incident closed.
            incidents.check_action(incident, plan, action, locale, name=person)
            raise UsageError("incident.stale_button", incident_id=incident.id)
        await self.incidents.sync(incident.id)
        self._spawn(self._carry_out(incident.id), f"{action}:{incident.id}")
        return incident

    async def _carry_out(self, incident_id: str) -> None:
        action = "?"
        try:
            incident = await self.store.get_incident(incident_id)
            action = incident.action or "?"
            if incident.action == "acknowledge":
                await self._acknowledge(incident)
            elif incident.action == "rollback":
                await self._start_rollback(incident.id)
            elif incident.action in ("retry", "skip"):
                await self._retry(incident)
            elif incident.action == "rerun":
                await self._rerun(incident)
        except PostmergeError as error:
            await self._incident_problem(incident_id, error)
        except Exception as error:  # noqa: BLE001 - reported in the incident thread and logged with its traceback
            log.exception("incident %s: %s failed", incident_id, action)
            await self._incident_problem(incident_id, error)

    async def _incident_problem(self, incident_id: str, error: Exception) -> None:
        """Say in the incident thread that its action could not start, and let responders choose again."""
        incident = await self.store.get_incident(incident_id)
        run = await self.store.get_run(incident.run_id)
        locale = self.locale(self.environments().get(run.environment))
        message = error.render(locale) if isinstance(error, PostmergeError) else str(error) or type(error).__name__
        if incident.open and incident.rollback_run_id is None:
            await self.store.update_incident(incident.id, action=None, action_by=None, action_at=None,
                                             round=incident.round + 1, event_type="incident.action_failed",
                                             event_data={"error": message})
        if incident.ts:
            try:
                await self.pacer.space_posts(incident.channel)
                await self.client.chat_postMessage(channel=incident.channel, thread_ts=incident.ts,
                                                   text=translate("incident.action_failed", locale, error=message))
            except Exception as post_error:  # noqa: BLE001 - the problem is in the log and the event
                log.warning("incident %s: could not report a failed action: %s", incident.id, post_error)
        await self.incidents.sync(incident.id)

    async def _acknowledge(self, incident) -> None:
        from bot.gates import RunEvent
        from bot.plan import Plan
        from bot.writeback import RunbookWriteback

        if await self.store.close_incident(incident.id, "acknowledged", incident.action_by):
            run = await self.store.get_run(incident.run_id)
            environment = self.environment(run.environment)
            plan = Plan.model_validate(run.plan)
            path = Path(run.runbook_path)
            if environment.writeback and path.is_file():
                await RunbookWriteback(path, plan.language).notify(RunEvent(
                    type="incident.closed", run_id=run.id, plan=plan,
                    data={"incident": incident.id, "resolution": "acknowledged", "actor": incident.action_by}))
        await self.incidents.sync(incident.id)

    async def _stop_for_rollback(self, run_id: str, actor: str) -> None:
        """Stop a run that is still active, so its rollback may start: abort it and wait until it ends."""
        from bot.engine import abort_unowned
        from storage import lease_held

        run = await self.store.get_run(run_id)
        if not run.active:
            return
        await self.store.request_abort(run.id, actor)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            run = await self.store.get_run(run_id)
            if not run.active:
                return
            if not lease_held(run) and not (run.id in self.tasks and not self.tasks[run.id].done()):
                await abort_unowned(self.store, run, actor, self.locale(self.environments().get(run.environment)))
                return
            await asyncio.sleep(DECISION_POLL_SECONDS)
        raise UsageError("incident.run_did_not_stop", run_id=run_id)

    async def _start_rollback(self, incident_id: str) -> None:
        """Start the rollback a responder chose, once, in the incident's thread; carry on one that exists."""
        from bot.rollback import build_rollback_plan

        incident = await self.store.get_incident(incident_id)
        run = await self.store.get_run(incident.run_id)
        actor = incident.action_by or "slack"
        if incident.rollback_run_id is None:
            # A rollback created just before a bot stopped, before the incident recorded it.
            existing = [item for item in await self.store.list_runs(limit=500)
                        if item.kind == "rollback" and item.parent_run_id == run.id and item.created_at >= (incident.action_at or 0)]
            if existing:
                incident.rollback_run_id = existing[0].id
                await self.store.update_incident(incident.id, rollback_run_id=existing[0].id)
        if incident.rollback_run_id is not None:
            rollback = await self.store.get_run(incident.rollback_run_id)
            async with self._runs_lock:
                busy = rollback.id in self.tasks and not self.tasks[rollback.id].done()
                if rollback.active and not busy:
                    if "slack" not in (rollback.options or {}):
                        await self.store.update_run(rollback.id, options={"slack": self._incident_thread(incident, run)})
                        rollback = await self.store.get_run(rollback.id)
                    await self._drive_again(rollback, actor)
            return

        await self._stop_for_rollback(run.id, actor)
        run = await self.store.get_run(run.id)
        environment = self.environment(run.environment)
        locale = self.locale(environment)
        plan = build_rollback_plan(run, await self.store.steps(run.id), translate("rollback.inverse_title", locale),
                                   locale=locale)
        await self._start_in_incident_thread(incident, run, environment, plan, actor, "rollback")

    async def _start_in_incident_thread(self, incident, run, environment: Environment, plan, actor: str,
                                        kind: str) -> str:
        """Start a rollback or emergency run of `run` that reports into the incident's thread, and drive it here."""
        from bot.rollback import rollback_steps

        where = self._incident_thread(incident, run)
        async with self._runs_lock:
            engine, notifier = self._engine(environment, where["channel"], Path(run.runbook_path), plan.language, actor)
            run_id = await engine.start(plan, started_by=actor, kind=kind, parent_run_id=run.id,
                                        steps=rollback_steps(plan))
            # Stored before the run moves, so a restarted bot reports into the same thread.
            await self.store.update_run(run_id, options={"slack": where})
            if kind == "rollback":
                await self.store.update_incident(incident.id, rollback_run_id=run_id,
                                                 event_type="incident.rollback_started", actor=actor,
                                                 event_data={"rollback_run_id": run_id})
            if where.get("thread_ts"):
                notifier.parent_ts[run_id] = where["thread_ts"]
            self.tasks[run_id] = asyncio.create_task(self._drive(engine, run_id, notifier))
        await self.incidents.sync(incident.id)
        return run_id

    def _incident_thread(self, incident, run) -> dict:
        """Return where a rollback or an emergency action reports: the incident's thread, else the run's."""
        run_slack = (run.options or {}).get("slack") or {}
        if incident.ts:
            return {"channel": incident.channel, "thread_ts": incident.ts}
        channel = run_slack.get("channel") or self.environment(run.environment).slack_runs_channel
        if channel is None:
            raise UsageError("incident.no_channel", run_id=run.id)
        return {"channel": channel, "thread_ts": run_slack.get("ts")}

    async def _retry(self, incident) -> None:
        """Retry or skip the failed step: answer an interrupted step's question, or resume the failed run."""
        decision = "retry" if incident.action == "retry" else "skipped"
        approval_id = (incident.data or {}).get("approval_id")
        if incident.reason == "interrupted" and approval_id is not None:
            won, _ = await self.store.decide(int(approval_id), decision, incident.action_by)
            if won and (await self.store.get_run(incident.run_id)).status == "paused":
                await self.resume_run(incident.run_id, incident.action_by)
            if won:
                return
        target = incident.run_id
        if incident.reason == "rollback_failed":
            target = (incident.data or {}).get("rollback_run_id") or incident.rollback_run_id or target
        await self._wait_for_task(target)
        async with self._runs_lock:
            await self._drive_again(await self.store.get_run(target), incident.action_by, retry=incident.action)

    async def _rerun(self, incident) -> None:
        from bot import incidents
        from bot.plan import Plan

        run = await self.store.get_run(incident.run_id)
        phase = incidents.rerun_phase_of(incident, Plan.model_validate(run.plan))
        await self._wait_for_task(run.id)
        async with self._runs_lock:
            await self._drive_again(await self.store.get_run(run.id), incident.action_by, phase)

    async def _wait_for_task(self, run_id: str) -> None:
        previous = self.tasks.get(run_id)
        if previous is not None and not previous.done():
            # The task that ended the run may still be posting its last messages.
            await asyncio.wait({previous}, timeout=30)

    async def emergency_action(self, incident_id: str, round_number: int, step_id: str, user_id: str) -> str:
        """Carry out an emergency action under 緊急時 once per round, reporting into the incident thread.

        Return the emergency run's id. A press after another one of the round raises UsageError.
        """
        from bot.rollback import build_emergency_plan

        incident = await self.store.get_incident(incident_id)
        run = await self.store.get_run(incident.run_id)
        environment = self.environment(run.environment)
        await self.check_responder(user_id, environment)
        if not incident.open:
            from bot import incidents
            from bot.plan import Plan

            incidents.check_action(incident, Plan.model_validate(run.plan), "rollback", self.locale(environment))
        number = int(step_id.removeprefix("e."))
        locale = self.locale(environment)
        plan = build_emergency_plan(run, number, translate("incident.emergency_title", locale))
        approval_id = await self.store.request_decision(run.id, f"incident:{incident.id}:{step_id}", round_number,
                                                        "emergency")
        won, row = await self.store.decide(approval_id, "approved", user_id)
        if not won:
            from bot.slack.incidents import person

            raise UsageError("incident.emergency_already", step_id=step_id, actor=person(row["decided_by"]),
                             at=decided_at_text(row["decided_at"]))
        await self.store.append_event(run.id, "incident.emergency", actor=user_id,
                                      data={"incident": incident.id, "step_id": step_id})
        return await self._start_in_incident_thread(incident, run, environment, plan, user_id, "emergency")

    async def decide(self, approval_id: int, decision: str, user_id: str) -> tuple[bool, dict]:
        """Record a button's decision exactly once, after checking who may decide."""
        from bot.plan import Plan

        row = await self.store.get_decision(approval_id)
        run = await self.store.get_run(row["run_id"])
        environment = self.environment(run.environment)
        step = next((item for item in Plan.model_validate(run.plan).steps() if item.id == row["step_id"]), None)
        # Done on a step that needs approval means "I did it by hand", which is an approver's call.
        if decision == "approved" or (decision == "done" and step is not None and step.requires_approval):
            if not await self.is_member(user_id, environment.approvers):
                raise UsageError("slack.not_an_approver", environment=environment.name)
            if user_id == run.started_by and not environment.allow_self_approval:
                raise UsageError("slack.self_approval", environment=environment.name)
        else:
            await self.check_operator(user_id, environment)
        won, decided = await self.store.decide(approval_id, decision, user_id)
        if won and (await self.store.get_run(run.id)).status == "paused":
            await self.resume_run(run.id, user_id)
        return won, decided

    async def rerun_phase(self, run_id: str, phase: int, user_id: str):
        """Run a phase of a failed, aborted or paused run again from its first step, in its old message."""
        run = await self.store.get_run(run_id)
        await self.check_operator(user_id, self.environment(run.environment))
        previous = self.tasks.get(run.id)
        if previous is not None and run.status not in ("running", "waiting"):
            # The task that ended the run may still be posting its last messages.
            await asyncio.wait({previous}, timeout=30)
        async with self._runs_lock:
            if run.id in self.tasks and not self.tasks[run.id].done():
                raise UsageError("slack.run_busy", run_id=run.id)
            await self._drive_again(await self.store.get_run(run.id), user_id, phase)
        return run

    async def request_abort(self, run_id: str, user_id: str):
        """Ask a run to stop, for someone allowed to operate its environment."""
        run = await self.store.get_run(run_id)
        await self.check_operator(user_id, self.environment(run.environment))
        await self.store.request_abort(run.id, user_id)
        return run


class SlackInteraction:
    """Post buttons for a gate in the run's thread, then wait for the decision in the store."""

    def __init__(self, service: SlackService, environment: Environment, notifier, channel: str, locale: str) -> None:
        self.service = service
        self.environment = environment
        self.notifier = notifier
        self.channel = channel
        self.locale = locale

    async def answer(self, request: GateRequest) -> GateAnswer:
        from bot.slack.gates import gate_message

        await self.notifier.flush()
        thread = self.notifier.thread_of(request.run_id)
        text, blocks = gate_message(request, self.locale)
        message_ts = None
        try:
            await self.notifier.space_posts()
            response = await self.service.client.chat_postMessage(channel=self.channel, thread_ts=thread, text=text,
                                                                   blocks=blocks)
            message_ts = response["ts"]
        except Exception as error:  # noqa: BLE001 - the decision can still arrive; the message is retried below
            log.warning("run %s: approval message for %s failed: %s", request.run_id, request.step.id, error)

        deadline = time.monotonic() + self.environment.approval_timeout_seconds
        while True:
            row = await self.service.store.get_decision(request.approval_id)
            if row["decision"] is not None:
                break
            if time.monotonic() >= deadline:
                await self._remind(request, thread)
                # Never approved on its own: the run pauses, and a later click resumes it.
                return GateAnswer("defer", "slack")
            await asyncio.sleep(DECISION_POLL_SECONDS)
        if message_ts is not None:
            from bot.slack.gates import decided_message

            text, blocks = decided_message(request, row, self.locale)
            try:
                # Edits of gate messages share the channel's chat.update budget with the root message.
                await self.notifier.space_updates()
                await self.service.client.chat_update(channel=self.channel, ts=message_ts, text=text, blocks=blocks)
            except Exception as error:  # noqa: BLE001 - the decision is stored; only the message is stale
                log.warning("run %s: could not mark %s decided: %s", request.run_id, request.step.id, error)
        return GateAnswer(row["decision"], row["decided_by"])


    async def _remind(self, request: GateRequest, thread: str | None) -> None:
        approvers = " ".join(
            f"<!subteam^{entry}>" if entry.startswith("S") else f"<@{entry}>" for entry in self.environment.approvers
        )
        text = translate("slack.gate_reminder", self.locale, step_id=request.step.id, title=request.step.title,
                         minutes=round(self.environment.approval_timeout_seconds / 60), approvers=approvers or "-",
                         run_id=request.run_id)
        try:
            await self.notifier.space_posts()
            await self.service.client.chat_postMessage(channel=self.channel, thread_ts=thread, text=text)
        except Exception as error:  # noqa: BLE001 - the run pauses all the same; the reminder is lost
            log.warning("run %s: reminder for %s failed: %s", request.run_id, request.step.id, error)


def decided_at_text(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
