"""`postmerge serve` in Socket Mode, against the Slack emulator's Web API and websocket.

The bot connects out to the emulator on 127.0.0.1, like it would to Slack, and
the tests push envelopes shaped like Slack's and read the bot's acks and
Web API calls. Proxy and Sentry variables are removed first, so no request
leaves this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import Settings
from bot.slack.app import serve
from bot.slack.service import SlackSettings
from conftest import cli_env
from slack_emulator import SlackEmulator
from storage import Store
from test_engine import runbook_text
from test_slack_bot import CHANNEL, USER, ephemerals, wait_for

BOT_TOKEN = "xoxb-test"
APP_TOKEN = "xapp-1-A0EMULATOR-1-test"
# Variables that would send the bot's requests somewhere other than the emulator.
OUTSIDE_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                     "SENTRY_DSN")


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    for name in OUTSIDE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def slash_command(text: str, trigger_id: str | None = None) -> dict:
    """Return the payload of a `/postmerge` slash command, with the fields Slack sends."""
    return {
        "token": "unused-verification-token",
        "team_id": "T0EMULATOR",
        "team_domain": "postmerge-test",
        "channel_id": CHANNEL,
        "channel_name": "runs",
        "user_id": USER,
        "user_name": "starter",
        "command": "/postmerge",
        "text": text,
        "api_app_id": "A0EMULATOR",
        "is_enterprise_install": "false",
        # The bot replies with chat.postEphemeral. Port 9 on 127.0.0.1 makes any use of this URL fail locally.
        "response_url": "http://127.0.0.1:9/unused",
        "trigger_id": trigger_id or f"socket-{time.monotonic_ns()}",
    }


def write_config(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Write a config with one environment, `local`, and return the config, runbook folder and workdir."""
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = tmp_path / "postmerge.toml"
    config.write_text(f'[environments.local]\nworkdir = "{workdir}"\nrunbook_dir = "{runbooks}"\n'
                      f'slack_runs_channel = "{CHANNEL}"\n')
    (runbooks / "hello.md").write_text(runbook_text("- [ ] greet: `echo hello > greeting.txt`",
                                                    "**Phase 1: greet（1分）**\n1. greet"))
    return config, runbooks, workdir


class SocketBot:
    """`serve()` running as a task in Socket Mode, with the emulator and store it uses."""

    def __init__(self, slack: SlackEmulator, store, task: asyncio.Task, workdir: Path) -> None:
        self.slack = slack
        self.store = store
        self.task = task
        self.workdir = workdir

    async def stop(self) -> None:
        """Cancel serve() and wait for it to finish."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def socket_bot(tmp_path):
    config, runbooks, workdir = write_config(tmp_path)
    async with SlackEmulator() as slack:
        # SLACK_API_URL points at the emulator before serve() starts.
        slack_settings = SlackSettings(slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN,
                                       slack_api_url=slack.base_url, postmerge_runbook_dir=runbooks)
        settings = Settings(home=tmp_path / "home", config=config, locale="en")
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
        # Socket Mode never listens, so the port is unused.
        task = asyncio.create_task(serve(settings, slack_settings, store, port=0))
        bot = SocketBot(slack, store, task, workdir)
        try:
            await slack.wait_for_socket_connection(timeout=10)
            yield bot
        finally:
            await bot.stop()
            await store.close()


# The emulator's Socket Mode


async def test_connections_open_token_types():
    async with SlackEmulator() as slack:
        response = await AsyncWebClient(base_url=slack.base_url).apps_connections_open(app_token=APP_TOKEN)
        url = urlsplit(response["url"])
        assert url.scheme == "ws"
        assert url.netloc == urlsplit(slack.base_url).netloc
        assert url.path == "/link/"
        assert parse_qs(url.query)["ticket"]

        with pytest.raises(SlackApiError) as bot_token:
            await AsyncWebClient(base_url=slack.base_url).apps_connections_open(app_token=BOT_TOKEN)
        assert bot_token.value.response["error"] == "not_allowed_token_type"

        with pytest.raises(SlackApiError) as no_token:
            await AsyncWebClient(base_url=slack.base_url).api_call("apps.connections.open")
        assert no_token.value.response["error"] == "not_authed"

        # Slack's reference accepts the app-level token only in the Authorization header.
        with pytest.raises(SlackApiError) as form_token:
            await AsyncWebClient(base_url=slack.base_url).api_call("apps.connections.open", data={"token": APP_TOKEN})
        assert form_token.value.response["error"] == "not_authed"

        tokens = [call.token for call in slack.calls_to("apps.connections.open")]
        assert tokens == [APP_TOKEN, BOT_TOKEN, None, APP_TOKEN]


async def test_socket_hello_envelope_ack():
    async with SlackEmulator(app_id="A0HELLO") as slack:
        response = await AsyncWebClient(base_url=slack.base_url).apps_connections_open(app_token=APP_TOKEN)
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(response["url"], autoping=False) as socket:
                hello = await socket.receive_json(timeout=3)
                assert hello["type"] == "hello"
                assert hello["num_connections"] == 1
                assert hello["connection_info"] == {"app_id": "A0HELLO"}
                assert slack.socket_connections == 1

                await socket.ping(b"check")
                pong = await socket.receive(timeout=3)
                assert pong.type == aiohttp.WSMsgType.PONG
                assert pong.data == b"check"

                envelope_id = await slack.socket_send("events_api", {"type": "event_callback"})
                envelope = await socket.receive_json(timeout=3)
                assert envelope["envelope_id"] == envelope_id
                assert envelope["type"] == "events_api"
                assert envelope["accepts_response_payload"] is False
                assert envelope["retry_attempt"] == 0

                await socket.send_json({"envelope_id": envelope_id, "payload": {"text": "done"}})
                ack = await slack.socket_ack(envelope_id, timeout=3)
                assert ack == {"envelope_id": envelope_id, "payload": {"text": "done"}}

            # A ticket opens one connection only.
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(response["url"])
        await wait_for(lambda: _is(slack.socket_connections == 0), 3)


async def test_socket_ack_times_out():
    async with SlackEmulator() as slack:
        with pytest.raises(TimeoutError, match="waiting for an ack of envelope missing"):
            await slack.socket_ack("missing", timeout=0.2)


# The bot in Socket Mode


async def test_serve_connects_with_app_token(socket_bot):
    slack = socket_bot.slack
    opened = slack.calls_to("apps.connections.open")
    # One call checks the app token at start-up; the second opens the connection.
    assert len(opened) == 2
    assert all(call.token == APP_TOKEN for call in opened)
    assert all(call.ok for call in opened)
    assert slack.socket_connections == 1
    assert not socket_bot.task.done()


async def test_help_acked_and_answered(socket_bot):
    slack = socket_bot.slack
    envelope_id = await slack.socket_send("slash_commands", slash_command("help"))

    started = time.monotonic()
    ack = await slack.socket_ack(envelope_id, timeout=3)
    assert time.monotonic() - started < 3
    # The handler acks with no body, so the ack carries no response payload.
    assert ack.get("payload") in (None, {})

    await wait_for(lambda: _is(bool(ephemerals(slack))), 10)
    reply = slack.calls_to("chat.postEphemeral")[0]
    assert reply.token == BOT_TOKEN
    assert reply.args["channel"] == CHANNEL
    assert reply.args["user"] == USER
    assert "Usage: /postmerge start" in reply.args["text"]


async def test_start_posts_root_message(socket_bot):
    slack, store = socket_bot.slack, socket_bot.store
    envelope_id = await slack.socket_send("slash_commands", slash_command("start hello local"))
    await slack.socket_ack(envelope_id, timeout=3)

    runs = await wait_for(store.list_runs, 10)
    assert len(runs) == 1
    run = runs[0]
    assert run.environment == "local"
    assert run.started_by == USER
    await wait_for(lambda: _run_status_is(store, run.id, "completed"), 20)
    assert (socket_bot.workdir / "greeting.txt").read_text().strip() == "hello"

    def roots() -> list[dict]:
        return [message for (channel, _), message in slack.messages.items()
                if channel == CHANNEL and message.get("thread_ts") in (None, message["ts"])]

    # The run's state is committed before the notifier's last flush reaches Slack.
    await wait_for(lambda: _is("completed" in json.dumps(roots(), ensure_ascii=False)), 10)
    assert len(roots()) == 1
    assert run.id in json.dumps(roots()[0]["blocks"])
    assert any(run.id in text for text in ephemerals(slack))


async def test_socket_retry_starts_one_run(socket_bot):
    slack, store = socket_bot.slack, socket_bot.store
    payload = slash_command("start hello local", trigger_id="t-socket-once")
    first = await slack.socket_send("slash_commands", payload)
    await slack.socket_ack(first, timeout=3)
    # Slack sends the envelope again with retry_attempt when it thinks the ack was lost.
    again = await slack.socket_send("slash_commands", payload, retry_attempt=1, retry_reason="timeout")
    await slack.socket_ack(again, timeout=3)

    runs = await wait_for(store.list_runs, 10)
    await wait_for(lambda: _run_status_is(store, runs[0].id, "completed"), 20)
    assert len(await store.list_runs()) == 1
    assert len(ephemerals(slack)) == 1


async def test_rejected_app_token_stops_startup(tmp_path):
    from bot.errors import ConfigError

    config, runbooks, _ = write_config(tmp_path)
    async with SlackEmulator() as slack:
        settings = Settings(home=tmp_path / "home", config=config, locale="en")
        slack_settings = SlackSettings(slack_bot_token=BOT_TOKEN, slack_app_token="xapp-1-rejected",
                                       slack_api_url=slack.base_url, postmerge_runbook_dir=runbooks)
        slack.invalid_tokens.add("xapp-1-rejected")
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
        try:
            with pytest.raises(ConfigError) as raised:
                await asyncio.wait_for(serve(settings, slack_settings, store, 0), 10)
        finally:
            await store.close()
    assert "Slack rejected SLACK_APP_TOKEN (invalid_auth)" in raised.value.render("en")
    assert slack.socket_connections == 0


async def test_cancel_closes_socket(socket_bot):
    slack = socket_bot.slack
    await socket_bot.stop()
    assert socket_bot.task.cancelled()

    await wait_for(lambda: _is(slack.socket_connections == 0), 3)
    # Nothing reconnects after the bot stopped.
    await asyncio.sleep(0.5)
    assert slack.count("apps.connections.open") == 2
    assert slack.socket_connections == 0


async def test_serve_command_uses_socket_mode(tmp_path):
    config, runbooks, _ = write_config(tmp_path)
    log_path = tmp_path / "serve.log"
    async with SlackEmulator() as slack:
        env = cli_env(tmp_path, SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_APP_TOKEN=APP_TOKEN, SLACK_API_URL=slack.base_url,
                      POSTMERGE_CONFIG=str(config), POSTMERGE_RUNBOOK_DIR=str(runbooks))
        for name in (*OUTSIDE_VARIABLES, "SLACK_SIGNING_SECRET"):
            env.pop(name, None)
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve"], cwd=tmp_path, env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                await slack.wait_for_socket_connection(timeout=30)
            except TimeoutError:
                pytest.fail(f"postmerge serve did not connect; its output:\n{log_path.read_text()}")
            assert slack.calls_to("apps.connections.open")[0].token == APP_TOKEN

            envelope_id = await slack.socket_send("slash_commands", slash_command("help"))
            await slack.socket_ack(envelope_id, timeout=3)
            await wait_for(lambda: _is(bool(ephemerals(slack))), 10)
            assert "Usage: /postmerge start" in ephemerals(slack)[0]

            # SIGTERM stops the bot. The wait runs in a thread, so the emulator on this
            # event loop can still complete the websocket closing handshake.
            process.terminate()
            returncode = await asyncio.to_thread(process.wait, 15)
            assert returncode == 0, log_path.read_text()
            await wait_for(lambda: _is(slack.socket_connections == 0), 3)
        finally:
            if process.poll() is None:
                process.kill()
                await asyncio.to_thread(process.wait, 15)


async def _is(value: bool) -> bool:
    return value


async def _run_status_is(store, run_id: str, status: str) -> bool:
    return (await store.get_run(run_id)).status == status
