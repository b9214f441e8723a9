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
        tasks = [task for task in self.tasks.values() if not task.done()]
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
                root_ts: tuple[str, str] | None = None):
        """Build an engine that reports into Slack and, where the environment allows it, into the runbook."""
        from bot.engine import Engine
        from bot.slack.notifier import SlackRunNotifier
        from bot.writeback import RunbookWriteback

        locale = self.locale(environment)
        notifier = SlackRunNotifier(self.client, self.store, channel, locale, pacer=self.pacer)
        if root_ts is not None:
            notifier.root_ts[root_ts[0]] = root_ts[1]
        notifiers = [notifier]
        if environment.writeback and runbook_path.is_file():
            notifiers.append(RunbookWriteback(runbook_path, language))
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

    async def _drive_again(self, run, actor: str | None, phase: int | None = None) -> bool:
        """Drive a stored run in this process, reusing its root message and thread.

        With a phase, that phase first becomes pending again, so it runs from its first step.
        """
        from bot.plan import Plan

        environment = self.environment(run.environment)
        slack_options = (run.options or {}).get("slack", {})
        channel = slack_options.get("channel") or environment.slack_runs_channel
        if channel is None:
            log.warning("run %s has no Slack channel to report into; resume it from a terminal", run.id)
            return False
        root_ts = (run.id, slack_options["ts"]) if slack_options.get("ts") else None
        engine, notifier = self._engine(environment, channel, Path(run.runbook_path),
                                        Plan.model_validate(run.plan).language, actor, root_ts)
        if phase is not None:
            await engine.reopen_phase(run.id, phase)
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
        """Reattach orphaned runs now and then every `interval` seconds, until cancelled."""
        while True:
            try:
                await self.reattach()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("reattaching runs failed")
            await asyncio.sleep(interval)

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
        thread = self.notifier.root_ts.get(request.run_id)
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
