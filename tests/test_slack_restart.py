"""Restarts and repeated deliveries: a bot killed mid-run hands its runs to the next one.

The bot runs as `postmerge serve` in a child process, so a kill is a real
SIGKILL and the next bot finds the run only through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp

from bot.config import Settings
from slack_emulator import SlackEmulator
from storage import Store
from test_engine import runbook_text
from test_slack_bot import (
    APPROVER,
    CHANNEL,
    USER,
    Bot,
    _async,
    ephemerals,
    free_port,
    spawn_serve,
    wait_for,
    wait_until_serving,
)


def write_environment(tmp_path: Path, tasks: str, order: str) -> Path:
    """Write postmerge.toml with environment `local` and the runbook `notice`; return the work folder."""
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    (tmp_path / "postmerge.toml").write_text(
        f'[environments.local]\nworkdir = "{workdir}"\nrunbook_dir = "{runbooks}"\n'
        f'slack_runs_channel = "{CHANNEL}"\napprovers = ["{APPROVER}"]\nkill_grace_seconds = 1\n')
    (runbooks / "notice.md").write_text(runbook_text(tasks, order))
    return workdir


def buttons(slack: SlackEmulator, action_id: str) -> list[tuple[str, dict]]:
    """Return (value, message) for each button with action_id, in the order the messages were posted."""
    found = []
    for message in slack.messages.values():
        for block in message.get("blocks") or []:
            for element in block.get("elements", []):
                if element.get("action_id") == action_id:
                    found.append((element["value"], message))
    return found


def root_messages(slack: SlackEmulator) -> list[dict]:
    return [message for message in slack.messages.values() if message.get("thread_ts") in (None, message["ts"])]


@contextlib.asynccontextmanager
async def bot_process(tmp_path: Path, slack: SlackEmulator, port: int, client: Bot):
    """Run one `postmerge serve` until the block ends; the caller may kill it earlier."""
    process = spawn_serve(tmp_path, slack, port)
    try:
        await wait_until_serving(client)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            # Waited for off the event loop, so the Slack emulator in this loop can respond to the bot's last calls.
            await asyncio.to_thread(process.wait, 15)


@contextlib.asynccontextmanager
async def killed_during_slow_step(tmp_path: Path):
    """Start a run whose second step sleeps, SIGKILL the bot during it; yield (slack, client, port) for the next bot."""
    workdir = write_environment(
        tmp_path, "- [ ] one: `echo one`\n- [ ] slow: `test -f marker || { touch marker; sleep 60; }`",
        "**Phase 1: a（1分）**\n1. one\n2. slow")
    port = free_port()
    async with SlackEmulator() as slack, aiohttp.ClientSession() as session:
        client = Bot(f"http://127.0.0.1:{port}/slack/events", session)
        async with bot_process(tmp_path, slack, port, client) as first:
            await client.command("start notice local")
            await wait_for(lambda: _async((workdir / "marker").exists()))
            first.kill()
            first.wait(10)
        yield slack, client, port


async def run_events(tmp_path: Path) -> tuple[str, list[dict]]:
    store = await Store.open(Settings(home=tmp_path).store_url())
    try:
        run = (await store.list_runs())[0]
        return run.status, await store.events(run.id)
    finally:
        await store.close()


async def test_restart_posts_pending_approval_again(tmp_path):
    workdir = write_environment(
        tmp_path, "- [ ] one: `echo one`\n- [ ] notice send: `echo sent > sent.txt`\n  - 送信前確認: テスト送信",
        "**Phase 1: a（1分）**\n1. one\n2. notice send")
    port = free_port()
    async with SlackEmulator() as slack, aiohttp.ClientSession() as session:
        client = Bot(f"http://127.0.0.1:{port}/slack/events", session)
        async with bot_process(tmp_path, slack, port, client) as first:
            await client.command("start notice local")
            await wait_for(lambda: _async(buttons(slack, "postmerge:approve")))
            first.kill()
            first.wait(10)

        async with bot_process(tmp_path, slack, port, client):
            posted = await wait_for(lambda: _async(len(buttons(slack, "postmerge:approve")) == 2))
            assert posted
            (old_value, old_message), (new_value, new_message) = buttons(slack, "postmerge:approve")
            # The same pending decision, asked again in the run's own thread.
            assert new_value == old_value
            assert new_message["thread_ts"] == old_message["thread_ts"]
            assert any("restarted" in (message.get("text") or "") and message.get("thread_ts") == new_message["thread_ts"]
                       for message in slack.messages.values())
            assert not (workdir / "sent.txt").exists()

            # A click on the old message counts as well as one on the new.
            await client.click("postmerge:approve", old_value, APPROVER)
            await wait_for(lambda: _async(any("completed" in str(message.get("blocks"))
                                              for message in root_messages(slack))))
        assert len(root_messages(slack)) == 1
        assert (workdir / "sent.txt").read_text().strip() == "sent"
        status, events = await run_events(tmp_path)
        assert status == "completed"
        assert len([event for event in events if event["type"] == "approval.decided"]) == 1
        assert [event["type"] for event in events].count("run.claimed") >= 2


async def test_restart_asks_about_an_interrupted_step(tmp_path):
    async with killed_during_slow_step(tmp_path) as (slack, client, port):
        async with bot_process(tmp_path, slack, port, client):
            # A shell step is not known to be safe to repeat, so the bot posts a decision with a Retry button.
            retry = await wait_for(lambda: _async(buttons(slack, "postmerge:retry")))
            value, message = retry[0]
            assert {"postmerge:done", "postmerge:skip", "postmerge:abort"} <= {
                element["action_id"] for block in message["blocks"] for element in block.get("elements", [])}
            assert "stopped while this step was running" in str(message["blocks"])
            await client.click("postmerge:retry", value, USER)
            await wait_for(lambda: _async(any("completed" in str(root.get("blocks")) for root in root_messages(slack))))
        status, events = await run_events(tmp_path)
        assert status == "completed"
        types = [event["type"] for event in events]
        assert "step.interrupted" in types
        assert "step.orphan_stopped" in types


async def test_repeated_delivery_starts_one_run(tmp_path):
    write_environment(tmp_path, "- [ ] one: `sleep 5`", "**Phase 1: a（1分）**\n1. one")
    port = free_port()
    async with SlackEmulator() as slack, aiohttp.ClientSession() as session:
        client = Bot(f"http://127.0.0.1:{port}/slack/events", session)
        async with bot_process(tmp_path, slack, port, client):
            assert (await client.command("start notice local", trigger_id="t-once"))[0] == 200
            assert (await client.command("start notice local", trigger_id="t-once", retry_num=1))[0] == 200
            assert (await client.command("start notice local", trigger_id="t-once", retry_num=2))[0] == 200
            await wait_for(lambda: _async(any("started" in text for text in ephemerals(slack))))
            await asyncio.sleep(1)
            # The usage reply to the start-up probe, then one reply for the one delivery that counted:
            # the repeats got no "already running" error because they never reached the handler.
            assert len(ephemerals(slack)) == 2, ephemerals(slack)
        store = await Store.open(Settings(home=tmp_path).store_url())
        try:
            assert len(await store.list_runs()) == 1
        finally:
            await store.close()


async def test_interrupted_step_incident_retry_button(tmp_path):
    async with killed_during_slow_step(tmp_path) as (slack, client, port):
        async with bot_process(tmp_path, slack, port, client):
            # No incidents channel is set, so the incident goes to the runs channel, beside the question.
            retry = await wait_for(lambda: _async(buttons(slack, "postmerge:incident:retry")))
            value, message = retry[0]
            assert "Incident" in str(message["blocks"])
            assert "interrupted step" in str(message["blocks"])
            await client.click("postmerge:incident:retry", value, USER)
            await wait_for(lambda: _async(any("not an incident responder" in text for text in ephemerals(slack))))
            await client.click("postmerge:incident:retry", value, APPROVER)
            await wait_for(lambda: _async(any("completed" in str(root.get("blocks")) for root in root_messages(slack)
                                              if "Incident" not in str(root.get("blocks")))))
        status, events = await run_events(tmp_path)
        assert status == "completed"
        types = [event["type"] for event in events]
        assert "interrupted.decided" in types
        assert types.count("incident.action") == 1
        assert "incident.closed" in types
