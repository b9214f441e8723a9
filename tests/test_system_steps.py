"""Planning of Kubernetes, nginx, CDN, Datadog and Sentry steps from the real runbook."""

from __future__ import annotations

from bot.config import (
    CloudflareSettings,
    DatadogSettings,
    Environment,
    KubernetesSettings,
    NginxSettings,
    SentrySettings,
)
from bot.parser import parse_runbook, read_runbook
from bot.planner import build_plan
from conftest import REAL_RUNBOOK


def full_environment(**kubernetes) -> Environment:
    return Environment(
        name="local",
        kubernetes=KubernetesSettings(**{"green_deployment": "api", **kubernetes}),
        nginx=NginxSettings(),
        cloudflare=CloudflareSettings(zone_id="zone"),
        datadog=DatadogSettings(),
        sentry=SentrySettings(organization="org", project="api"),
    )


def steps_by_title(plan) -> dict:
    found = {}
    for phase in plan.phases:
        for step in phase.steps:
            found[step.title] = step
    for group in plan.rollback:
        for step in group.steps:
            found[f"rollback: {step.title}"] = step
    for step in plan.emergency:
        found[f"emergency: {step.title}"] = step
    return found


def test_real_runbook_system_params():
    plan, _ = build_plan(read_runbook(REAL_RUNBOOK), full_environment())
    steps = steps_by_title(plan)

    assert steps["Blue-Green デプロイ"].params == {"action": "apply", "paths": ["k8s/v2/deployment.yaml"]}
    assert steps["Blue-Green デプロイ: 検証"].params == {"action": "wait_pods", "selector": "version=v2"}
    assert steps["Green環境（v1）スケールダウン（削除はしない）"].params == {
        "action": "scale", "resource": "deployment", "name": "api", "replicas": 0}
    nginx = steps["Nginx設定更新"].params
    assert nginx["action"] == "insert"
    assert nginx["file"] == "/etc/nginx/sites-available/api.conf"
    assert nginx["block"].startswith("location /api/v2 {")
    assert (nginx["validate"], nginx["reload"]) == ("sudo nginx -t", "sudo systemctl reload nginx")
    assert steps["CDN設定更新"].params == {"action": "create", "pattern": "/api/v2/*", "ttl_seconds": 300}
    datadog = steps["Datadog メトリクス設定"].params
    assert datadog["dashboard"] == "API v2 Performance"
    assert datadog["metrics"] == ["api.v2.requests.count", "api.v2.requests.duration", "api.v2.errors.count"]
    assert (datadog["alert_metric"], datadog["alert_operator"], datadog["alert_threshold"]) == ("error_rate", ">", 5.0)
    assert steps["メトリクス監視"].params["action"] == "readings"
    assert steps["Sentry プロジェクト設定"].params == {"environment": "production-v2",
                                                   "release": "api-v2-migration@pr-456"}


def test_rollback_and_emergency_lines_undo():
    steps = steps_by_title(build_plan(read_runbook(REAL_RUNBOOK), full_environment())[0])

    assert steps["rollback: Blue環境削除"].params == {"action": "delete", "paths": ["k8s/v2/"]}
    assert steps["rollback: ログ収集"].params == {"action": "logs", "selector": "version=v2"}
    assert steps["rollback: Nginx設定ロールバック"].params == {"action": "restore"}
    assert steps["rollback: 再起動"].params["action"] == "reload"
    # "CDN設定を元に戻す" names no rule, so it takes the pattern of the runbook's CDN task.
    assert steps["rollback: CDN設定を元に戻す"].params["action"] == "delete"
    assert steps["rollback: CDN設定を元に戻す"].params["pattern"] == "/api/v2/*"
    assert steps["emergency: トラフィック即座に v1 へ"].params == {
        "action": "set_image", "resource": "deployment", "name": "api", "images": {"api": "api:v1"}}


def test_smoke_test_line_runs_endpoint_checks():
    steps = steps_by_title(build_plan(read_runbook(REAL_RUNBOOK), full_environment())[0])
    smoke = steps["スモークテスト実行: v2エンドポイントテスト"]
    assert smoke.kind == "http"
    assert smoke.method == "POST"
    assert smoke.match.reason == "smoke"


def test_missing_settings_make_steps_manual():
    plan, _ = build_plan(read_runbook(REAL_RUNBOOK), Environment(name="bare"))
    steps = steps_by_title(plan)
    deploy = steps["Blue-Green デプロイ"]
    assert (deploy.automated, deploy.manual_reason) == (False, "manual.no_settings")
    assert deploy.reason_params() == {"kind": "kubernetes", "section": "kubernetes"}
    assert steps["CDN設定更新"].reason_params()["section"] == "cloudflare"


def test_green_scale_down_needs_deployment_name():
    environment = full_environment()
    environment.kubernetes.green_deployment = None
    step = steps_by_title(build_plan(read_runbook(REAL_RUNBOOK), environment)[0])[
        "Green環境（v1）スケールダウン（削除はしない）"]
    assert (step.kind, step.automated, step.manual_reason) == ("kubernetes", False, "manual.green_unknown")


UNKNOWN_KUBECTL = """# Post-Merge Tasks: restart

## Tasks

### Deployment
- [ ] 再起動: `kubectl rollout restart deployment/api`

## Execution Notes

### Execution Order

**Phase 1: 再起動（5分）**
1. 再起動
"""


def test_unknown_kubectl_form_manual_or_shell():
    runbook = parse_runbook(UNKNOWN_KUBECTL, "restart.md")
    manual = build_plan(runbook, full_environment())[0].phases[0].steps[0]
    assert (manual.kind, manual.automated, manual.manual_reason) == ("kubernetes", False, "manual.kubectl_unknown")
    assert manual.reason_params()["command"] == "kubectl rollout restart deployment/api"

    shell = build_plan(runbook, full_environment(allow_shell=True))[0].phases[0].steps[0]
    assert (shell.kind, shell.automated, shell.run_command) == ("shell", True, "kubectl rollout restart deployment/api")


def test_monitor_shows_time_scale_and_protected_rejects_it():
    import pytest
    from pydantic import ValidationError

    from bot.config import MonitorSettings

    environment = full_environment()
    environment.monitor = MonitorSettings(time_scale=0.03, thresholds={"throughput_rps": 50})
    monitor = next(step for step in build_plan(read_runbook(REAL_RUNBOOK), environment)[0].phases[5].steps
                   if step.kind == "monitor")
    assert monitor.duration_seconds == 300
    assert monitor.params["time_scale"] == 0.03
    assert monitor.thresholds["throughput_rps"] == 50
    assert monitor.thresholds["p95_ms"] == 200

    with pytest.raises(ValidationError, match="time_scale must be 1 in a protected environment"):
        Environment(name="production", protected=True, monitor={"time_scale": 0.5})


def test_sentry_shell_step_gets_release():
    steps = steps_by_title(build_plan(read_runbook(REAL_RUNBOOK), full_environment())[0])
    upload = steps["Sentry プロジェクト設定: Source maps アップロード"]
    assert upload.kind == "shell"
    assert upload.params["env"] == {"SENTRY_RELEASE": "api-v2-migration@pr-456"}
