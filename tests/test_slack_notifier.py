"""The Slack notifier against the Slack emulator, with the real slack_sdk client."""

from __future__ import annotations

import asyncio
import time

import pytest
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.gates import RunEvent
from bot.plan import Plan
from bot.slack.notifier import SlackRunNotifier
from bot.slack.pacing import ChannelPacer
from slack_emulator import RateLimits, SlackEmulator
from test_engine import runbook_text, start_run

CHANNEL = "C0RUNS"


def roots(slack: SlackEmulator) -> list[dict]:
    return [message for message in slack.messages.values() if message.get("thread_ts") in (None, message["ts"])]


def replies(slack: SlackEmulator) -> list[dict]:
    return [message for message in slack.messages.values() if message.get("thread_ts") not in (None, message["ts"])]


def client_for(slack: SlackEmulator) -> AsyncWebClient:
    client = AsyncWebClient(token="xoxb-test", base_url=slack.base_url)
    client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=2))
    return client


async def test_notifier_mirrors_run(tmp_path):
    text = runbook_text("- [ ] one: `seq 1 5000`\n- [ ] two: `echo two`",
                        "**Phase 1: a（1分）**\n1. one\n\n**Phase 2: b（1分）**\n1. two")
    async with SlackEmulator() as slack:
        store, engine, run_id, _ = await start_run(f"sqlite+aiosqlite:///{tmp_path / 's.db'}", text, tmp_path)
        notifier = SlackRunNotifier(client_for(slack), store, CHANNEL, "ja", update_interval=1.0, post_interval=1.1)
        engine.notifiers.append(notifier)
        try:
            outcome = await engine.drive(run_id)
            await notifier.close()
        finally:
            await store.close()
        assert outcome.status == "completed"
        failed = [call for call in slack.calls if not call.ok]
        assert failed == []
        root_messages = roots(slack)
        assert len(root_messages) == 1
        assert "✅ sample 完了" in str(root_messages[0]["blocks"])
        phase_replies = replies(slack)
        assert len(phase_replies) == 2
        assert "5000" in str(phase_replies[0]["blocks"])
        assert notifier.failures == 0


async def test_notifier_coalesces_frequent_updates(tmp_path):
    # A shortened Tier 3 window: 5 updates per 3 s, and one per 0.5 s per message.
    limits = RateLimits(update_per_channel=5, update_window=3.0, update_per_message_interval=0.5)
    text = runbook_text("- [ ] one: `echo one`", "**Phase 1: a（1分）**\n1. one")
    async with SlackEmulator(rate_limits=limits) as slack:
        store, _, run_id, _ = await start_run(f"sqlite+aiosqlite:///{tmp_path / 's.db'}", text, tmp_path)
        notifier = SlackRunNotifier(client_for(slack), store, CHANNEL, "en", update_interval=0.65, post_interval=1.1)
        try:
            run = await store.get_run(run_id)
            plan_model = Plan.model_validate(run.plan)
            started = time.monotonic()
            while time.monotonic() - started < 6:
                await notifier.notify(RunEvent("step.started", run_id, plan_model))
                await asyncio.sleep(0.1)
            await store.update_run(run_id, status="completed", finished_at=time.time())
            await notifier.notify(RunEvent("run.completed", run_id, plan_model))
            await notifier.close()
        finally:
            await store.close()
        updates = slack.calls_to("chat.update")
        assert [call for call in updates if call.status == 429] == []
        assert len(updates) <= 12
        assert "completed" in str(roots(slack)[0]["blocks"])


async def test_notifier_survives_outage(tmp_path):
    text = runbook_text("- [ ] one: `echo one`\n- [ ] two: `echo two`", "**Phase 1: a（1分）**\n1. one\n2. two")
    async with SlackEmulator() as slack:
        store, engine, run_id, _ = await start_run(f"sqlite+aiosqlite:///{tmp_path / 's.db'}", text, tmp_path)
        notifier = SlackRunNotifier(client_for(slack), store, CHANNEL, "en", update_interval=1.0, post_interval=1.1)
        engine.notifiers.append(notifier)
        slack.outage(True)
        try:
            outcome = await engine.drive(run_id)
            assert outcome.status == "completed"
            assert notifier.failures > 0
            slack.outage(False)
            await notifier.flush()
            await notifier.close()
        finally:
            await store.close()
        assert "completed" in str(roots(slack)[0]["blocks"])


@pytest.mark.slow
async def test_minute_of_updates_within_tier_3(tmp_path):
    # Slack's own limits: 50 chat.update a minute per channel and one a second per message.
    # Two runs in one channel share the service's pacer, so together they stay within them.
    pacer = ChannelPacer()
    async with SlackEmulator(rate_limits=RateLimits()) as slack:
        first = await start_run(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
                                runbook_text("- [ ] one: `echo one`", "**Phase 1: a（1分）**\n1. one"), tmp_path)
        second = await start_run(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
                                 runbook_text("- [ ] one: `echo one`", "**Phase 1: a（1分）**\n1. one"), tmp_path)
        runs = []
        for store, _, run_id, _ in (first, second):
            notifier = SlackRunNotifier(client_for(slack), store, CHANNEL, "en", pacer=pacer)
            plan = Plan.model_validate((await store.get_run(run_id)).plan)
            runs.append((store, run_id, notifier, plan))
        try:
            started = time.monotonic()
            while time.monotonic() - started < 60:
                for _, run_id, notifier, plan in runs:
                    await notifier.notify(RunEvent("step.started", run_id, plan))
                await asyncio.sleep(0.1)
            for store, run_id, notifier, plan in runs:
                await store.update_run(run_id, status="completed", finished_at=time.time())
                await notifier.notify(RunEvent("run.completed", run_id, plan))
                await notifier.close()
        finally:
            for store, *_ in runs:
                await store.close()
        updates = slack.calls_to("chat.update")
        assert [call for call in updates if call.status == 429] == []
        assert [call for call in slack.calls if not call.ok] == []
        # Coalesced: about one update every 1.25 s for both runs together, not 600 each.
        assert 30 <= len(updates) <= 52
        final = roots(slack)
        assert len(final) == 2
        assert all("completed" in str(message["blocks"]) for message in final)
