"""Planner tests: the plan of the real runbook and of the other shapes."""

from __future__ import annotations

import json

import pytest

from bot.config import Environment
from bot.parser import read_runbook
from bot.planner import build_plan, similarity
from conftest import REAL_RUNBOOK, REPO, run_cli


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    result = run_cli("plan", str(REAL_RUNBOOK), "--json", home=home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _steps(plan_json, phase_number):
    return next(phase for phase in plan_json["phases"] if phase["number"] == phase_number)["steps"]


def test_plan_phases_and_minutes(plan_json):
    phases = plan_json["phases"]
    assert [phase["title"] for phase in phases] == [
        "準備", "データベース", "デプロイ", "設定変更", "外部サービス", "トラフィック切り替え", "後処理"]
    assert [phase["planned_seconds"] // 60 for phase in phases] == [15, 15, 20, 10, 10, 10, 15]
    assert plan_json["total_planned_seconds"] == 95 * 60


def test_plan_backup_runs_before_migration(plan_json):
    commands = [step["commands"][0] for step in _steps(plan_json, 2) if step["commands"]]
    backup = commands.index("npm run backup:api-data")
    migration = commands.index("npm run migrate:data:v1-to-v2")
    assert backup == migration - 1


def test_plan_phase3_kubernetes_and_http(plan_json):
    steps = _steps(plan_json, 3)
    deploy = next(step for step in steps if step["commands"] == ["kubectl apply -f k8s/v2/deployment.yaml"])
    assert deploy["kind"] == "kubernetes"
    health = next(step for step in steps if step["kind"] == "http")
    assert health["url"] == "https://api.example.com/v2/health"
    assert health["expect_json"] == {"status": "ok", "version": "2.0.0"}
    assert health["timeout_seconds"] == 30


def test_plan_phase4_env_steps(plan_json):
    env_steps = [step for step in _steps(plan_json, 4) if step["kind"] == "env"]
    variables = {key: value for step in env_steps for key, value in step["variables"].items()}
    assert variables == {"API_VERSION": "v2", "API_V1_DEPRECATION_DATE": "2025-03-31", "FEATURE_V2_RATE_LIMIT": "1000"}
    assert {step["file"] for step in env_steps} == {".env.production"}


def test_plan_phase6_traffic_and_monitors(plan_json):
    steps = _steps(plan_json, 6)
    traffic = [step for step in steps if step["kind"] == "traffic"]
    assert [step["weight"] for step in traffic] == [10, 50, 100]
    assert all(step["requires_approval"] for step in traffic)
    monitors = [step for step in steps if step["kind"] == "monitor"]
    assert [step["duration_seconds"] for step in monitors] == [300, 300]
    assert monitors[0]["thresholds"]["p95_ms"] == 200


def test_plan_email_needs_approval(plan_json):
    email = next(step for step in _steps(plan_json, 7) if step["commands"] == ["npm run notify:v1-deprecation"])
    assert email["requires_approval"] is True


def test_plan_rollback_and_emergency(plan_json):
    assert [group["phases"] for group in plan_json["rollback"]] == [[1, 2], [3], [4, 5], [6]]
    emergency_commands = [command for step in plan_json["emergency"] for command in step["commands"]]
    assert "kubectl set image deployment/api api=api:v1" in emergency_commands


def test_plan_steps_follow_contract(plan_json):
    kinds = {"shell", "http", "sql", "env", "kubernetes", "nginx", "cdn", "datadog", "sentry", "traffic",
             "monitor", "approval", "manual"}
    required = {"id", "title", "kind", "automated", "requires_approval", "source_line", "task", "commands"}
    for phase in plan_json["phases"]:
        for step in phase["steps"]:
            assert required <= set(step), step
            assert step["kind"] in kinds


def test_plan_without_system_settings_is_manual(plan_json):
    # The environment of this plan has no kubernetes, nginx, cloudflare, datadog, sentry or traffic section.
    for phase in plan_json["phases"]:
        for step in phase["steps"]:
            if step["kind"] in ("kubernetes", "nginx", "cdn", "datadog", "sentry", "traffic", "monitor"):
                assert step["automated"] is False
                assert step["manual_reason"] == "manual.no_settings"


def test_plan_explains_loose_matches(plan_json):
    deploy = _steps(plan_json, 3)[0]
    assert deploy["match"]["task"] == "Blue-Green デプロイ"
    assert deploy["match"]["reason"] == "similar"
    migration = next(step for step in _steps(plan_json, 2) if step["commands"] == ["npm run migrate:data:v1-to-v2"])
    assert migration["match"]["reason"] == "contains"


def test_plan_rewrites_urls_for_environment():
    runbook = read_runbook(REAL_RUNBOOK)
    environment = Environment(name="local", url_rewrites={"https://api.example.com": "http://127.0.0.1:9"},
                              commands={"pg_restore": "echo restore"})
    plan, _ = build_plan(runbook, environment)
    health = next(step for step in plan.phases[2].steps if step.kind == "http")
    assert health.target_url == "http://127.0.0.1:9/v2/health"
    restore = plan.rollback[0].steps[2]
    assert restore.run_command == "echo restore"


def test_similarity_prefers_related_titles():
    assert similarity("Blue環境にv2デプロイ", "Blue-Green デプロイ") >= 0.5
    assert similarity("Blue環境準備", "Blue-Green デプロイ") < 0.5


@pytest.mark.parametrize("name", ["flat-config-change.md", "english-cache-rollout.md"])
def test_other_shapes_plan_without_errors(name, home):
    result = run_cli("plan", str(REPO / "examples" / name), "--json", home=home)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["phases"]
    assert plan["rollback"]
