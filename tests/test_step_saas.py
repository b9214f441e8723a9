"""The cdn, datadog and sentry executors with their real clients against the SaaS emulator on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import CloudflareSettings, DatadogSettings, Environment, SentrySettings
from bot.errors import StepError
from bot.plan import Step
from bot.sandbox.saas import SaasEmulator
from steps.base import OutputBuffer, StepContext, StepResult
from steps.cdn import CdnExecutor, cache_expression, rule_ref
from steps.datadog import DatadogExecutor
from steps.sentry import SentryExecutor, validate_version

METRICS = ["api.v2.requests.count", "api.v2.requests.duration", "api.v2.errors.count"]
CDN_PARAMS = {"pattern": "/api/v2/*", "ttl_seconds": 300}
SETUP_PARAMS = {
    "action": "setup",
    "dashboard": "API v2 Performance",
    "metrics": METRICS,
    "alert": "エラーレート > 5%",
    "alert_metric": "error_rate",
    "alert_threshold": 5.0,
}
READINGS_PARAMS = {
    "action": "readings",
    "readings": ["レスポンスタイム", "エラーレート", "スループット"],
    "metrics": METRICS,
    "url": "https://app.datadoghq.com/dashboard/abc-123",
}
SENTRY_PARAMS = {"environment": "production-v2", "release": "api-v2-migration@pr-456"}


@pytest.fixture
async def saas() -> AsyncIterator[SaasEmulator]:
    async with SaasEmulator() as emulator:
        yield emulator


def environment_for(saas: SaasEmulator, **overrides: Any) -> Environment:
    """Return an environment whose three SaaS sections point at the emulator."""
    credentials = saas.credentials
    variables = {
        "CLOUDFLARE_API_TOKEN": credentials["cloudflare"]["token"],
        "DD_API_KEY": credentials["datadog"]["api_key"],
        "DD_APP_KEY": credentials["datadog"]["app_key"],
        "SENTRY_AUTH_TOKEN": credentials["sentry"]["token"],
    }
    variables.update(overrides.pop("variables", {}))
    return Environment(
        name="test",
        variables=variables,
        http_timeout_seconds=overrides.pop("http_timeout_seconds", 5),
        cloudflare=CloudflareSettings(api_url=saas.cloudflare_url,
                                      zone_id=overrides.pop("zone_id", credentials["cloudflare"]["zone_id"])),
        datadog=DatadogSettings(api_url=saas.datadog_url),
        sentry=SentrySettings(api_url=saas.sentry_url,
                              organization=overrides.pop("organization", credentials["sentry"]["organization"]),
                              project=credentials["sentry"]["project"]),
    )


class Runner:
    """Runs one executor's step like the engine does and keeps every line, error and data it produced."""

    def __init__(self, executor: Any, kind: str, params: dict[str, Any], environment: Environment) -> None:
        self.executor = executor
        self.step = Step(id=f"{kind}-1", title=kind, kind=kind, source_line=1, params=params)
        self.environment = environment
        self.lines: list[str] = []
        self.errors: list[StepError] = []
        self.results: list[StepResult] = []
        # The data stored with the step, as the engine passes it to a repeat or a rollback.
        self.stored: dict[str, Any] = {}

    def context(self, locale: str = "en", timeout: float = 5.0) -> StepContext:
        async def checkpoint(data: dict[str, Any]) -> None:
            self.stored = json.loads(json.dumps(data))

        return StepContext(
            run_id="run-1",
            step=self.step,
            environment=self.environment,
            artifacts_dir=Path("/nonexistent"),
            output=OutputBuffer(100_000, self.lines.append),
            timeout_seconds=timeout,
            locale=locale,
            previous_data=dict(self.stored),
            checkpoint=checkpoint,
        )

    async def execute(self, **kwargs: Any) -> StepResult:
        try:
            result = await self.executor.execute(self.context(**kwargs))
        except StepError as error:
            self.errors.append(error)
            raise
        self.results.append(result)
        # The result must be storable as JSON, as the engine stores it.
        self.stored = json.loads(json.dumps(result.data))
        return result

    async def rollback(self, **kwargs: Any) -> StepResult:
        try:
            result = await self.executor.rollback(self.context(**kwargs))
        except StepError as error:
            self.errors.append(error)
            raise
        self.results.append(result)
        return result

    def texts(self) -> list[str]:
        """Return every line, rendered error (ja and en) and stored data, for the credential check."""
        texts = list(self.lines)
        for error in self.errors:
            texts += [error.render("en"), error.render("ja"), json.dumps(error.params, default=str)]
        for result in self.results:
            texts += [result.summary, json.dumps(result.data, default=str)]
        return texts


def secrets_of(saas: SaasEmulator) -> list[str]:
    credentials = saas.credentials
    return [credentials["cloudflare"]["token"], credentials["datadog"]["api_key"],
            credentials["datadog"]["app_key"], credentials["sentry"]["token"]]


def assert_no_secret(runner: Runner, saas: SaasEmulator, extra: tuple[str, ...] = ()) -> None:
    for text in runner.texts():
        for secret in (*secrets_of(saas), *extra):
            assert secret not in text


# --- cdn ----------------------------------------------------------------------


def test_cdn_expression_and_ref() -> None:
    assert cache_expression("/api/v2/*") == 'starts_with(http.request.uri.path, "/api/v2/")'
    assert cache_expression("/api/*/users") == 'http.request.uri.path wildcard "/api/*/users"'
    assert cache_expression("/api/v2") == 'http.request.uri.path eq "/api/v2"'
    assert rule_ref("/api/v2/*") == "postmerge-api-v2-cache"
    assert rule_ref("/api/v2") != rule_ref("/api/v2/*")


async def test_cdn_adds_rule(saas: SaasEmulator) -> None:
    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment_for(saas))
    result = await runner.execute()

    rules = saas.cloudflare.rules()
    assert len(rules) == 1
    assert rules[0]["ref"] == "postmerge-api-v2-cache"
    assert rules[0]["action"] == "set_cache_settings"
    assert rules[0]["action_parameters"] == {"cache": True, "edge_ttl": {"mode": "override_origin", "default": 300}}
    assert rules[0]["expression"] == 'starts_with(http.request.uri.path, "/api/v2/")'
    assert result.data["created"] is True
    assert result.data["rule_id"] == rules[0]["id"]
    assert any("Added cache rule postmerge-api-v2-cache" in line for line in runner.lines)
    assert_no_secret(runner, saas)


async def test_cdn_repeat_keeps_one_rule(saas: SaasEmulator) -> None:
    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment_for(saas))
    await runner.execute()
    second = await runner.execute()

    assert len(saas.cloudflare.rules()) == 1
    assert second.data["created"] is True
    assert "already set" in runner.lines[-1]

    await runner.rollback()
    assert saas.cloudflare.rules() == []


async def test_cdn_keeps_other_rules(saas: SaasEmulator) -> None:
    other = Runner(CdnExecutor(), "cdn", {"pattern": "/static/*", "ttl_seconds": 86400}, environment_for(saas))
    await other.execute()
    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment_for(saas))
    await runner.execute()
    assert len(saas.cloudflare.rules()) == 2

    await runner.rollback()
    assert [rule["ref"] for rule in saas.cloudflare.rules()] == ["postmerge-static-cache"]


async def test_cdn_update_and_restore(saas: SaasEmulator) -> None:
    first = Runner(CdnExecutor(), "cdn", {**CDN_PARAMS, "ttl_seconds": 60}, environment_for(saas))
    await first.execute()

    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment_for(saas))
    result = await runner.execute()
    assert result.data["created"] is False
    assert result.data["previous_rule"]["action_parameters"]["edge_ttl"]["default"] == 60
    assert saas.cloudflare.rules()[0]["action_parameters"]["edge_ttl"]["default"] == 300

    await runner.rollback()
    rules = saas.cloudflare.rules()
    assert len(rules) == 1
    assert rules[0]["action_parameters"]["edge_ttl"]["default"] == 60


async def test_cdn_delete_action(saas: SaasEmulator) -> None:
    create = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment_for(saas))
    await create.execute()
    delete = Runner(CdnExecutor(), "cdn", {**CDN_PARAMS, "action": "delete"}, environment_for(saas))
    await delete.execute()
    assert saas.cloudflare.rules() == []

    again = Runner(CdnExecutor(), "cdn", {**CDN_PARAMS, "action": "delete"}, environment_for(saas))
    await again.execute()
    assert "nothing to delete" in again.lines[-1]

    await delete.rollback()
    assert [rule["ref"] for rule in saas.cloudflare.rules()] == ["postmerge-api-v2-cache"]


async def test_cdn_invalid_pattern(saas: SaasEmulator) -> None:
    runner = Runner(CdnExecutor(), "cdn", {"pattern": 'api v2"', "ttl_seconds": 300}, environment_for(saas))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "cdn.invalid_pattern"
    assert saas.requests == []


CDN_FAILURES = [
    # (fault path, method, status, expected key)
    ("/cloudflare/", "GET", 401, "cdn.unauthorized"),
    ("/cloudflare/", "GET", 403, "cdn.forbidden"),
    ("/cloudflare/", "GET", 404, "cdn.not_found"),
    ("/cloudflare/", "PUT", 409, "cdn.conflict"),
    ("/cloudflare/", "PUT", 500, "cdn.server_error"),
    ("/cloudflare/", "POST", 503, "cdn.server_error"),
]


@pytest.mark.parametrize(("path", "method", "status", "key"), CDN_FAILURES)
async def test_cdn_failure_then_retry(saas: SaasEmulator, path: str, method: str, status: int, key: str) -> None:
    if method == "POST":
        # A ruleset must exist for the rule to be added with POST.
        other = Runner(CdnExecutor(), "cdn", {"pattern": "/static/*"}, environment_for(saas))
        await other.execute()
    saas.inject(path, status, method=method)
    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment_for(saas))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == key
    message = caught.value.render("en")
    assert "postmerge-api-v2-cache" in message
    assert "run the step again" in message.lower()

    await runner.execute()
    assert [rule["ref"] for rule in saas.cloudflare.rules()].count("postmerge-api-v2-cache") == 1
    assert_no_secret(runner, saas)


async def test_cdn_wrong_token(saas: SaasEmulator) -> None:
    environment = environment_for(saas, variables={"CLOUDFLARE_API_TOKEN": "wrong-token-value"})
    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment)
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "cdn.unauthorized"
    assert "CLOUDFLARE_API_TOKEN" in caught.value.render("en")
    assert_no_secret(runner, saas, extra=("wrong-token-value",))


async def test_cdn_timeout_then_retry(saas: SaasEmulator) -> None:
    saas.inject("/cloudflare/", delay_seconds=1.0)
    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment_for(saas, http_timeout_seconds=0.2))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "cdn.timed_out"
    assert "postmerge-api-v2-cache" in caught.value.render("en")

    await runner.execute()
    assert len(saas.cloudflare.rules()) == 1


async def test_cdn_refused_then_retry(saas: SaasEmulator) -> None:
    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment_for(saas))
    await saas.stop()
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "cdn.connection_failed"
    assert "api_url" in caught.value.render("en")

    await saas.start()
    await runner.execute()
    assert len(saas.cloudflare.rules()) == 1


async def test_cdn_missing_token(saas: SaasEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUDFLARE_API_TOKEN", raising=False)
    environment = environment_for(saas, variables={"CLOUDFLARE_API_TOKEN": ""})
    runner = Runner(CdnExecutor(), "cdn", CDN_PARAMS, environment)
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "cdn.missing_token"


# --- datadog --------------------------------------------------------------------


def dashboards_titled(saas: SaasEmulator, title: str) -> list[dict[str, Any]]:
    return [dashboard for dashboard in saas.datadog.dashboards.values() if dashboard["title"] == title]


async def test_datadog_setup(saas: SaasEmulator) -> None:
    runner = Runner(DatadogExecutor(), "datadog", SETUP_PARAMS, environment_for(saas))
    result = await runner.execute()

    dashboards = dashboards_titled(saas, "API v2 Performance")
    assert len(dashboards) == 1
    queries = [widget["definition"]["requests"][0]["q"] for widget in dashboards[0]["widgets"]]
    assert queries == ["sum:api.v2.requests.count{*}.as_count()", "avg:api.v2.requests.duration{*}",
                       "sum:api.v2.errors.count{*}.as_count()"]
    monitors = list(saas.datadog.monitors.values())
    assert len(monitors) == 1
    assert monitors[0]["type"] == "query alert"
    assert monitors[0]["query"] == ("sum(last_5m):sum:api.v2.errors.count{*}.as_count() / "
                                    "sum:api.v2.requests.count{*}.as_count() * 100 > 5")
    assert monitors[0]["options"]["thresholds"]["critical"] == 5.0
    assert result.data["dashboard"]["created"] is True
    assert result.data["monitor"]["id"] == monitors[0]["id"]
    assert_no_secret(runner, saas)


async def test_datadog_repeat_and_rollback(saas: SaasEmulator) -> None:
    runner = Runner(DatadogExecutor(), "datadog", SETUP_PARAMS, environment_for(saas))
    await runner.execute()
    await runner.execute()
    # A repeat without the stored data, as after a lost store, also finds both by name.
    runner.stored = {}
    await runner.execute()
    assert len(saas.datadog.dashboards) == 1
    assert len(saas.datadog.monitors) == 1

    runner.stored = runner.results[0].data
    result = await runner.rollback()
    assert result.data == {"dashboard": "deleted", "monitor": "deleted"}
    assert saas.datadog.dashboards == {}
    assert saas.datadog.monitors == {}


async def test_datadog_updates_and_restores(saas: SaasEmulator) -> None:
    other = {**SETUP_PARAMS, "metrics": ["api.v2.requests.count", "api.v2.errors.count"], "alert_threshold": 10.0,
             "monitor_name": "API v2 Performance: error rate > 5%"}
    earlier = Runner(DatadogExecutor(), "datadog", other, environment_for(saas))
    await earlier.execute()

    runner = Runner(DatadogExecutor(), "datadog", SETUP_PARAMS, environment_for(saas))
    result = await runner.execute()
    assert result.data["dashboard"]["created"] is False
    assert result.data["monitor"]["created"] is False
    dashboard = dashboards_titled(saas, "API v2 Performance")[0]
    assert len(dashboard["widgets"]) == 3
    monitor = next(iter(saas.datadog.monitors.values()))
    assert monitor["query"].endswith("> 5")

    await runner.rollback()
    dashboard = dashboards_titled(saas, "API v2 Performance")[0]
    assert len(dashboard["widgets"]) == 2
    monitor = next(iter(saas.datadog.monitors.values()))
    assert monitor["query"].endswith("> 10")
    assert monitor["options"]["thresholds"]["critical"] == 10.0


async def test_datadog_readings(saas: SaasEmulator) -> None:
    now = int(time.time())
    for second in range(1, 101):
        saas.datadog.record("api.v2.requests.count", 3, now - second)
        saas.datadog.record("api.v2.requests.duration", 100 + second, now - second)
    saas.datadog.record("api.v2.errors.count", 6, now - 5)

    runner = Runner(DatadogExecutor(), "datadog", READINGS_PARAMS, environment_for(saas))
    result = await runner.execute()
    readings = result.data["readings"]
    assert readings["requests"] == 300
    assert readings["error_rate_percent"] == 2.0
    assert readings["throughput_rps"] == 1.0
    assert 140 < readings["response_time_avg_ms"] < 160
    assert readings["response_time_p95_ms"] >= 195
    assert result.data["has_data"] is True
    assert runner.lines[0] == "Dashboard: https://app.datadoghq.com/dashboard/abc-123"
    assert runner.lines[2].startswith("エラーレート: 2.0%")


async def test_datadog_readings_no_data(saas: SaasEmulator) -> None:
    runner = Runner(DatadogExecutor(), "datadog", READINGS_PARAMS, environment_for(saas))
    result = await runner.execute(locale="ja")
    assert result.data["has_data"] is False
    assert result.data["readings"]["error_rate_percent"] is None
    assert all("データがありません" in line for line in runner.lines[1:])
    assert "確認できませんでした" in result.summary


DATADOG_FAILURES = [
    ("/datadog/api/v1/dashboard", "GET", 401, "datadog.unauthorized"),
    ("/datadog/api/v1/dashboard", "POST", 403, "datadog.forbidden"),
    ("/datadog/api/v1/monitor", "GET", 404, "datadog.not_found"),
    ("/datadog/api/v1/monitor", "POST", 409, "datadog.conflict"),
    ("/datadog/api/v1/monitor", "POST", 500, "datadog.server_error"),
]


@pytest.mark.parametrize(("path", "method", "status", "key"), DATADOG_FAILURES)
async def test_datadog_failure_then_retry(saas: SaasEmulator, path: str, method: str, status: int, key: str) -> None:
    saas.inject(path, status, method=method)
    runner = Runner(DatadogExecutor(), "datadog", SETUP_PARAMS, environment_for(saas))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == key
    message = caught.value.render("en")
    assert "API v2 Performance" in message
    assert "run the step again" in message.lower()

    result = await runner.execute()
    assert len(saas.datadog.dashboards) == 1
    assert len(saas.datadog.monitors) == 1
    # A failure after the dashboard was created still lets rollback delete it.
    assert result.data["dashboard"]["created"] is True
    assert_no_secret(runner, saas)


async def test_datadog_wrong_key(saas: SaasEmulator) -> None:
    environment = environment_for(saas, variables={"DD_APP_KEY": "wrong-application-key"})
    runner = Runner(DatadogExecutor(), "datadog", SETUP_PARAMS, environment)
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "datadog.forbidden"
    assert "DD_API_KEY, DD_APP_KEY" in caught.value.render("en")
    assert_no_secret(runner, saas, extra=("wrong-application-key",))


async def test_datadog_timeout_then_retry(saas: SaasEmulator) -> None:
    saas.inject("/datadog/", delay_seconds=1.5)
    runner = Runner(DatadogExecutor(), "datadog", SETUP_PARAMS, environment_for(saas, http_timeout_seconds=0.3))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "datadog.timed_out"
    assert 'dashboard "API v2 Performance"' in caught.value.render("en")

    await runner.execute()
    assert len(saas.datadog.dashboards) == 1


async def test_datadog_refused_then_retry(saas: SaasEmulator) -> None:
    runner = Runner(DatadogExecutor(), "datadog", SETUP_PARAMS, environment_for(saas))
    await saas.stop()
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "datadog.connection_failed"

    await saas.start()
    await runner.execute()
    assert len(saas.datadog.monitors) == 1


# --- sentry ---------------------------------------------------------------------


def test_sentry_version_rules() -> None:
    assert validate_version("api-v2-migration@pr-456") is None
    assert validate_version("feature/api-v2") is not None
    assert validate_version("api v2") is not None
    assert validate_version("latest") is not None
    assert validate_version("Latest") is not None
    assert validate_version("x" * 201) is not None


async def test_sentry_release_and_deploy(saas: SaasEmulator) -> None:
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas))
    result = await runner.execute()

    assert list(saas.sentry.releases) == ["api-v2-migration@pr-456"]
    deploys = saas.sentry.deploys["api-v2-migration@pr-456"]
    assert [deploy["environment"] for deploy in deploys] == ["production-v2"]
    assert saas.sentry.environments == ["production-v2"]
    assert result.data["created_release"] is True
    assert result.data["deploy_id"] == deploys[0]["id"]
    assert_no_secret(runner, saas)


async def test_sentry_repeat_and_rollback(saas: SaasEmulator) -> None:
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas))
    await runner.execute()
    await runner.execute()
    assert len(saas.sentry.releases) == 1
    assert len(saas.sentry.deploys["api-v2-migration@pr-456"]) == 1

    result = await runner.rollback()
    assert result.data["rollback"] == "deleted"
    assert saas.sentry.releases == {}


async def test_sentry_keeps_existing_release(saas: SaasEmulator) -> None:
    first = Runner(SentryExecutor(), "sentry", {**SENTRY_PARAMS, "environment": "staging"}, environment_for(saas))
    await first.execute()

    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas))
    result = await runner.execute()
    assert result.data["created_release"] is False
    assert len(saas.sentry.deploys["api-v2-migration@pr-456"]) == 2

    await runner.rollback()
    assert "api-v2-migration@pr-456" in saas.sentry.releases


async def test_sentry_release_in_use(saas: SaasEmulator) -> None:
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas))
    await runner.execute()
    saas.sentry.mark_in_use("api-v2-migration@pr-456")
    with pytest.raises(StepError) as caught:
        await runner.rollback()
    assert caught.value.key == "sentry.release_in_use"
    assert "referenced by active issues" in caught.value.render("en")


async def test_sentry_invalid_release(saas: SaasEmulator) -> None:
    runner = Runner(SentryExecutor(), "sentry", {**SENTRY_PARAMS, "release": "feature/api-v2-migration"},
                    environment_for(saas))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "sentry.invalid_release"
    assert "feature/api-v2-migration" in caught.value.render("en")
    assert saas.requests == []


SENTRY_FAILURES = [
    ("/sentry/", "GET", 401, "sentry.unauthorized"),
    ("/sentry/", "POST", 403, "sentry.forbidden"),
    # A 404 on the release itself means "not created yet", so the deploy list is made to fail.
    ("/sentry/api/0/organizations/example-org/releases/api-v2-migration@pr-456/deploys/", "GET", 404,
     "sentry.not_found"),
    ("/sentry/", "POST", 409, "sentry.conflict"),
    ("/sentry/", "POST", 502, "sentry.server_error"),
]


@pytest.mark.parametrize(("path", "method", "status", "key"), SENTRY_FAILURES)
async def test_sentry_failure_then_retry(saas: SaasEmulator, path: str, method: str, status: int, key: str) -> None:
    saas.inject(path, status, method=method)
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == key
    message = caught.value.render("en")
    assert "api-v2-migration@pr-456" in message
    assert "run the step again" in message.lower()

    await runner.execute()
    assert len(saas.sentry.releases) == 1
    assert len(saas.sentry.deploys["api-v2-migration@pr-456"]) == 1
    assert_no_secret(runner, saas)


async def test_sentry_deploy_failure_then_retry(saas: SaasEmulator) -> None:
    saas.inject("/sentry/api/0/organizations/example-org/releases/api-v2-migration@pr-456/deploys/", 500,
                method="POST")
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas))
    with pytest.raises(StepError):
        await runner.execute()
    assert runner.stored["created_release"] is True

    result = await runner.execute()
    assert result.data["created_release"] is True
    assert len(saas.sentry.deploys["api-v2-migration@pr-456"]) == 1


async def test_sentry_wrong_organization(saas: SaasEmulator) -> None:
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas, organization="other-org"))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "sentry.not_found"
    assert "other-org" in caught.value.render("en")


async def test_sentry_wrong_token(saas: SaasEmulator) -> None:
    environment = environment_for(saas, variables={"SENTRY_AUTH_TOKEN": "sntrys_wrong_token"})
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment)
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "sentry.unauthorized"
    assert_no_secret(runner, saas, extra=("sntrys_wrong_token",))


async def test_sentry_timeout_then_retry(saas: SaasEmulator) -> None:
    saas.inject("/sentry/", delay_seconds=1.0)
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas, http_timeout_seconds=0.2))
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "sentry.timed_out"

    await runner.execute()
    assert len(saas.sentry.releases) == 1


async def test_sentry_refused_then_retry(saas: SaasEmulator) -> None:
    runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas))
    await saas.stop()
    with pytest.raises(StepError) as caught:
        await runner.execute()
    assert caught.value.key == "sentry.connection_failed"

    await saas.start()
    await runner.execute()
    assert len(saas.sentry.deploys["api-v2-migration@pr-456"]) == 1


# --- emulator -------------------------------------------------------------------


async def test_emulator_state_file(tmp_path: Path) -> None:
    state = tmp_path / "saas-state.json"
    async with SaasEmulator(state_file=state) as saas:
        credentials = saas.credentials
        runner = Runner(SentryExecutor(), "sentry", SENTRY_PARAMS, environment_for(saas))
        await runner.execute()
    assert "api-v2-migration@pr-456" in json.loads(state.read_text())["sentry"]["releases"]

    async with SaasEmulator(state_file=state, credentials=credentials) as saas:
        assert list(saas.sentry.releases) == ["api-v2-migration@pr-456"]
