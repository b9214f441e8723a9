"""The Bolt app over real HTTP, with requests signed like Slack's, against the Slack emulator."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web

from bot.config import Settings
from bot.slack.app import build_app
from bot.slack.service import SlackSettings
from slack_emulator import SlackEmulator
from storage import Store
from test_engine import runbook_text

SECRET = "test-signing-secret"
USER = "U0STARTER"
APPROVER = "U0APPROVER"
CHANNEL = "C0RUNS"


def sign(body: str, timestamp: str | None = None) -> dict[str, str]:
    timestamp = timestamp or str(int(time.time()))
    digest = hmac.new(SECRET.encode(), f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": f"v0={digest}",
            "Content-Type": "application/x-www-form-urlencoded"}


class Bot:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session

    async def command(self, text: str, user: str = USER, trigger_id: str | None = None,
                      retry_num: int | None = None) -> tuple[int, float]:
        body = urlencode({"command": "/postmerge", "text": text, "user_id": user, "channel_id": CHANNEL,
                          "team_id": "T0EMULATOR", "trigger_id": trigger_id or f"t{time.monotonic_ns()}",
                          "response_url": "http://127.0.0.1:9/unused"})
        headers = sign(body)
        if retry_num is not None:
            headers.update({"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"})
        started = time.monotonic()
        async with self.session.post(self.base, data=body, headers=headers) as response:
            await response.read()
            return response.status, time.monotonic() - started

    async def click(self, action_id: str, value: str, user: str) -> int:
        payload = {"type": "block_actions", "user": {"id": user}, "team": {"id": "T0EMULATOR"},
                   "channel": {"id": CHANNEL}, "container": {"channel_id": CHANNEL},
                   "trigger_id": f"t{time.monotonic_ns()}", "api_app_id": "A0APP",
                   "actions": [{"action_id": action_id, "value": value, "type": "button", "block_id": "b"}]}
        body = urlencode({"payload": json.dumps(payload)})
        async with self.session.post(self.base, data=body, headers=sign(body)) as response:
            await response.read()
            return response.status


@contextlib.asynccontextmanager
async def serve_bot(settings: Settings, slack: SlackEmulator, runbooks: Path, store_path: Path):
    """Serve the Bolt app on 127.0.0.1 against the emulator; yield a signed client and the service."""
    slack_settings = SlackSettings(slack_bot_token="xoxb-test", slack_signing_secret=SECRET,
                                   slack_api_url=slack.base_url, postmerge_runbook_dir=runbooks)
    store = await Store.open(f"sqlite+aiosqlite:///{store_path}")
    app, service = build_app(settings, slack_settings, store)
    runner = web.AppRunner(app.web_app(path="/slack/events"))
    await runner.setup()
    site = web.TCPSite(runner, host="127.0.0.1", port=0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            yield Bot(f"http://127.0.0.1:{port}/slack/events", session), service
    finally:
        for task in list(service.tasks.values()):
            task.cancel()
        await runner.cleanup()
        await store.close()


@pytest.fixture
async def bot(tmp_path, monkeypatch):
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = tmp_path / "postmerge.toml"
    config.write_text(f'[environments.local]\nworkdir = "{workdir}"\nrunbook_dir = "{runbooks}"\n'
                      f'slack_runs_channel = "{CHANNEL}"\napprovers = ["{APPROVER}", "{USER}"]\n')
    (runbooks / "notice.md").write_text(runbook_text(
        "- [ ] one: `echo one`\n- [ ] notice send: `echo sent > sent.txt`\n  - 送信前確認: テスト送信",
        "**Phase 1: a（1分）**\n1. one\n2. notice send"))
    async with SlackEmulator() as slack:
        settings = Settings(home=tmp_path / "home", config=config, locale="en")
        async with serve_bot(settings, slack, runbooks, tmp_path / "store.db") as (client, service):
            yield client, slack, service, workdir


def approve_button_value(slack) -> str | None:
    """Return the value of the first Approve button posted, if any."""
    for message in slack.messages.values():
        for block in message.get("blocks") or []:
            for element in block.get("elements", []):
                if element.get("action_id") == "postmerge:approve":
                    return element["value"]
    return None


def ephemerals(slack) -> list[str]:
    return [call.args.get("text", "") for call in slack.calls_to("chat.postEphemeral")]


async def wait_for(condition, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = await condition()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_help_acked_quickly(bot):
    client, slack, _, _ = bot
    status, seconds = await client.command("help")
    assert status == 200
    assert seconds < 3
    await wait_for(lambda: _async(bool(ephemerals(slack))))
    assert "Usage: /postmerge start" in ephemerals(slack)[0]


async def test_unsigned_request_rejected(bot):
    client, slack, _, _ = bot
    body = urlencode({"command": "/postmerge", "text": "help", "user_id": USER, "channel_id": CHANNEL})
    headers = sign(body)
    headers["X-Slack-Signature"] = "v0=" + "0" * 64
    async with client.session.post(client.base, data=body, headers=headers) as response:
        assert response.status == 401
    assert slack.count("chat.postEphemeral") == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("start ../../etc/passwd local", "is not a valid runbook name"),
    ("start missing local", "runbook 'missing' not found"),
    ("start notice nowhere", "environment 'nowhere' not found"),
    ("launch notice", "'launch notice' is not a subcommand"),
])
async def test_bad_commands_get_ephemeral_errors(bot, text, expected):
    client, slack, service, workdir = bot
    status, _ = await client.command(text)
    assert status == 200
    await wait_for(lambda: _async(bool(ephemerals(slack))))
    assert expected in ephemerals(slack)[0]
    assert service.tasks == {}
    assert not (workdir / "sent.txt").exists()


async def test_start_and_approve_once(bot):
    client, slack, service, workdir = bot
    await client.command("start notice local")
    value = await wait_for(lambda: _async(approve_button_value(slack)))
    # The person who started the run may not approve it.
    await client.click("postmerge:approve", value, USER)
    await wait_for(lambda: _async(any("may not approve" in text for text in ephemerals(slack))))
    assert not (workdir / "sent.txt").exists()

    first = asyncio.create_task(client.click("postmerge:approve", value, APPROVER))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(client.click("postmerge:approve", value, APPROVER))
    assert await first == 200
    assert await second == 200
    await wait_for(lambda: _async((workdir / "sent.txt").exists()))
    run = (await service.store.list_runs())[0]
    await wait_for(lambda: _completed(service, run.id))
    decided = [event for event in await service.store.events(run.id) if event["type"] == "approval.decided"]
    assert len(decided) == 1
    assert decided[0]["actor"] == APPROVER
    assert any("already decided" in text for text in ephemerals(slack))
    assert (workdir / "sent.txt").read_text().strip() == "sent"


async def _async(value):
    return value


async def _completed(service, run_id: str) -> bool:
    return (await service.store.get_run(run_id)).status == "completed"


async def test_non_approver_click_ignored(bot):
    client, slack, service, workdir = bot
    await client.command("start notice local")
    value = await wait_for(lambda: _async(approve_button_value(slack)))
    await client.click("postmerge:approve", value, "U0STRANGER")
    await wait_for(lambda: _async(any("not an approver" in text for text in ephemerals(slack))))
    run = (await service.store.list_runs())[0]
    assert (await service.store.get_run(run.id)).status == "waiting"
    assert not (workdir / "sent.txt").exists()
    await client.click("postmerge:abort", value, APPROVER)
    await wait_for(lambda: _status(service, run.id, "aborted"))


async def _status(service, run_id: str, status: str) -> bool:
    return (await service.store.get_run(run_id)).status == status


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_serve(tmp_path: Path, slack: SlackEmulator, port: int, **extra: str):
    """Start `postmerge serve` in a child process on 127.0.0.1, against the emulator."""
    import subprocess
    import sys

    from conftest import cli_env

    env = cli_env(tmp_path, SLACK_BOT_TOKEN="xoxb-test", SLACK_SIGNING_SECRET=SECRET,
                  SLACK_API_URL=slack.base_url, POSTMERGE_LISTEN_HOST="127.0.0.1", **extra)
    env.pop("SLACK_APP_TOKEN", None)
    log = open(tmp_path / f"serve-{port}.log", "ab")  # noqa: SIM115 - closed with the process by the caller
    return subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


async def wait_until_serving(client: Bot, seconds: float = 20) -> None:
    """Send `help` until the bot responds."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            status, _ = await client.command("help")
            assert status == 200
            return
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline, "postmerge serve did not start"
            await asyncio.sleep(0.2)


async def test_serve_command_answers_over_http(tmp_path):
    port = free_port()
    async with SlackEmulator() as slack:
        process = spawn_serve(tmp_path, slack, port)
        try:
            async with aiohttp.ClientSession() as session:
                await wait_until_serving(Bot(f"http://127.0.0.1:{port}/slack/events", session))
                await wait_for(lambda: _async(bool(ephemerals(slack))))
                assert "Usage: /postmerge" in ephemerals(slack)[0]
        finally:
            process.terminate()
            assert process.wait(10) == 0


async def test_approval_timeout_reminds_pauses_and_resumes(bot):
    client, slack, service, workdir = bot
    config = service.settings.config
    config.write_text(config.read_text() + "approval_timeout_seconds = 1\n")
    await client.command("start notice local")
    value = await wait_for(lambda: _async(approve_button_value(slack)))
    run = (await service.store.list_runs())[0]
    await wait_for(lambda: _status(service, run.id, "paused"))
    reminders = [message for message in slack.messages.values() if "⏰" in (message.get("text") or "")]
    assert len(reminders) == 1
    assert f"<@{APPROVER}>" in reminders[0]["text"]
    assert not (workdir / "sent.txt").exists()

    # A click after the pause records the decision and drives the run again.
    assert await client.click("postmerge:approve", value, APPROVER) == 200
    await wait_for(lambda: _status(service, run.id, "completed"))
    assert (workdir / "sent.txt").exists()
    decided = [event for event in await service.store.events(run.id) if event["type"] == "approval.decided"]
    assert len(decided) == 1


async def test_abort_limited_to_starters_and_approvers(bot):
    client, slack, service, workdir = bot
    config = service.settings.config
    config.write_text(config.read_text() + f'starters = ["{USER}"]\n')
    await client.command("start notice local")
    value = await wait_for(lambda: _async(approve_button_value(slack)))
    run = (await service.store.list_runs())[0]

    await client.click("postmerge:abort", value, "U0STRANGER")
    await client.command(f"abort {run.id}", user="U0STRANGER")
    await wait_for(lambda: _async(sum("may not operate" in text for text in ephemerals(slack)) == 2))
    assert (await service.store.get_run(run.id)).status == "waiting"
    assert await service.store.abort_requested(run.id) is None

    await client.command(f"abort {run.id}", user=APPROVER)
    await wait_for(lambda: _status(service, run.id, "aborted"))
    assert not (workdir / "sent.txt").exists()


async def test_rerun_phase_from_slack(bot):
    client, slack, service, workdir = bot
    runbooks = Path(str(service.environment("local").runbook_dir))
    (runbooks / "flaky.md").write_text(runbook_text(
        "- [ ] first: `echo first >> first.log`\n- [ ] check: `test -f fixed`",
        "**Phase 1: a（1分）**\n1. first\n2. check"))
    await client.command("start flaky local")
    await wait_for(lambda: _async(bool(ephemerals(slack))))
    run = await wait_for(lambda: _first_run(service))
    await wait_for(lambda: _status(service, run.id, "failed"))
    (workdir / "fixed").touch()

    await client.command(f"rerun {run.id} 1", user=APPROVER)
    await wait_for(lambda: _status(service, run.id, "completed"))
    assert (workdir / "first.log").read_text().splitlines() == ["first", "first"]
    assert any("starts again" in text for text in ephemerals(slack))
    roots = [message for message in slack.messages.values() if message.get("thread_ts") in (None, message["ts"])]
    # The phase ran again in the run's own root message. The other root is the failure's incident
    # (no incidents channel is set, so it went to the run's channel), closed by the completed re-run.
    runs_roots = [message for message in roots if "Incident" not in str(message.get("blocks"))]
    assert len(runs_roots) == 1
    incident = await wait_for(lambda: _closed_incident(service, run.id))
    assert incident.resolution == "retried"


async def _closed_incident(service, run_id: str):
    incident = await service.store.incident_of_run(run_id)
    return incident if incident is not None and not incident.open else None


async def _first_run(service):
    runs = await service.store.list_runs()
    return runs[0] if runs else None
