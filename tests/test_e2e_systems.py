"""End to end: the real runbook changes Kubernetes, nginx, Cloudflare, Datadog and Sentry in the sandbox.

The sandbox runs a Kubernetes API emulator, a real nginx in front of the v1
and v2 services, and one emulator for the three SaaS APIs, all on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli
from test_e2e_sandbox import copy_runbook

pytestmark = pytest.mark.slow


def sandbox_state(home: Path) -> dict:
    return json.loads((home / "sandbox" / "state.json").read_text(encoding="utf-8"))


def saas_state(home: Path) -> dict:
    port = sandbox_state(home)["services"]["saas"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_emulator/state", timeout=10) as response:
        return json.load(response)


def deployments(home: Path) -> dict[str, dict]:
    """Return the sandbox cluster's Deployments by name, read with the real client."""
    from kubernetes_asyncio import client, config

    async def read():
        api_client = await config.new_client_from_config(config_file=str(home / "sandbox" / "kubeconfig"),
                                                         context="postmerge-sandbox")
        async with api_client:
            items = (await client.AppsV1Api(api_client).list_namespaced_deployment("default")).items
            return {item.metadata.name: item for item in items}

    return asyncio.run(read())


def get(url: str) -> tuple[int, dict, dict]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), json.load(response)


def credential_values(home: Path) -> list[str]:
    credentials = json.loads((home / "sandbox" / "saas-credentials.json").read_text(encoding="utf-8"))
    values = [value for system in credentials.values() for key, value in system.items()
              if key in ("token", "api_key", "app_key")]
    values.append((home / "sandbox" / "kube-token").read_text(encoding="utf-8").strip())
    return values


def run_runbook(home: Path, env: dict) -> str:
    runbook = copy_runbook(home)
    result = run_cli("run", str(runbook), "--env", "sandbox", "--yes", home=home, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    return result.stdout + result.stderr


def test_plan_automates_phases_3_to_5_and_7(sandbox):
    home, env, _ = sandbox
    result = run_cli("plan", str(copy_runbook(home)), "--env", "sandbox", "--json", home=home, env=env)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for phase in plan["phases"]:
        if phase["number"] in (3, 4, 5, 7):
            manual = [(step["id"], step["title"], step.get("manual_reason")) for step in phase["steps"]
                      if not step["automated"] and step["kind"] != "approval"]
            assert manual == [], manual


def test_real_runbook_changes_every_system(sandbox):
    home, env, _ = sandbox
    output = run_runbook(home, env)

    cluster = deployments(home)
    blue = cluster["api-v2"]
    assert blue.status.ready_replicas == blue.spec.replicas == 3
    # Green (v1) is scaled down, not deleted.
    assert cluster["api"].spec.replicas == 0

    state = sandbox_state(home)
    site = home / "sandbox" / "nginx" / "sites-available" / "api.conf"
    assert site.read_text(encoding="utf-8").count("location /api/v2") == 1
    nginx_test = subprocess.run([*_nginx_binary(), "-p", f"{home}/sandbox/nginx/", "-c",
                                 f"{home}/sandbox/nginx/nginx.conf", "-t"], capture_output=True, text=True)
    assert nginx_test.returncode == 0, nginx_test.stderr
    nginx_url = state["nginx"]["url"]
    status, headers, body = get(f"{nginx_url}/api/v2/users")
    assert (status, headers["X-Served-By"]) == (200, "v2")
    assert get(f"{nginx_url}/api/v1/users")[1]["X-Served-By"] == "v1"

    for value in credential_values(home):
        assert value not in output

    # A second run finds every object it made and creates none again.
    run_runbook(home, env)
    saas = saas_state(home)
    # Rulesets are stored by zone, then by ruleset id.
    rules = [rule for zone in saas["cloudflare"]["rulesets"].values() for ruleset in zone.values()
             for rule in ruleset.get("rules", [])]
    assert len(rules) == 1, saas["cloudflare"]
    assert rules[0]["action_parameters"]["edge_ttl"]["default"] == 300
    assert [dashboard["title"] for dashboard in _values(saas["datadog"]["dashboards"])] == ["API v2 Performance"]
    assert len(saas["datadog"]["monitors"]) == 1
    assert [release["version"] for release in _values(saas["sentry"]["releases"])] == ["api-v2-migration@pr-456"]
    deploys = [deploy for group in _values(saas["sentry"]["deploys"])
               for deploy in (group if isinstance(group, list) else [group])]
    assert [deploy["environment"] for deploy in deploys] == ["production-v2"]
    assert site.read_text(encoding="utf-8").count("location /api/v2") == 1
    assert set(deployments(home)) == {"api", "api-v2"}


def _values(collection) -> list:
    """Return the stored objects of an emulator collection, kept as a list or as a dict by id."""
    return list(collection.values()) if isinstance(collection, dict) else list(collection)


def _nginx_binary() -> list[str]:
    from bot.sandbox.nginx import find_nginx

    return [find_nginx() or "nginx"]


def inject_fault(home: Path, path: str, status: int, times: int) -> None:
    port = sandbox_state(home)["services"]["saas"]["port"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/_emulator/faults", method="POST",
                                     data=json.dumps({"path": path, "status": status, "times": times}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_cloudflare_outage_fails_run_then_resume_completes(sandbox):
    home, env, _ = sandbox
    inject_fault(home, "/cloudflare/", 503, times=1)
    runbook = copy_runbook(home)
    failed = run_cli("run", str(runbook), "--env", "sandbox", "--yes", "--locale", "en", home=home, env=env)
    assert failed.returncode == 1, failed.stdout[-3000:]
    # The error names the system and what to do next; the run stops at the CDN step.
    assert "p4.5" in failed.stdout
    assert "Cloudflare" in failed.stdout
    assert "HTTP 503" in failed.stdout or "503" in failed.stdout
    status = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"][0]
    assert status["status"] == "failed"

    resumed = run_cli("resume", status["id"], "--yes", "--locale", "en", home=home, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    status = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"][0]
    assert status["status"] == "completed"
    assert "## Status: completed" in runbook.read_text(encoding="utf-8")


def test_phase_5_failure_rolls_back_nginx_and_cdn(sandbox):
    home, env, _ = sandbox
    # Datadog keeps failing, so phase 5 fails after phase 4 changed nginx, the CDN and .env.production.
    inject_fault(home, "/datadog/", 500, times=50)
    runbook = copy_runbook(home)
    failed = run_cli("run", str(runbook), "--env", "sandbox", "--yes", home=home, env=env)
    assert failed.returncode == 1, failed.stdout[-3000:]
    site = home / "sandbox" / "nginx" / "sites-available" / "api.conf"
    assert "location /api/v2" in site.read_text(encoding="utf-8")
    run_id = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["runs"][0]["id"]

    rolled_back = run_cli("rollback", run_id, "--yes", home=home, env=env)
    assert rolled_back.returncode == 0, rolled_back.stdout[-3000:] + rolled_back.stderr
    assert "location /api/v2" not in site.read_text(encoding="utf-8")
    nginx_url = sandbox_state(home)["nginx"]["url"]
    assert get(f"{nginx_url}/api/v2/users")[1]["X-Served-By"] == "v1"
    saas = saas_state(home)
    rules = [rule for zone in saas["cloudflare"]["rulesets"].values() for ruleset in zone.values()
             for rule in ruleset.get("rules", [])]
    assert rules == []
    dotenv = (home / "sandbox" / "work" / ".env.production").read_text(encoding="utf-8")
    assert "API_VERSION=v2" not in dotenv
    assert "## Status: rolled-back" in runbook.read_text(encoding="utf-8")
