"""End to end: the real runbook on the sandbox, through the `postmerge` command line."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from conftest import REAL_RUNBOOK, create_database, drop_database, run_cli

pytestmark = pytest.mark.slow


def copy_runbook(home: Path) -> Path:
    path = home / "api-v2-migration.md"
    shutil.copyfile(REAL_RUNBOOK, path)
    return path


def versions(database_url: str) -> dict[str, int]:
    async def query():
        connection = await asyncpg.connect(database_url)
        try:
            rows = await connection.fetch("SELECT version, count(*) AS n, count(DISTINCT id) AS ids "
                                          "FROM api_endpoints GROUP BY version")
            return {row["version"]: (row["n"], row["ids"]) for row in rows}
        finally:
            await connection.close()

    return asyncio.run(query())


def events_of(home: Path, env: dict, run_id: str, db: str | None = None) -> list[dict]:
    from storage import Store

    async def read():
        from bot.config import Settings

        url = Settings(home=home).store_url(db)
        store = await Store.open(url)
        try:
            return await store.events(run_id)
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_real_runbook_completes(sandbox, backend):
    home, env, database_url = sandbox
    runbook = copy_runbook(home)
    args = ["run", str(runbook), "--env", "sandbox", "--yes"]
    store_name = None
    if backend == "postgresql":
        store_name, store_url = create_database("postmerge_e2e_store")
        args = ["--db", store_url, *args]
    try:
        result = run_cli(*args, home=home, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        assert versions(database_url) == {"v2": (80000, 80000)}

        status = json.loads(run_cli(*(["--db", store_url] if store_name else []), "status", "--json",
                                    home=home, env=env).stdout)
        run_id = status["runs"][0]["id"]
        assert status["runs"][0]["status"] == "completed"
        events = events_of(home, env, run_id, store_url if store_name else None)
        finished = {event["step_id"]: event["id"] for event in events if event["type"] == "step.succeeded"}
        assert "p2.2" in finished, [(event["type"], event["step_id"]) for event in events][:30]
        started = {event["step_id"]: event["id"] for event in events if event["type"] == "step.started"}
        # The backup finished before the conversion started.
        assert finished["p2.2"] < started["p2.3"]
        assert (home / "runs" / run_id / "api-data.dump").stat().st_size > 0

        text = runbook.read_text(encoding="utf-8")
        assert "## Status: completed" in text
        assert "- [x] データ移行: `npm run migrate:data:v1-to-v2`" in text
        assert "- [x] データ件数確認" in text
        assert "- Merged: (未マージ)" not in text
        assert "- Completed: (未完了)" not in text
        assert "Phase 2完了" in text
        assert "全タスク完了" in text
        # Every byte before the write-back's own lines is kept.
        original = REAL_RUNBOOK.read_text(encoding="utf-8")
        assert text.count("\n") > original.count("\n")
        assert text.replace("- [x]", "- [ ]").startswith(original.split("## Status")[0])
    finally:
        if store_name:
            drop_database(store_name)


def test_sigkill_during_migration_then_resume(sandbox):
    home, env, database_url = sandbox
    runbook = copy_runbook(home)
    slow_env = {**env, "POSTMERGE_SANDBOX_BATCH_DELAY": "0.2"}
    log = home / "run.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "bot.cli", "run", str(runbook), "--env", "sandbox", "--yes"],
                                   cwd=home, env=slow_env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "migrated 20000/" not in log.read_text():
            time.sleep(0.1)
        assert "migrated 20000/" in log.read_text()
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()

    status = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"][0]
    assert status["status"] == "running"
    assert status["current_step"] == "p2.3"

    # --yes never repeats a step that may have had effects: the run pauses for a person.
    paused = run_cli("resume", status["id"], "--yes", home=home, env=env)
    assert paused.returncode == 2, paused.stdout + paused.stderr
    assert "--on-interrupted" in paused.stdout

    resumed = run_cli("resume", status["id"], "--yes", "--on-interrupted", "retry", home=home, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    assert versions(database_url) == {"v2": (80000, 80000)}
    assert "## Status: completed" in runbook.read_text(encoding="utf-8")


def test_integrity_failure_then_rollback(sandbox):
    home, env, database_url = sandbox
    runbook = copy_runbook(home)
    assert run_cli("sandbox", "switch", "integrity-failure", "on", home=home, env=env).returncode == 0

    failed = run_cli("run", str(runbook), "--env", "sandbox", "--yes", home=home, env=env)
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "integrity check failed" in failed.stdout
    assert "## Status: failed" in runbook.read_text(encoding="utf-8")
    assert versions(database_url) == {"v2": (80000, 80000)}
    run_id = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"][0]["id"]

    rolled = run_cli("rollback", run_id, "--yes", home=home, env=env)
    assert rolled.returncode == 0, rolled.stdout[-3000:] + rolled.stderr
    assert versions(database_url) == {"v1": (80000, 80000)}
    text = runbook.read_text(encoding="utf-8")
    assert "## Status: rolled-back" in text
    assert "ロールバック完了" in text
    runs = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"]
    assert {run["id"]: run["status"] for run in runs}[run_id] == "rolled_back"
