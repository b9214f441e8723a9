"""Planning of steps that change external systems: Kubernetes, nginx, Cloudflare, Datadog and Sentry.

The planner decides a step's kind. This module fills the step's `params`
from the task's attributes, and the kind's executor reads them. When the
environment has no settings for the system, or no executor maps the
runbook line's form, the step becomes manual with that reason.
"""

from __future__ import annotations

import re
import unicodedata

from bot.config import Environment
from bot.durations import DurationError, parse_duration
from bot.model import Runbook, Task
from bot.plan import Step

SETTINGS_SECTIONS = {
    "kubernetes": "kubernetes",
    "nginx": "nginx",
    "cdn": "cloudflare",
    "datadog": "datadog",
    "sentry": "sentry",
    "traffic": "traffic",
    # Monitor steps read their metrics from Datadog.
    "monitor": "datadog",
}

# The metric names Datadog steps use when the runbook names none.
DEFAULT_METRICS = ("api.v2.requests.count", "api.v2.requests.duration", "api.v2.errors.count")

_ALERT = re.compile(r"(?P<what>[^<>]+?)\s*(?P<op>[<>]=?)\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>%|ms|req/sec)?")
_ALERT_METRICS = {
    "エラーレート": "error_rate", "error rate": "error_rate",
    "レスポンスタイム": "latency", "response time": "latency", "p95": "latency",
    "スループット": "throughput", "throughput": "throughput",
}
_GREEN_SCALE_DOWN = re.compile(r"(scale\s*down|スケールダウン)", re.I)
_GREEN = re.compile(r"(green|グリーン|v1)", re.I)
_SMOKE = re.compile(r"(smoke|スモーク)", re.I)
_ENDPOINT_CATEGORY = re.compile(r"(endpoint|エンドポイント)", re.I)


def configure(step: Step, task: Task | None, runbook: Runbook, environment: Environment, *,
              rollback: bool = False) -> Step:
    """Fill params for a system step, or make it manual with the reason; return the step."""
    if step.kind == "shell" and task is not None and re.search(r"sentry", task.title, re.I):
        # A command of the Sentry task, such as the source map upload, targets the release the sentry step creates.
        step.params = {**step.params, "env": {"SENTRY_RELEASE": release_version(runbook)}}
        return step
    section = SETTINGS_SECTIONS.get(step.kind)
    if section is None or not step.automated:
        return step
    if getattr(environment, section) is None:
        return _manual(step, "manual.no_settings", section=section)

    if step.kind == "kubernetes":
        return _kubernetes(step, environment)
    if step.kind == "monitor":
        # The environment may replace the runbook's thresholds, for example for a sandbox's small traffic.
        step.thresholds = {**step.thresholds, **environment.monitor.thresholds}
        if environment.monitor.time_scale != 1:
            # The plan shows the scale beside the runbook's window, so a 9 s window is not read as 5 minutes.
            step.params = {**step.params, "time_scale": environment.monitor.time_scale}
    if step.kind == "nginx":
        _nginx(step, task, rollback)
    elif step.kind == "cdn":
        _cdn(step, task, runbook, rollback)
    elif step.kind == "datadog":
        _datadog(step, task, runbook)
    elif step.kind == "sentry":
        _sentry(step, task, runbook)
    return step


def green_scale_down(text: str, environment: Environment) -> Step | None:
    """Return a kubernetes scale step for a line like "Green環境（v1）スケールダウン（削除はしない）"."""
    normalized = unicodedata.normalize("NFKC", text)
    if not (_GREEN_SCALE_DOWN.search(normalized) and _GREEN.search(normalized)):
        return None
    step = Step(id="", title=text, kind="kubernetes", source_line=0)
    settings = environment.kubernetes
    if settings is None:
        return _manual(step, "manual.no_settings", section="kubernetes")
    if not settings.green_deployment:
        return _manual(step, "manual.green_unknown")
    step.commands = [f"kubectl scale deployment/{settings.green_deployment} --replicas=0"]
    return _kubernetes(step, environment)


def smoke_test_tasks(text: str, runbook: Runbook) -> list[Task]:
    """Return the Verification section's endpoint tests for a line like "スモークテスト実行"."""
    if not _SMOKE.search(text):
        return []
    return [task for task in runbook.verification
            if task.category and _ENDPOINT_CATEGORY.search(task.category) and task.commands + [
                block.text for block in task.code_blocks]]


def _manual(step: Step, reason: str, **params: str) -> Step:
    step.automated = False
    step.manual_reason = reason
    step.manual_params = params
    return step


def _kubernetes(step: Step, environment: Environment) -> Step:
    from steps.kubernetes import parse_kubectl

    command = step.commands[0] if step.commands else ""
    if not command:
        return _manual(step, "manual.nothing_to_run")
    parsed = parse_kubectl(command)
    if parsed is None:
        if environment.kubernetes.allow_shell:
            step.kind = "shell"
            step.run_command = command
            return step
        return _manual(step, "manual.kubectl_unknown", command=command)
    step.params = parsed.to_params()
    return step


def _nginx(step: Step, task: Task | None, rollback: bool) -> None:
    command = " ".join(step.commands)
    params: dict = {}
    if rollback:
        # "git checkout nginx.conf.backup" puts the kept file back; a reload line only reloads.
        params["action"] = "reload" if re.search(r"\breload\b", command) and "checkout" not in command else "restore"
    else:
        params["action"] = "insert"
    if task is not None:
        params["file"] = step.file or next((code for code in task.commands if code.startswith("/")), None)
        blocks = [block.text for attribute in task.attributes for block in attribute.code_blocks
                  if block.language in ("nginx", "")] + [block.text for block in task.code_blocks
                                                         if block.language == "nginx"]
        if blocks:
            params["block"] = blocks[0]
    for part in re.split(r"\s*&&\s*", command):
        if re.search(r"\bnginx\s+-t\b", part):
            params["validate"] = part.strip()
        elif re.search(r"\breload\b", part):
            params["reload"] = part.strip()
    if params["action"] == "insert" and not params.get("block"):
        _manual(step, "manual.nginx_without_block")
        return
    step.params = params


def _cdn(step: Step, task: Task | None, runbook: Runbook, rollback: bool) -> None:
    if rollback:
        # "CDN設定を元に戻す" names no rule: it undoes the rule of the runbook's CDN task.
        cdn_task = next((candidate for candidate in runbook.tasks
                         if re.search(r"cdn|cloudflare", f"{candidate.title} {candidate.text}", re.I)), None)
        step.params = {"action": "delete", **_cdn_params(cdn_task)}
        if "pattern" not in step.params:
            _manual(step, "manual.cdn_without_pattern")
        return
    params = {"action": "create", **_cdn_params(task)}
    if "pattern" not in params:
        _manual(step, "manual.cdn_without_pattern")
        return
    step.params = params


def _cdn_params(task: Task | None) -> dict:
    params: dict = {}
    if task is not None:
        for attribute in task.attributes:
            patterns = [code for code in attribute.commands if code.startswith("/")]
            if patterns and "pattern" not in params:
                params["pattern"] = patterns[0]
            if attribute.key.casefold() == "ttl":
                try:
                    params["ttl_seconds"] = parse_duration(attribute.value.replace("`", ""))
                except DurationError:
                    pass
    return params


def _datadog(step: Step, task: Task | None, runbook: Runbook) -> None:
    metrics = _runbook_metrics(runbook)
    if task is None:
        step.params = {"action": "readings", "readings": [], "metrics": metrics}
        return
    readings = task.attribute("確認項目", "check items", "checks")
    dashboard = task.attribute("ダッシュボード", "dashboard")
    # A check (確認項目, or any Datadog line under Verification) reads metrics and changes nothing.
    if readings is not None or task.section == "verification" or dashboard is None:
        items = ([item.strip() for item in re.split(r"[、,，]", readings.value.replace("`", "")) if item.strip()]
                 if readings is not None else [])
        step.params = {"action": "readings", "readings": items, "metrics": metrics}
        return
    params: dict = {"action": "setup", "metrics": metrics}
    if dashboard is not None:
        params["dashboard"] = dashboard.value.replace("`", "").strip()
    alert = task.attribute("アラート設定", "alert", "アラート")
    if alert is not None:
        text = alert.value.replace("`", "").strip()
        params["alert"] = text
        match = _ALERT.match(unicodedata.normalize("NFKC", text))
        if match:
            what = match.group("what").strip().casefold()
            params["alert_metric"] = next((name for word, name in _ALERT_METRICS.items() if word in what), what)
            params["alert_operator"] = match.group("op")
            params["alert_threshold"] = float(match.group("value"))
    step.params = params


def _runbook_metrics(runbook: Runbook) -> list[str]:
    """Return the metric names the runbook lists under any task, or the defaults."""
    found: list[str] = []
    for task in runbook.tasks:
        for attribute in task.attributes:
            for item in attribute.items:
                name = item.strip().strip("`")
                if re.fullmatch(r"[a-z][\w]*(\.[\w]+)+", name) and name not in found:
                    found.append(name)
    return found or list(DEFAULT_METRICS)


def _sentry(step: Step, task: Task | None, runbook: Runbook) -> None:
    params: dict = {}
    if task is not None:
        environment = task.attribute("新規環境追加", "environment", "new environment", "環境")
        if environment is not None:
            params["environment"] = (environment.commands or [environment.value])[0].strip()
    params["release"] = release_version(runbook)
    if not params.get("environment"):
        _manual(step, "manual.sentry_without_environment")
        return
    step.params = params


def release_version(runbook: Runbook) -> str:
    """Return the Sentry release a runbook's run creates: the same on every run of that runbook.

    Sentry rejects versions with slashes or whitespace, so the PR number is
    used, or the branch with those characters replaced.
    """
    info = runbook.merge_info
    pr = re.sub(r"\D", "", info.pr or "") if info else ""
    if pr:
        suffix = f"pr-{pr}"
    else:
        suffix = re.sub(r"[\s/\\]+", "-", (info.branch if info and info.branch else "") or "unknown").strip("-")
    return f"{runbook.name}@{suffix}"
