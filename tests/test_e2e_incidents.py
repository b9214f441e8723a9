"""End to end: the real runbook fails on the sandbox, and its incident is handled through Slack.

- (a) A failing v2 health check in phase 3 is rolled back. (d) Two responders
  pressing Roll back at once start one rollback.
- (b) A monitor breach in phase 6 sends traffic back to green, and the
  incident's re-run button starts the shift again at 10%.
- (c) A failing integrity check in phase 2 is rolled back, and the database is
  restored from the run's backup. (e) The bot is killed in the middle of that
  rollback, and the next bot finishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from bot.config import Settings
from bot.sandbox import down, set_switch, up
from conftest import PG_ADMIN_URL, REAL_RUNBOOK, cli_env, run_cli
from slack_emulator import SlackEmulator
from storage import Store
from test_incidents import approve_gates, button_value, incident_messages
from test_slack_bot import CHANNEL, Bot, _async, ephemerals, free_port, serve_bot, spawn_serve, wait_for, \
    wait_until_serving

pytestmark = pytest.mark.slow

INCIDENTS = "C0INCIDENTS"
STARTER = "U0STARTER"
APPROVER = "U0APPROVER"
RESPONDER = "U0RESPONDER"
OTHER_RESPONDER = "U0RESPONDER2"
ONCALL = "S0ONCALL"


@contextlib.asynccontextmanager
async def sandbox_with_slack(tmp_path: Path, monkeypatch, **switches):
    """Start a sandbox whose Slack settings come from postmerge.toml; yield (home, runbooks, config, database URL)."""
    database = f"postmerge_e2e_incident_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("POSTMERGE_SANDBOX_DB", database)
    monkeypatch.setenv("POSTMERGE_SANDBOX_PG_URL", PG_ADMIN_URL)
    home = tmp_path / "home"
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    shutil.copyfile(REAL_RUNBOOK, runbooks / "api-v2-migration.md")
    config = tmp_path / "postmerge.toml"
    config.write_text(
        f'[environments.sandbox]\nslack_incidents_channel = "{INCIDENTS}"\napprovers = ["{APPROVER}"]\n'
        f'incident_responders = ["{RESPONDER}", "{OTHER_RESPONDER}"]\noncall = ["{ONCALL}"]\n')
    await up(home)
    try:
        for name, value in switches.items():
            set_switch(home, name.replace("_", "-"), value)
        yield home, runbooks, config, f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{database}"
    finally:
        await down(home, purge=True)


async def press_gates(client: Bot, slack: SlackEmulator, done, channels: tuple[str, ...] = (CHANNEL, INCIDENTS)):
    """Press Approve and Done on every gate message as the approver until done() is true."""
    await approve_gates(client, slack, APPROVER, done, channels)


async def start_until_incident(client: Bot, slack: SlackEmulator, store: Store) -> tuple[str, dict]:
    """Start the real runbook as the starter, approve its gates, and return the run id and its incident message."""
    await client.command("start api-v2-migration sandbox", user=STARTER)
    run_id = (await wait_for(lambda: store.list_runs(), 10))[0].id
    await asyncio.wait_for(press_gates(client, slack, lambda: _async(bool(incident_messages(slack)))), 300)
    return run_id, incident_messages(slack)[0]


async def run_status(store: Store, run_id: str, *statuses: str) -> bool:
    return (await store.get_run(run_id)).status in statuses


async def v1_rows(database_url: str) -> dict[str, int]:
    connection = await asyncpg.connect(database_url)
    try:
        return dict(await connection.fetch("SELECT version, count(*) FROM api_endpoints GROUP BY version"))
    finally:
        await connection.close()


def kube_versions(objects) -> dict[str, str | None]:
    """Return the `version` label of every object the Kubernetes emulator stores, by name."""
    found = {}

    for resource, items in objects.items():
        for item in items:
            metadata = item.get("metadata") or {}
            found[f"{resource}/{metadata.get('name')}"] = (metadata.get("labels") or {}).get("version")
    return found


def blocks_text(message: dict) -> str:
    return json.dumps(message.get("blocks") or message.get("text"), ensure_ascii=False)


async def test_phase_3_health_check_rolled_back_once(tmp_path, monkeypatch):
    async with sandbox_with_slack(tmp_path, monkeypatch, v2_unhealthy=True) as (home, runbooks, config, database):
        async with SlackEmulator() as slack:
            settings = Settings(home=home, config=config, locale="ja")
            async with serve_bot(settings, slack, runbooks, tmp_path / "store.db") as (client, service):
                store = service.store
                run_id, message = await start_until_incident(client, slack, store)
                run = await store.get_run(run_id)
                assert (run.status, run.failed_phase) == ("failed", 3)
                text = blocks_text(message)
                assert "ヘルスチェック" in text
                assert "503" in text
                assert "<https://app.datadoghq.com/dashboard/emergency|監視ダッシュボード> 🆘" in text
                assert f"<!subteam^{ONCALL}>" in text
                assert f"<@{STARTER}>" in text
                assert "`r2.1` Blue環境削除" in text

                # (d) Two responders press Roll back at the same moment: one rollback starts.
                value = button_value(message, "postmerge:incident:rollback")
                await asyncio.gather(client.click("postmerge:incident:rollback", value, RESPONDER),
                                     client.click("postmerge:incident:rollback", value, OTHER_RESPONDER))
                await asyncio.wait_for(press_gates(client, slack, lambda: run_status(store, run_id, "rolled_back")),
                                       180)
                rollbacks = [item for item in await store.list_runs() if item.kind == "rollback"]
                assert len(rollbacks) == 1
                assert rollbacks[0].status == "completed"
                assert any("を選んでいます" in line for line in ephemerals(slack))

                incident = await store.incident_of_run(run_id)
                await wait_for(lambda: _async("✅ 解決済み" in blocks_text(slack.messages[(INCIDENTS, message["ts"])])))
                thread = slack.thread(INCIDENTS, message["ts"])
                assert any("ロールバック完了" in blocks_text(reply) for reply in thread)
                await wait_for(lambda: _async(any("ロールバック済み" in blocks_text(root) for (channel, _), root
                                                  in slack.messages.items()
                                                  if channel == CHANNEL and root.get("thread_ts") in (None, root["ts"]))))

        # v2's objects are gone, and v1 still serves through nginx.
        versions = kube_versions(json.loads((home / "sandbox" / "kube-state.json").read_text())["objects"])
        assert "v2" not in versions.values(), versions
        assert "v1" in versions.values(), versions
        nginx = json.loads((home / "sandbox" / "state.json").read_text())["nginx"]["url"]
        async with aiohttp.ClientSession() as session, session.get(f"{nginx}/api/v1/health") as response:
            assert response.status == 200
            assert response.headers["X-Served-By"] == "v1"
        runbook = (runbooks / "api-v2-migration.md").read_text(encoding="utf-8")
        assert "## Status: rolled-back" in runbook
        assert f"インシデント {incident.id} クローズ: ロールバック済み" in runbook
        status = json.loads(run_cli("status", "--json", "--db", f"sqlite:///{tmp_path / 'store.db'}",
                                    home=home, env=cli_env(home)).stdout)
        forward = next(row for row in status["runs"] if row["id"] == run_id)
        assert forward["status"] == "rolled_back"
        assert forward["incident"]["resolution"] == "rolled_back"
        assert forward["incident"]["action_by"] in (RESPONDER, OTHER_RESPONDER)


async def test_phase_6_breach_then_rerun_from_10_percent(tmp_path, monkeypatch):
    async with sandbox_with_slack(tmp_path, monkeypatch, v2_error_percent=2) as (home, runbooks, config, database):
        async with SlackEmulator() as slack:
            settings = Settings(home=home, config=config, locale="ja")
            async with serve_bot(settings, slack, runbooks, tmp_path / "store.db") as (client, service):
                store = service.store
                run_id, message = await start_until_incident(client, slack, store)
                text = blocks_text(message)
                assert "監視しきい値超過" in text
                # The readings of the window that breached, and traffic already back on green.
                assert "*監視の値:* p95" in text
                assert "エラーレート" in text
                assert "Blue（v2）に 0%" in text
                actions = [element["action_id"] for block in message["blocks"] for element in block.get("elements", [])
                           if block["type"] == "actions"]
                assert "postmerge:incident:rerun" in actions
                assert "postmerge:incident:retry" not in actions

                set_switch(home, "v2-error-percent", 0)
                await client.click("postmerge:incident:rerun", button_value(message, "postmerge:incident:rerun"),
                                   RESPONDER)
                await wait_for(lambda: run_status(store, run_id, "running", "waiting", "completed"), 30)
                await asyncio.wait_for(press_gates(client, slack, lambda: run_status(store, run_id, "completed",
                                                                                        "failed")), 300)
                assert (await store.get_run(run_id)).status == "completed"
                weights = [event["data"]["weight"] for event in await store.events(run_id)
                           if event["type"] == "traffic.changed"]
                assert weights == [10, 0, 10, 50, 100]
                await wait_for(lambda: _async("✅ 解決済み" in blocks_text(slack.messages[(INCIDENTS, message["ts"])])))
                incident = await store.incident_of_run(run_id)
                assert (incident.resolution, incident.action, incident.action_by) == ("retried", "rerun", RESPONDER)


async def test_phase_2_rollback_survives_restart(tmp_path, monkeypatch):
    async with sandbox_with_slack(tmp_path, monkeypatch, integrity_failure=True) as (home, runbooks, config, database):
        port = free_port()
        (home / "postmerge.toml").write_text(config.read_text())
        async with SlackEmulator() as slack, aiohttp.ClientSession() as session:
            client = Bot(f"http://127.0.0.1:{port}/slack/events", session)
            extra = {"POSTMERGE_RUNBOOK_DIR": str(runbooks), "POSTMERGE_LOCALE": "ja",
                     "POSTMERGE_SANDBOX_DB": database.rsplit("/", 1)[1], "POSTMERGE_SANDBOX_PG_URL": PG_ADMIN_URL}
            first = spawn_serve(home, slack, port, **extra)
            try:
                await wait_until_serving(client)
                store = await Store.open(Settings(home=home).store_url())
                run_id, message = await start_until_incident(client, slack, store)
                run = await store.get_run(run_id)
                assert (run.status, run.failed_phase) == ("failed", 2)
                assert (await v1_rows(database)).get("v2") == 80000
                set_switch(home, "integrity-failure", False)
                await client.click("postmerge:incident:rollback", button_value(message, "postmerge:incident:rollback"),
                                   RESPONDER)

                # (e) The rollback stops at the approval of a step nothing can undo; the bot is killed there.
                async def rollback_waiting() -> bool:
                    rollbacks = [item for item in await store.list_runs() if item.kind == "rollback"]
                    return bool(rollbacks) and rollbacks[0].status == "waiting"

                await wait_for(rollback_waiting, 60)
                first.kill()
                await asyncio.to_thread(first.wait, 10)
            finally:
                if first.poll() is None:
                    first.kill()
            second = spawn_serve(home, slack, port, **extra)
            try:
                await wait_until_serving(client)
                await asyncio.wait_for(press_gates(client, slack, lambda: run_status(store, run_id, "rolled_back"),
                                                   channels=(INCIDENTS,)), 180)
                rollback = next(item for item in await store.list_runs() if item.kind == "rollback")
                assert rollback.status == "completed"
                events = [event["type"] for event in await store.events(rollback.id)]
                assert events.count("run.claimed") >= 2
                assert await v1_rows(database) == {"v1": 80000}
                records = {record.step_id: record for record in await store.steps(rollback.id)}
                assert records["r1.3"].status == "succeeded"
                assert str(home / "runs" / run_id) in (records["r1.3"].output or "")
                incident = await store.incident_of_run(run_id)
                assert incident.resolution == "rolled_back"
                await wait_for(lambda: _async("✅ 解決済み" in blocks_text(slack.messages[(INCIDENTS, message["ts"])])))
                await store.close()
            finally:
                second.terminate()
                await asyncio.to_thread(second.wait, 15)
        runbook = (runbooks / "api-v2-migration.md").read_text(encoding="utf-8")
        assert "## Status: rolled-back" in runbook
