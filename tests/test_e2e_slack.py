"""End to end through Slack: the real runbook on the sandbox, started by /postmerge and approved by buttons."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid

import asyncpg
import pytest

from bot.config import Settings
from bot.sandbox import down, up
from conftest import PG_ADMIN_URL, REAL_RUNBOOK
from slack_emulator import SlackEmulator
from test_slack_bot import serve_bot

pytestmark = pytest.mark.slow

STARTER = "U0STARTER"
APPROVER = "U0APPROVER"


async def test_real_runbook_from_slack(tmp_path, monkeypatch):
    database = f"postmerge_e2e_slack_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("POSTMERGE_SANDBOX_DB", database)
    monkeypatch.setenv("POSTMERGE_SANDBOX_PG_URL", PG_ADMIN_URL)
    home = tmp_path / "home"
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    shutil.copyfile(REAL_RUNBOOK, runbooks / "api-v2-migration.md")
    await up(home)
    try:
        async with SlackEmulator() as slack:
            settings = Settings(home=home, locale="ja")
            async with serve_bot(settings, slack, runbooks, tmp_path / "store.db") as (bot, service):
                store = service.store
                status, seconds = await bot.command("start api-v2-migration sandbox", user=STARTER)
                assert status == 200
                assert seconds < 3
                clicked: set[str] = set()
                deadline = time.monotonic() + 300
                run_id = None
                while time.monotonic() < deadline:
                    runs = await store.list_runs()
                    if runs:
                        run_id = runs[0].id
                        if runs[0].status not in ("pending", "running", "waiting"):
                            break
                    for message in list(slack.messages.values()):
                        for block in message.get("blocks") or []:
                            for element in block.get("elements", []):
                                action = element.get("action_id")
                                if action in ("postmerge:approve", "postmerge:done") and \
                                        element["value"] not in clicked:
                                    clicked.add(element["value"])
                                    assert await bot.click(action, element["value"], APPROVER) == 200
                    await asyncio.sleep(0.2)
                assert run_id is not None
                task = service.tasks.get(run_id)
                if task is not None:
                    await asyncio.wait_for(task, 30)
                run = await store.get_run(run_id)
                assert run.status == "completed", run.error

        errors = [call for call in slack.calls if call.error]
        assert errors == []
        roots = [message for message in slack.messages.values() if message.get("thread_ts") in (None, message["ts"])]
        assert len(roots) == 1
        assert "完了" in str(roots[0]["blocks"])
        # The approval of each later traffic shift shows the readings of the monitor window that just ended.
        # The posted version is checked, because a decided gate message is edited afterwards.
        shifts = [call.args for call in slack.calls_to("chat.postMessage")
                  if "承認が必要です: p6." in (call.args.get("text") or "")]
        assert len(shifts) == 3
        assert "直前の監視ウィンドウ" not in str(shifts[0]["blocks"])
        assert all("直前の監視ウィンドウ: p95" in str(args["blocks"]) for args in shifts[1:])
        connection = await asyncpg.connect(f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{database}")
        try:
            counts = dict(await connection.fetch("SELECT version, count(*) FROM api_endpoints GROUP BY version"))
        finally:
            await connection.close()
        assert counts == {"v2": 80000}
        text = (runbooks / "api-v2-migration.md").read_text(encoding="utf-8")
        assert "## Status: completed" in text
    finally:
        await down(home, purge=True)
