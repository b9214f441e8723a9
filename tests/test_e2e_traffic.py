"""End to end: phase 6 of the real runbook on the sandbox, with v2 faults, an abort and a re-run.

The sandbox's load generator sends steady traffic through nginx, and its
readings feed the Datadog emulator that the monitor steps read. Windows run
at the sandbox's time scale, 0.03 of the runbook's 5 minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli
from test_e2e_sandbox import copy_runbook, events_of
from test_e2e_systems import sandbox_state

pytestmark = pytest.mark.slow


def traffic_share(home: Path) -> int | None:
    """Return blue's share in the sandbox nginx's upstream, read the way the traffic steps read it."""
    import asyncio

    from bot.sandbox import sandbox_environment
    from steps.traffic import current_weight

    return asyncio.run(current_weight(sandbox_environment(home)))


def last_run(home: Path, env: dict) -> dict:
    return json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"][0]


def run_runbook(home: Path, env: dict) -> tuple[subprocess.CompletedProcess, Path]:
    runbook = copy_runbook(home)
    return run_cli("run", str(runbook), "--env", "sandbox", "--yes", "--locale", "en", home=home, env=env), runbook


def test_v2_errors_reset_traffic_then_rerun(sandbox):
    home, env, _ = sandbox
    assert run_cli("sandbox", "switch", "v2-error-percent", "2", home=home, env=env).returncode == 0
    result, runbook = run_runbook(home, env)

    assert result.returncode == 1, result.stdout[-3000:]
    run = last_run(home, env)
    assert (run["status"], run["failed_step"]) == ("failed", "p6.2")
    # Traffic went back to green at once, and the time it took is reported with the readings.
    assert traffic_share(home) == 0
    assert run["traffic_weight"] == 0
    assert "All traffic was put back on green (v1) in" in result.stdout
    # The hint names the phase to run again, not a plain resume of the failed monitor step.
    assert f"postmerge resume {run['id']} --phase 6" in result.stdout
    assert "error rate" in run["error"]
    assert "## Status: failed" in runbook.read_text(encoding="utf-8")
    assert "error rate" in runbook.read_text(encoding="utf-8").split("## Notes", 1)[1]

    # After the fix, phase 6 runs again from 10%.
    assert run_cli("sandbox", "switch", "v2-error-percent", "off", home=home, env=env).returncode == 0
    resumed = run_cli("resume", run["id"], "--phase", "6", "--yes", "--locale", "en", home=home, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    weights = [event["data"]["weight"] for event in events_of(home, env, run["id"])
               if event["type"] == "traffic.changed"]
    assert weights == [10, 0, 10, 50, 100]
    assert traffic_share(home) == 100


def test_slow_v2_trips_p95(sandbox):
    home, env, _ = sandbox
    assert run_cli("sandbox", "switch", "v2-latency-ms", "400", home=home, env=env).returncode == 0
    result, _ = run_runbook(home, env)

    assert result.returncode == 1, result.stdout[-3000:]
    run = last_run(home, env)
    assert run["failed_step"] == "p6.2"
    assert "p95" in run["error"]
    assert traffic_share(home) == 0


def test_too_little_traffic_fails_window(sandbox):
    home, env, _ = sandbox
    loadgen = sandbox_state(home)["services"]["loadgen"]["port"]
    request = urllib.request.Request(f"http://127.0.0.1:{loadgen}/rate", method="POST",
                                     data=json.dumps({"rate": 1}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
    result, _ = run_runbook(home, env)

    assert result.returncode == 1, result.stdout[-3000:]
    run = last_run(home, env)
    assert run["failed_step"] == "p6.2"
    assert "too little traffic" in run["error"].lower()
    assert traffic_share(home) == 0


def test_abort_during_window_leaves_traffic_visible(sandbox):
    home, env, _ = sandbox
    runbook = copy_runbook(home)
    log = home / "run.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "bot.cli", "run", str(runbook), "--env", "sandbox",
                                    "--yes", "--locale", "en"], cwd=home, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "Watching blue (v2) in Datadog" not in log.read_text():
            time.sleep(0.2)
        assert "Watching blue (v2) in Datadog" in log.read_text()
        run_id = last_run(home, env)["id"]
        assert run_cli("abort", run_id, home=home, env=env).returncode == 0
        assert process.wait(60) == 2
    finally:
        if process.poll() is None:
            process.kill()

    run = last_run(home, env)
    assert run["status"] == "aborted"
    # The abort leaves traffic where it was, and status shows the share.
    assert traffic_share(home) == 10
    assert run["traffic_weight"] == 10
    status = run_cli("status", "--locale", "en", home=home, env=env).stdout
    assert "traffic: 10% to v2" in status
