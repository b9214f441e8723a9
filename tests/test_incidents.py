"""Incidents on a small runbook: opened on failure, buttons for responders only, decided once, closed and shown alike.

The end-to-end scenarios on the sandbox are in test_e2e_incidents.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bot.config import Settings
from conftest import REAL_RUNBOOK, cli_env, run_cli
from slack_emulator import SlackEmulator
from storage import Store
from test_engine import runbook_text
from test_slack_bot import APPROVER, CHANNEL, USER, _async, ephemerals, serve_bot, wait_for

INCIDENTS = "C0INCIDENTS"
RESPONDER = "U0RESPONDER"
OTHER_RESPONDER = "U0RESPONDER2"
ONCALL = "S0ONCALL"

FAILING_TASKS = (
    "- [ ] prepare: `echo prepared > prepared.txt`\n"
    "- [ ] deploy: `echo deploying; echo 'token=xoxb-1234567890-abcdef' ; exit 3`\n"
    "  - URL: https://app.datadoghq.com/dashboard/deploys\n"
)
ORDER = "**Phase 1: 準備（1分）**\n1. prepare\n2. deploy"
ROLLBACK = (
    "**Phase 1 失敗（準備）:**\n1. 片付け: `rm prepared.txt`\n2. 確認: `test ! -e prepared.txt`\n\n"
    "**緊急時:**\n- 旧版へ戻す: `echo emergency > emergency.txt`\n"
    "- 監視ダッシュボード: https://app.datadoghq.com/dashboard/emergency\n"
    "- エスカレーション: Slack #incidents チャンネル\n"
)


def write_setup(tmp_path: Path, rollback: str = ROLLBACK) -> tuple[Path, Path, Path]:
    runbooks = tmp_path / "runbooks"
    runbooks.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = tmp_path / "postmerge.toml"
    config.write_text(
        f'[environments.local]\nworkdir = "{workdir}"\nrunbook_dir = "{runbooks}"\n'
        f'slack_runs_channel = "{CHANNEL}"\nslack_incidents_channel = "{INCIDENTS}"\n'
        f'approvers = ["{APPROVER}"]\nincident_responders = ["{RESPONDER}", "{OTHER_RESPONDER}"]\n'
        f'oncall = ["{ONCALL}"]\n')
    (runbooks / "deploy.md").write_text(runbook_text(FAILING_TASKS, ORDER, rollback), encoding="utf-8")
    return runbooks, workdir, config


def incident_messages(slack: SlackEmulator) -> list[dict]:
    return [message for (channel, _), message in slack.messages.items()
            if channel == INCIDENTS and message.get("thread_ts") in (None, message["ts"])]


def button_value(message: dict, action_id: str) -> str | None:
    for block in message.get("blocks") or []:
        for element in block.get("elements", []):
            if element.get("action_id") == action_id:
                return element["value"]
    return None


@pytest.fixture
async def failed_run(tmp_path, request):
    """Start the failing runbook from Slack; yield once its incident is posted."""
    runbooks, workdir, config = write_setup(tmp_path, getattr(request, "param", ROLLBACK))
    async with SlackEmulator() as slack:
        settings = Settings(home=tmp_path / "home", config=config, locale="ja")
        async with serve_bot(settings, slack, runbooks, tmp_path / "store.db") as (client, service):
            await client.command("start deploy local", user=USER)
            message = await wait_for(lambda: _async((incident_messages(slack) or [None])[0]), 30)
            run = (await service.store.list_runs())[0]
            yield client, slack, service, workdir, run, message


async def test_failure_opens_incident_with_everything_a_responder_needs(failed_run):
    client, slack, service, workdir, run, message = failed_run
    text = json.dumps(message["blocks"], ensure_ascii=False)
    assert run.status == "failed"
    assert "🚨 インシデント: sample（local）ステップ失敗" in text
    assert "Phase 1 準備" in text
    assert "`p1.2` deploy（shell）" in text
    assert f"<@{USER}>" in text
    assert "<https://app.datadoghq.com/dashboard/emergency|監視ダッシュボード> 🆘" in text
    assert "dashboard/deploys" in text
    assert f"<!subteam^{ONCALL}>" in text
    assert "deploying" in text
    # The token in the output tail is masked before it reaches any channel.
    assert "xoxb-1234567890" not in json.dumps([call.args for call in slack.calls], ensure_ascii=False)
    # The run thread links to the incident, and the incident links back to the run thread.
    run_root = run.options["slack"]["ts"]
    await wait_for(lambda: _async(any("インシデント" in reply.get("text", "") and "archives/C0INCIDENTS" in
                                      reply.get("text", "") for reply in slack.thread(CHANNEL, run_root))))
    assert f"archives/{CHANNEL}/p{run_root.replace('.', '')}" in text
    actions = [element["action_id"] for block in message["blocks"] for element in block.get("elements", [])
               if block.get("type") == "actions"]
    assert actions == ["postmerge:incident:rollback", "postmerge:emergency:1", "postmerge:incident:retry",
                       "postmerge:incident:skip", "postmerge:incident:acknowledge"]
    # The message lists what Roll back would run, so a responder can read it before pressing.
    assert "`r1.1` 片付け" in text


async def test_only_responders_may_press(failed_run):
    client, slack, service, workdir, run, message = failed_run
    value = button_value(message, "postmerge:incident:acknowledge")
    await client.click("postmerge:incident:acknowledge", value, USER)
    await wait_for(lambda: _async(any("インシデント対応者ではない" in text for text in ephemerals(slack))))
    incident = await service.store.incident_of_run(run.id)
    assert incident.open and incident.action is None


async def test_acknowledge_closes_and_every_view_agrees(failed_run, tmp_path):
    client, slack, service, workdir, run, message = failed_run
    value = button_value(message, "postmerge:incident:acknowledge")
    assert await client.click("postmerge:incident:acknowledge", value, RESPONDER) == 200
    await wait_for(lambda: _closed(service, run.id))
    incident = await service.store.incident_of_run(run.id)
    assert (incident.resolution, incident.closed_by) == ("acknowledged", RESPONDER)

    async def shown() -> bool:
        edited = slack.messages[(INCIDENTS, message["ts"])]
        return "✅ 解決済み" in json.dumps(edited["blocks"], ensure_ascii=False)

    await wait_for(shown)
    edited = slack.messages[(INCIDENTS, message["ts"])]
    assert not [block for block in edited["blocks"] if block["type"] == "actions"]
    assert f"<@{RESPONDER}> が「確認済み」を選びました" in json.dumps(edited["blocks"], ensure_ascii=False)
    await wait_for(lambda: _async(any("インシデントを閉じました: 確認済み" in reply.get("text", "")
                                      for reply in slack.thread(INCIDENTS, message["ts"]))))
    await wait_for(lambda: _async(any("閉じました: 確認済み" in reply.get("text", "")
                                      for reply in slack.thread(CHANNEL, run.options["slack"]["ts"]))))
    runbook = (tmp_path / "runbooks" / "deploy.md").read_text(encoding="utf-8")
    assert f"インシデント {incident.id}: ステップ失敗" in runbook
    assert f"インシデント {incident.id} クローズ: 確認済み" in runbook
    # A second press finds the incident closed, and changes nothing.
    await client.click("postmerge:incident:rollback", value, OTHER_RESPONDER)
    await wait_for(lambda: _async(any("閉じています" in text for text in ephemerals(slack))))
    assert [item for item in await service.store.list_runs() if item.kind == "rollback"] == []


async def test_simultaneous_rollback_presses_run_once(failed_run, tmp_path):
    client, slack, service, workdir, run, message = failed_run
    value = button_value(message, "postmerge:incident:rollback")
    statuses = await asyncio.gather(client.click("postmerge:incident:rollback", value, RESPONDER),
                                    client.click("postmerge:incident:rollback", value, OTHER_RESPONDER))
    assert statuses == [200, 200]
    await asyncio.wait_for(approve_gates(client, slack, APPROVER, lambda: _closed(service, run.id)), 60)
    rollbacks = [item for item in await service.store.list_runs() if item.kind == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0].status == "completed"
    assert not (workdir / "prepared.txt").exists()
    assert (await service.store.get_run(run.id)).status == "rolled_back"
    incident = await service.store.incident_of_run(run.id)
    assert incident.resolution == "rolled_back"
    assert incident.rollback_run_id == rollbacks[0].id
    loser = OTHER_RESPONDER if incident.action_by == RESPONDER else RESPONDER
    await wait_for(lambda: _async(any("を選んでいます" in call.args.get("text", "")
                                      for call in slack.calls_to("chat.postEphemeral")
                                      if call.args.get("user") == loser)))
    events = [event for event in await service.store.events(run.id) if event["type"] == "incident.action"]
    assert len(events) == 1
    # The rollback reported into the incident's thread, not into the runs channel.
    await wait_for(lambda: _async(any("ロールバック完了" in json.dumps(reply.get("blocks") or reply.get("text"),
                                                                ensure_ascii=False)
                                      for reply in slack.thread(INCIDENTS, message["ts"]))))
    runbook = tmp_path / "runbooks" / "deploy.md"
    await wait_for(lambda: _async("## Status: rolled-back" in runbook.read_text(encoding="utf-8")))


async def test_emergency_action_runs_once_into_the_incident_thread(failed_run):
    client, slack, service, workdir, run, message = failed_run
    value = button_value(message, "postmerge:emergency:1")
    await asyncio.gather(client.click("postmerge:emergency:1", value, RESPONDER),
                         client.click("postmerge:emergency:1", value, OTHER_RESPONDER))

    async def done() -> bool:
        runs = [item for item in await service.store.list_runs() if item.kind == "emergency"]
        return bool(runs) and runs[0].status == "completed"

    await wait_for(done, 30)
    assert len([item for item in await service.store.list_runs() if item.kind == "emergency"]) == 1
    assert (workdir / "emergency.txt").read_text().strip() == "emergency"
    # The incident stays open: an emergency action is not a resolution.
    incident = await service.store.incident_of_run(run.id)
    assert incident.open and incident.action is None


async def test_retry_after_the_fix_completes_and_closes(failed_run, tmp_path):
    client, slack, service, workdir, run, message = failed_run
    runbook = tmp_path / "runbooks" / "deploy.md"
    # The run keeps the plan it started with; the fix is in the environment, as a file the step reads.
    assert (await service.store.get_run(run.id)).status == "failed"
    plan_step = next(step for step in run.plan["phases"][0]["steps"] if step["id"] == "p1.2")
    assert "exit 3" in plan_step["commands"][0]
    value = button_value(message, "postmerge:incident:skip")
    await client.click("postmerge:incident:skip", value, RESPONDER)
    await wait_for(lambda: _closed(service, run.id), 30)
    incident = await service.store.incident_of_run(run.id)
    assert incident.resolution == "retried"
    assert (await service.store.get_run(run.id)).status == "completed"
    steps = {record.step_id: record.status for record in await service.store.steps(run.id)}
    assert steps["p1.2"] == "skipped"
    assert "インシデント" in runbook.read_text(encoding="utf-8")


async def approve_gates(client, slack, user: str, done, channels: tuple[str, ...] = (INCIDENTS,)) -> None:
    """Press every Approve and Done button in the channels as user until done() is true."""
    pressed: set[str] = set()
    while not await done():
        for (channel, _), message in list(slack.messages.items()):
            if channel not in channels:
                continue
            for action_id in ("postmerge:approve", "postmerge:done"):
                value = button_value(message, action_id)
                if value is not None and value not in pressed:
                    pressed.add(value)
                    await client.click(action_id, value, user)
        await asyncio.sleep(0.2)


BROKEN_ROLLBACK = ROLLBACK.replace("2. 確認: `test ! -e prepared.txt`", "2. 後片付け: `test -e never-there`")


@pytest.mark.parametrize("failed_run", [BROKEN_ROLLBACK], indirect=True)
async def test_failed_rollback_asks_again_and_skip_finishes(failed_run):
    client, slack, service, workdir, run, message = failed_run
    await client.click("postmerge:incident:rollback", button_value(message, "postmerge:incident:rollback"),
                       RESPONDER)

    async def needs_decision_again() -> bool:
        incident = await service.store.incident_of_run(run.id)
        return incident.round == 2

    await asyncio.wait_for(approve_gates(client, slack, APPROVER, needs_decision_again), 60)
    incident = await service.store.incident_of_run(run.id)
    assert incident.reason == "rollback_failed"
    assert incident.step_id == "r1.2"
    assert incident.open

    async def offered() -> dict | None:
        edited = slack.messages[(INCIDENTS, message["ts"])]
        return edited if button_value(edited, "postmerge:incident:skip") else None

    edited = await wait_for(offered)
    assert "ロールバック失敗" in json.dumps(edited["blocks"], ensure_ascii=False)
    assert button_value(edited, "postmerge:incident:rollback") is None
    await client.click("postmerge:incident:skip", button_value(edited, "postmerge:incident:skip"), RESPONDER)
    await asyncio.wait_for(approve_gates(client, slack, APPROVER, lambda: _closed(service, run.id)), 60)
    incident = await service.store.incident_of_run(run.id)
    assert incident.resolution == "rolled_back"
    rollback = await service.store.get_run(incident.rollback_run_id)
    assert rollback.status == "completed"
    steps = {record.step_id: record.status for record in await service.store.steps(rollback.id)}
    assert steps["r1.2"] == "skipped"


async def _closed(service, run_id: str) -> bool:
    incident = await service.store.incident_of_run(run_id)
    return incident is not None and not incident.open


async def test_action_recorded_once_on_both_stores(store_url):
    store = await Store.open(store_url)
    try:
        run_id = await store.create_run({}, [{"id": "s", "kind": "shell", "title": "s"}], runbook="r",
                                        runbook_path="/r.md", environment="e", started_by="u")
        incident, fresh = await store.open_incident(run_id, reason="failed", phase=1, step_id="s", data={})
        assert fresh
        results = await asyncio.gather(*(store.take_incident_action(incident.id, 1, "rollback", f"U{index}")
                                         for index in range(8)))
        assert sum(1 for won, _ in results if won) == 1
        # A failure while the rollback is chosen does not ask again; a failed rollback does.
        same, fresh = await store.open_incident(run_id, reason="aborted", phase=1, step_id="s", data={})
        assert (same.round, fresh) == (1, False)
        again, fresh = await store.open_incident(run_id, reason="rollback_failed", phase=1, step_id="r1.1",
                                                 data={}, keep_rollback=False)
        assert (again.id, again.round, again.action, fresh) == (incident.id, 2, None, True)
        won, _ = await store.take_incident_action(incident.id, 1, "retry", "U1")
        assert not won
        assert await store.close_incident(incident.id, "acknowledged", "U1")
        assert not await store.close_incident(incident.id, "rolled_back", "U2")
    finally:
        await store.close()


def test_terminal_emergency_and_rollback_close_the_incident(tmp_path, home):
    workdir = tmp_path / "work"
    workdir.mkdir()
    runbook = workdir / "deploy.md"
    runbook.write_text(runbook_text(FAILING_TASKS, ORDER, ROLLBACK), encoding="utf-8")
    env = cli_env(home)
    failed = run_cli("run", str(runbook), "--yes", home=home, env=env, cwd=workdir)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Recorded incident" in failed.stdout
    assert "postmerge emergency" in failed.stdout
    status = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"][0]
    run_id = status["id"]
    assert status["incident"]["status"] == "open"
    assert status["incident"]["reason"] == "failed"

    # A resume is the incident's retry. It is recorded on the incident, and a second failure starts a new round.
    resumed = run_cli("resume", run_id, "--yes", home=home, env=env, cwd=workdir)
    assert resumed.returncode == 1
    again_open = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"][0]["incident"]
    assert again_open["round"] == 2
    assert again_open["action"] is None

    listed = run_cli("emergency", run_id, "2", "--yes", home=home, env=env, cwd=workdir)
    assert listed.returncode == 2
    assert "not something postmerge can carry out" in listed.stderr
    assert "https://app.datadoghq.com/dashboard/emergency" in listed.stderr
    emergency = run_cli("emergency", run_id, "1", "--yes", home=home, env=env, cwd=workdir)
    assert emergency.returncode == 0, emergency.stdout + emergency.stderr
    assert (workdir / "emergency.txt").exists()

    rolled = run_cli("rollback", run_id, "--yes", home=home, env=env, cwd=workdir)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "closed: rolled back" in rolled.stdout
    assert not (workdir / "prepared.txt").exists()
    rows = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"]
    forward = next(row for row in rows if row["id"] == run_id)
    assert forward["status"] == "rolled_back"
    assert forward["incident"]["status"] == "closed"
    assert forward["incident"]["resolution"] == "rolled_back"
    table = run_cli("status", home=home, env=env).stdout
    assert "rolled back" in table
    notes = runbook.read_text(encoding="utf-8")
    assert "Status: rolled-back" in notes
    assert "緊急対応完了" in notes
    again = run_cli("rollback", run_id, "--yes", home=home, env=env, cwd=workdir)
    assert again.returncode == 2


class AbortAtMonitor:
    """Approve every gate, and abort the run at its monitor step, as a person watching the shift would."""

    async def answer(self, request):
        from bot.gates import GateAnswer

        if request.step.kind == "monitor":
            return GateAnswer("abort", "U0WATCHER")
        return GateAnswer({"approval": "approved", "manual": "done"}[request.kind], "tester")


async def test_abort_in_traffic_phase_opens_incident(store_url, tmp_path):
    from test_engine import start_run

    text = runbook_text("- [ ] one: `echo one`",
                        "**Phase 1: a（1分）**\n1. one\n\n**Phase 2: traffic（5分）**\n1. 監視（5分）")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path)
    engine.interaction = AbortAtMonitor()
    try:
        outcome = await engine.drive(run_id)
        assert outcome.status == "aborted"
        incident = await store.incident_of_run(run_id)
        assert incident.reason == "aborted"
        assert incident.phase == 2
        assert incident.step_id == "p2.1"
    finally:
        await store.close()


async def test_abort_outside_traffic_opens_nothing(store_url, tmp_path):
    from test_engine import start_run

    text = runbook_text("- [ ] one: `echo one`\n- [ ] two: `echo two`",
                        "**Phase 1: a（1分）**\n1. one\n2. 承認")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path)
    engine.interaction = AbortAtMonitor()

    class AbortAll:
        async def answer(self, request):
            from bot.gates import GateAnswer

            return GateAnswer("abort", "U0WATCHER")

    engine.interaction = AbortAll()
    try:
        assert (await engine.drive(run_id)).status == "aborted"
        assert await store.incident_of_run(run_id) is None
    finally:
        await store.close()


def test_rollback_plan_asks_before_what_cannot_be_undone(tmp_path):
    from bot.parser import parse_runbook
    from bot.planner import build_plan
    from bot.rollback import build_rollback_plan, rollback_steps
    from storage import RunRecord

    runbook = parse_runbook(Path(REAL_RUNBOOK).read_text(encoding="utf-8"), str(REAL_RUNBOOK))
    plan, _ = build_plan(runbook)
    database = next(group for group in plan.rollback if group.phases == [1, 2])
    traffic = next(group for group in plan.rollback if group.phases == [6])
    # "修正後、Phase 6を再実行" is the incident's re-run button, not a step a rollback waits on.
    assert traffic.rerun_phase == 6
    assert [step.title for step in traffic.steps] == ["トラフィック 100% → Green (v1)", "Blue環境調査・修正"]
    assert plan.links[0].url == "https://app.datadoghq.com/dashboard/emergency"
    assert plan.links[0].emergency

    run = RunRecord(id="r", kind="run", parent_run_id=None, runbook=plan.runbook, runbook_path="/x.md",
                    environment="default", status="failed", plan=plan.model_dump(mode="json"), started_by="u",
                    created_at=0, started_at=0, finished_at=1, current_phase=2, failed_phase=2, failed_step="p2.1",
                    error="x", abort_requested_by=None, owner=None, heartbeat_at=None)
    steps = {step.id: step for step in rollback_steps(build_rollback_plan(run, [], "undo"))}
    assert [step_id for step_id in steps] == [step.id for step in database.steps]
    # kill -INT <pid> and npm run db:verify run without an approval. The migration rollback needs one.
    assert not steps["r1.1"].requires_approval
    assert steps["r1.2"].requires_approval
    assert not steps["r1.4"].requires_approval
    # A bare pg_restore names no backup, so without a mapped command a person restores it.
    assert not steps["r1.3"].automated
    assert steps["r1.3"].manual_reason == "manual.pg_restore_bare"


def test_emergency_item_that_is_a_link_is_refused():
    from bot.errors import UsageError
    from bot.parser import parse_runbook
    from bot.planner import build_plan
    from bot.rollback import build_emergency_plan
    from storage import RunRecord

    runbook = parse_runbook(Path(REAL_RUNBOOK).read_text(encoding="utf-8"), str(REAL_RUNBOOK))
    plan, _ = build_plan(runbook)
    run = RunRecord(id="r", kind="run", parent_run_id=None, runbook=plan.runbook, runbook_path="/x.md",
                    environment="default", status="failed", plan=plan.model_dump(mode="json"), started_by="u",
                    created_at=0, started_at=0, finished_at=1, current_phase=3, failed_phase=3, failed_step=None,
                    error=None, abort_requested_by=None, owner=None, heartbeat_at=None)
    with pytest.raises(UsageError) as refused:
        build_emergency_plan(run, 2, "emergency")
    assert "https://app.datadoghq.com/dashboard/emergency" in refused.value.render("en")
    with pytest.raises(UsageError) as unknown:
        build_emergency_plan(run, 9, "emergency")
    assert "1: トラフィック即座に v1 へ" in unknown.value.render("en")


async def test_settled_run_closes_leftover_incident(store_url):
    from bot.incidents import close_if_settled

    store = await Store.open(store_url)
    try:
        run_id = await store.create_run({}, [{"id": "s", "kind": "shell", "title": "s"}], runbook="r",
                                        runbook_path="/r.md", environment="e", started_by="u")
        incident, _ = await store.open_incident(run_id, reason="failed", phase=1, step_id="s", data={})
        await store.take_incident_action(incident.id, 1, "rollback", "U1")
        assert not await close_if_settled(store, await store.get_incident(incident.id))
        # As if the process died after the rollback marked the run, before it closed the incident.
        await store.update_run(run_id, status="rolled_back")
        assert await close_if_settled(store, await store.get_incident(incident.id))
        closed = await store.get_incident(incident.id)
        assert closed.resolution == "rolled_back"
        assert closed.closed_by == "U1"
    finally:
        await store.close()
