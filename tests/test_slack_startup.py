"""`postmerge serve` start-up: each bad setting stops it with one line naming the setting."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env
from slack_emulator import SlackEmulator
from test_slack_bot import SECRET, free_port


def serve(tmp_path: Path, port: int | None = None, timeout: float = 30, **variables: str):
    """Run `postmerge serve` until it exits or `timeout` passes; return the process result."""
    env = cli_env(tmp_path, POSTMERGE_LISTEN_HOST="127.0.0.1", SLACK_API_URL="http://127.0.0.1:9/api/")
    for name in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN", "SENTRY_DSN", "POSTMERGE_CONFIG"):
        env.pop(name, None)
    env.update(variables)
    return subprocess.run([sys.executable, "-m", "bot.cli", "serve", "--port", str(port or free_port())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("variables", "expected"), [
    ({}, "SLACK_BOT_TOKEN is not set"),
    ({"SLACK_BOT_TOKEN": "abc", "SLACK_SIGNING_SECRET": SECRET}, "SLACK_BOT_TOKEN is not a bot token"),
    ({"SLACK_BOT_TOKEN": "xoxb-test"}, "SLACK_SIGNING_SECRET is not set"),
    ({"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_APP_TOKEN": "xoxb-wrong"}, "SLACK_APP_TOKEN is not an app-level token"),
    ({"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": "ftp://x"},
     "SLACK_API_URL is not an http(s) URL"),
    ({"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SECRET, "SENTRY_DSN": "abc"},
     "SENTRY_DSN is not a valid Sentry DSN"),
    ({"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SECRET},
     "the Slack API at http://127.0.0.1:9/api/ could not be reached"),
])
def test_bad_setting_stops_with_one_line(tmp_path, variables, expected):
    result = serve(tmp_path, **variables)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_japanese_by_default(tmp_path):
    result = serve(tmp_path, POSTMERGE_LOCALE="ja", SLACK_BOT_TOKEN="abc", SLACK_SIGNING_SECRET=SECRET)
    assert result.returncode == 2
    assert "SLACK_BOT_TOKEN がボットトークンではありません" in result.stderr


async def test_rejected_token_and_broken_config(tmp_path):
    async with SlackEmulator() as slack:
        # The emulator runs on this event loop, so the blocking subprocess.run waits in a thread.
        rejected = await asyncio.to_thread(serve, tmp_path, SLACK_BOT_TOKEN="xoxb-invalid", SLACK_SIGNING_SECRET=SECRET,
                         SLACK_API_URL=slack.base_url)
        assert rejected.returncode == 2
        assert "Slack rejected SLACK_BOT_TOKEN (invalid_auth)" in rejected.stderr

        config = tmp_path / "broken.toml"
        config.write_text("[environments.x\n")
        broken = await asyncio.to_thread(serve, tmp_path, SLACK_BOT_TOKEN="xoxb-test", SLACK_SIGNING_SECRET=SECRET,
                       SLACK_API_URL=slack.base_url, POSTMERGE_CONFIG=str(config))
        assert broken.returncode == 2
        assert str(config) in broken.stderr
        assert "Traceback" not in broken.stderr


async def test_port_in_use(tmp_path):
    async with SlackEmulator() as slack:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = await asyncio.to_thread(serve, tmp_path, port=port, SLACK_BOT_TOKEN="xoxb-test", SLACK_SIGNING_SECRET=SECRET,
                           SLACK_API_URL=slack.base_url)
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 could not be opened" in result.stderr
    assert "Traceback" not in result.stderr


async def test_empty_app_token_counts_as_unset(tmp_path):
    async with SlackEmulator() as slack:
        env = cli_env(tmp_path, POSTMERGE_LISTEN_HOST="127.0.0.1", SLACK_BOT_TOKEN="xoxb-test",
                      SLACK_SIGNING_SECRET=SECRET, SLACK_APP_TOKEN="", SLACK_API_URL=slack.base_url)
        env.pop("SENTRY_DSN", None)
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "serve", "--port", str(port), cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            # No runbooks folder here: the bot prints a warning, then the address it listens on.
            warning = await asyncio.wait_for(process.stdout.readline(), 20)
            assert f"runbook folders not found: {tmp_path / 'runbooks'}" in warning.decode()
            line = await asyncio.wait_for(process.stdout.readline(), 20)
            assert f"http://127.0.0.1:{port}/slack/events" in line.decode()
        finally:
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 15) == 0
        stderr = (await process.stderr.read()).decode()
        assert "will be unused" not in stderr
