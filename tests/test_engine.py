"""Engine tests on small runbooks, against SQLite and PostgreSQL stores."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from bot.config import Environment
from bot.errors import RunConflict, UsageError
from bot.engine import Engine
from bot.gates import GateAnswer
from bot.parser import parse_runbook
from bot.planner import build_plan
from conftest import cli_env, run_cli
from storage import Store


def runbook_text(tasks: str, order: str, rollback: str = "") -> str:
    return f"""# Post-Merge Tasks: sample

## Status: pending

## Merge Info
- Branch: feature/sample
- Merged: (未マージ)
- Completed: (未完了)

## Tasks

### Custom
{tasks}

## Execution Notes

### Execution Order

{order}

### Rollback Plan

{rollback or "**Phase 1 失敗（x）:**" + chr(10) + "1. 戻す: `echo undo`"}

## Notes
"""


def process_running(pid: int) -> bool:
    """Return whether pid runs; a killed child not yet reaped (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] != "Z"


class Yes:
    def __init__(self) -> None:
        self.requests = []

    async def answer(self, request):
        self.requests.append(request)
        decision = {"approval": "approved", "manual": "done", "interrupted": "retry"}[request.kind]
        return GateAnswer(decision, "tester")


async def start_run(store_url: str, text: str, workdir: Path, **environment_options):
    environment = Environment(name="local", workdir=workdir, **environment_options)
    runbook = parse_runbook(text, str(workdir / "runbook.md"))
    assert runbook.errors == []
    plan, _ = build_plan(runbook, environment)
    store = await Store.open(store_url)
    interaction = Yes()
    engine = Engine(store, environment, interaction, home=workdir / "home", locale="en", actor="tester")
    run_id = await engine.start(plan, started_by="tester")
    return store, engine, run_id, interaction


async def test_run_completes_with_events(store_url, tmp_path):
    text = runbook_text("- [ ] one: `echo one`\n- [ ] two: `echo two > two.txt`",
                        "**Phase 1: a（1分）**\n1. one\n2. two")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path)
    try:
        outcome = await engine.drive(run_id)
        assert outcome.status == "completed"
        assert outcome.exit_code == 0
        steps = await store.steps(run_id)
        assert [step.status for step in steps] == ["succeeded", "succeeded"]
        assert steps[0].output.strip() == "one"
        assert (tmp_path / "two.txt").read_text().strip() == "two"
        types = [event["type"] for event in await store.events(run_id)]
        assert types[0] == "run.created"
        assert types.count("step.started") == 2
        assert types.count("step.succeeded") == 2
        assert types[-1] == "run.completed"
        assert await store.lock_holder("sample", "local") is None
    finally:
        await store.close()


async def test_failed_step_fails_run(store_url, tmp_path):
    text = runbook_text("- [ ] bad: `echo broken; exit 3`\n- [ ] later: `touch later`",
                        "**Phase 1: a（1分）**\n1. bad\n2. later")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path)
    try:
        outcome = await engine.drive(run_id)
        assert outcome.status == "failed"
        assert outcome.exit_code == 1
        assert "exit code 3" in outcome.error
        run = await store.get_run(run_id)
        assert run.failed_phase == 1
        assert run.failed_step == "p1.1"
        assert not (tmp_path / "later").exists()
    finally:
        await store.close()


async def test_step_timeout_stops_process_group(store_url, tmp_path):
    # The step ignores SIGINT, so only the SIGKILL after the grace period ends it.
    pid_file = tmp_path / "child.pid"
    text = runbook_text(f"- [ ] stubborn: `trap '' INT; sleep 60 & echo $! > {pid_file}; wait`\n  - タイムアウト: 1秒",
                        "**Phase 1: a（1分）**\n1. stubborn")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path, kill_grace_seconds=0.5)
    try:
        started = time.monotonic()
        outcome = await engine.drive(run_id)
        elapsed = time.monotonic() - started
        assert outcome.status == "failed"
        assert "timeout of 1 s" in outcome.error
        assert elapsed < 10
        steps = await store.steps(run_id)
        assert steps[0].status == "timed_out"
        child = int(pid_file.read_text())
        await asyncio.sleep(0.2)
        assert not process_running(child)
    finally:
        await store.close()


async def test_abort_stops_running_step(store_url, tmp_path):
    text = runbook_text("- [ ] long: `sleep 60`\n- [ ] after: `touch after`", "**Phase 1: a（1分）**\n1. long\n2. after")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path, kill_grace_seconds=1)
    try:
        driving = asyncio.create_task(engine.drive(run_id))
        await asyncio.sleep(1.0)
        assert await store.request_abort(run_id, "operator")
        outcome = await asyncio.wait_for(driving, 15)
        assert outcome.status == "aborted"
        assert outcome.exit_code == 2
        assert "operator" in outcome.error
        assert not (tmp_path / "after").exists()
        steps = await store.steps(run_id)
        assert steps[0].status == "failed"
    finally:
        await store.close()


async def test_one_active_run_per_runbook(store_url, tmp_path):
    text = runbook_text("- [ ] one: `echo one`", "**Phase 1: a（1分）**\n1. one")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path)
    try:
        runbook = parse_runbook(text, str(tmp_path / "runbook.md"))
        plan, _ = build_plan(runbook, engine.environment)
        with pytest.raises(RunConflict) as raised:
            await engine.start(plan, started_by="someone else")
        assert raised.value.params["run_id"] == run_id
        await engine.drive(run_id)
        second = await engine.start(plan, started_by="someone else")
        assert second != run_id
    finally:
        await store.close()


async def test_decision_recorded_once(store_url, tmp_path):
    text = runbook_text("- [ ] one: `echo one`", "**Phase 1: a（1分）**\n1. one")
    store, _, run_id, _ = await start_run(store_url, text, tmp_path)
    try:
        approval = await store.request_decision(run_id, "p1.1", 1, "approval")
        results = await asyncio.gather(*(store.decide(approval, "approved", f"user{index}") for index in range(5)))
        winners = [row for won, row in results if won]
        assert len(winners) == 1
        assert {row["decided_by"] for _, row in results} == {winners[0]["decided_by"]}
        decided = [event for event in await store.events(run_id) if event["type"] == "approval.decided"]
        assert len(decided) == 1
    finally:
        await store.close()


async def test_output_keeps_head_and_tail(store_url, tmp_path):
    text = runbook_text("- [ ] noisy: `seq 1 20000`", "**Phase 1: a（1分）**\n1. noisy")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path, output_limit_bytes=2000)
    try:
        await engine.drive(run_id)
        output = (await store.steps(run_id))[0].output
        assert output.startswith("1\n2\n")
        assert output.endswith("20000")
        assert "lines omitted" in output
        assert len(output) < 2200
    finally:
        await store.close()


async def test_env_rollback_restores_value(store_url, tmp_path):
    (tmp_path / ".env").write_text("# keep\nMODE=old\n")
    text = runbook_text("- [ ] `MODE`: `new`\n  - 場所: .env\n- [ ] bad: `exit 1`",
                        "**Phase 1: a（1分）**\n1. MODE\n2. bad")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path)
    try:
        outcome = await engine.drive(run_id)
        assert outcome.status == "failed"
        assert "MODE=new" in (tmp_path / ".env").read_text()

        from bot.rollback import build_rollback_plan

        run = await store.get_run(run_id)
        plan = build_rollback_plan(run, await store.steps(run_id), "Undo")
        steps = [step for group in plan.rollback for step in group.steps]
        assert steps[0].undoes == "p1.1"
        rollback_id = await engine.start(plan, started_by="tester", kind="rollback", parent_run_id=run_id, steps=steps)
        rolled = await engine.drive(rollback_id)
        assert rolled.status == "completed"
        assert (tmp_path / ".env").read_text() == "# keep\nMODE=old\n"
        assert (await store.get_run(run_id)).status == "rolled_back"
    finally:
        await store.close()


# -- through the command line ----------------------------------------------------------


def write_config(home: Path, protected: bool = False) -> Path:
    workdir = home / "work"
    workdir.mkdir(exist_ok=True)
    config = home / "postmerge.toml"
    config.write_text(f'[environments.local]\nworkdir = "{workdir}"\nprotected = {str(protected).lower()}\n')
    return config


def test_cli_yes_refused_for_protected(home):
    config = write_config(home, protected=True)
    runbook = home / "runbook.md"
    runbook.write_text(runbook_text("- [ ] one: `echo one`", "**Phase 1: a（1分）**\n1. one"))
    result = run_cli("--config", str(config), "run", str(runbook), "--env", "local", "--yes", home=home)
    assert result.returncode == 2
    assert "protected" in result.stderr


def test_cli_prompts_for_approval(home):
    config = write_config(home)
    runbook = home / "runbook.md"
    runbook.write_text(runbook_text("- [ ] notice send: `echo sent > sent.txt`\n  - 送信前確認: テスト送信",
                                    "**Phase 1: a（1分）**\n1. notice send"))
    result = run_cli("--config", str(config), "run", str(runbook), "--env", "local", input="x\ny\n", home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Approval needed" in result.stdout
    assert "'x' is not a choice" in result.stdout
    assert (home / "work" / "sent.txt").exists()
    assert "- [x] notice send" in runbook.read_text()


def test_cli_abort_answer_aborts_run(home):
    config = write_config(home)
    runbook = home / "runbook.md"
    runbook.write_text(runbook_text("- [ ] notice send: `echo sent > sent.txt`\n  - 送信前確認: テスト送信",
                                    "**Phase 1: a（1分）**\n1. notice send"))
    result = run_cli("--config", str(config), "run", str(runbook), "--env", "local", input="a\n", home=home)
    assert result.returncode == 2
    assert not (home / "work" / "sent.txt").exists()
    assert "## Status: failed" in runbook.read_text()


def test_cli_closed_stdin_pauses_run(home):
    config = write_config(home)
    runbook = home / "runbook.md"
    runbook.write_text(runbook_text("- [ ] check: 手で確認する", "**Phase 1: a（1分）**\n1. check"))
    result = run_cli("--config", str(config), "run", str(runbook), "--env", "local", home=home)
    assert result.returncode == 2
    assert "paused" in result.stdout
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["runs"][0]["status"] == "paused"
    resumed = run_cli("--config", str(config), "resume", status["runs"][0]["id"], "--yes", home=home)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr


def test_cli_dry_run_runs_nothing(home):
    config = write_config(home)
    runbook = home / "runbook.md"
    original = runbook_text("- [ ] one: `touch one`", "**Phase 1: a（1分）**\n1. one")
    runbook.write_text(original)
    result = run_cli("--config", str(config), "run", str(runbook), "--env", "local", "--dry-run", home=home)
    assert result.returncode == 0, result.stderr
    assert "dry run" in result.stdout
    assert "touch one" in result.stdout
    assert not (home / "work" / "one").exists()
    assert runbook.read_text() == original
    assert not (home / "postmerge.db").exists()


def test_cli_status_and_abort_of_orphaned_run(home):
    config = write_config(home)
    runbook = home / "runbook.md"
    pid_file = home / "sleep.pid"
    runbook.write_text(runbook_text(f"- [ ] long: `echo $$ > {pid_file}; exec sleep 60`",
                                    "**Phase 1: a（1分）**\n1. long"))
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(config), "run", str(runbook),
                                "--env", "local"], cwd=home, env=cli_env(home), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        run = None
        while time.monotonic() < deadline:
            result = run_cli("status", "--json", home=home)
            runs = json.loads(result.stdout)["runs"] if result.returncode == 0 else []
            if runs and runs[0]["current_step_status"] == "running":
                run = runs[0]
                break
            time.sleep(0.2)
        if run is None:
            process.kill()
            pytest.fail(f"the step never ran; last status: {result.stdout} {result.stderr}\n"
                        f"run output:\n{process.communicate()[0]}")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        aborted = run_cli("abort", run["id"], home=home)
        assert aborted.returncode == 0, aborted.stdout + aborted.stderr
        assert "still has a running process" in aborted.stdout
        status = json.loads(run_cli("status", "--json", home=home).stdout)["runs"][0]
        assert status["status"] == "aborted"
        assert not process_running(int(pid_file.read_text()))
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize(("url", "code", "expected"), [
    ("foo://bar", 2, "is not supported"),
    ("postgresql://postgres:secret@127.0.0.1:1/none", 1, "cannot connect to database"),
])
def test_cli_bad_database_url(home, url, code, expected):
    result = run_cli("status", "--db", url, home=home)
    assert result.returncode == code
    assert expected in result.stderr
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unknown_run_id(home):
    result = run_cli("resume", "deadbeef", home=home)
    assert result.returncode == 2
    assert "run deadbeef not found" in result.stderr


def test_cli_abort_while_prompt_waits(home):
    import subprocess
    import sys

    config = write_config(home)
    runbook = home / "runbook.md"
    runbook.write_text(runbook_text("- [ ] check: 手で確認する", "**Phase 1: a（1分）**\n1. check"))
    # Standard input stays open and silent, as a terminal whose user walked away.
    process = subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(config), "run", str(runbook),
                                "--env", "local"], cwd=home, env=cli_env(home), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        run_id = None
        while time.monotonic() < deadline and run_id is None:
            result = run_cli("status", "--json", home=home)
            runs = json.loads(result.stdout)["runs"] if result.returncode == 0 else []
            if runs and runs[0]["status"] == "waiting":
                run_id = runs[0]["id"]
            time.sleep(0.2)
        if run_id is None:
            process.kill()
            pytest.fail(f"the run never waited at its prompt; output:\n{process.communicate()[0]}")
        assert run_cli("abort", run_id, home=home).returncode == 0
        output, _ = process.communicate(timeout=15)
        assert process.returncode == 2
        assert "aborted by" in output
    finally:
        if process.poll() is None:
            process.kill()


def test_store_concurrent_first_open(store_url):
    import subprocess
    import sys

    # Several processes that open a new store at once must not all create the schema.
    code = "import asyncio, sys\nfrom storage import Store\n" \
           "async def main():\n    store = await Store.open(sys.argv[1])\n    await store.close()\n" \
           "asyncio.run(main())\n"
    processes = [subprocess.Popen([sys.executable, "-c", code, store_url], stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
    for process in processes:
        _, error = process.communicate(timeout=60)
        assert process.returncode == 0, error


def test_cli_ignores_keys_typed_before_prompt(home):
    import pty
    import subprocess
    import sys

    config = write_config(home)
    runbook = home / "runbook.md"
    runbook.write_text(runbook_text("- [ ] wait: `sleep 2`\n- [ ] check: 手で確認する",
                                    "**Phase 1: a（1分）**\n1. wait\n2. check"))
    # The run reads a terminal, as it does for a person.
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(config), "run", str(runbook),
                                "--env", "local"], cwd=home, env=cli_env(home), stdin=follower,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    os.close(follower)
    try:
        time.sleep(1.0)
        os.write(leader, b"d\n")  # typed while `sleep 2` still runs
        deadline = time.monotonic() + 30
        waiting = False
        while time.monotonic() < deadline and not waiting:
            runs = json.loads(run_cli("status", "--json", home=home).stdout)["runs"]
            waiting = bool(runs) and runs[0]["status"] == "waiting"
            time.sleep(0.3)
        assert waiting
        time.sleep(1.0)
        runs = json.loads(run_cli("status", "--json", home=home).stdout)["runs"]
        assert runs[0]["status"] == "waiting"
        os.write(leader, b"d\n")
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()


async def test_reopen_phase_runs_phase_again_from_start(store_url, tmp_path):
    text = runbook_text("- [ ] one: `echo one`\n- [ ] first: `echo first >> first.log`\n- [ ] check: `test -f fixed`",
                        "**Phase 1: a（1分）**\n1. one\n\n**Phase 2: b（1分）**\n1. first\n2. check")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path)
    try:
        assert (await engine.drive(run_id)).status == "failed"
        (tmp_path / "fixed").touch()

        await engine.reopen_phase(run_id, 2)
        assert (await engine.drive(run_id)).status == "completed"
        # The phase started again at its first step; phase 1 did not run again.
        assert (tmp_path / "first.log").read_text().splitlines() == ["first", "first"]
        steps = {record.step_id: record for record in await store.steps(run_id)}
        assert steps["p1.1"].attempt == 1
        assert steps["p2.1"].attempt == 2
        with pytest.raises(UsageError):
            await engine.reopen_phase(run_id, 2)
    finally:
        await store.close()


async def test_reopen_unknown_phase_names_phases(store_url, tmp_path):
    text = runbook_text("- [ ] check: `false`", "**Phase 1: a（1分）**\n1. check")
    store, engine, run_id, _ = await start_run(store_url, text, tmp_path)
    try:
        await engine.drive(run_id)
        with pytest.raises(UsageError) as raised:
            await engine.reopen_phase(run_id, 6)
        assert "phases are 1" in raised.value.render("en")
    finally:
        await store.close()
