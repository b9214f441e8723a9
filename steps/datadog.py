"""The datadog step: set up a dashboard and an error-rate monitor, or read current metric values.

Calls go through the official datadog-api-client (Datadog API v1: dashboards,
monitors and the metrics query endpoint) in its async mode, whose
AsyncApiClient sends requests with aiosonic.

Step params, filled by the planner:

  action "setup", from "Datadog メトリクス設定":
    dashboard        str        Dashboard title, "API v2 Performance" (from the ダッシュボード line).
    metrics          list[str]  Metric names, one timeseries widget each (from the メトリクス追加 list):
                                "api.v2.requests.count", "api.v2.requests.duration", "api.v2.errors.count".
    alert            str        The alert line as written, "エラーレート > 5%" (shown in the monitor message).
    alert_metric     str        What the alert measures; only "error_rate" is supported.
    alert_threshold  float      Threshold in percent, 5.0.
    monitor_name     str        Optional; default "<dashboard>: error rate > <threshold>%".
    errors_metric,
    requests_metric  str        Optional; default the metric of `metrics` with "errors" in its name,
                                and the one with "requests" and "count".

  action "readings", from "メトリクス監視: Datadog ダッシュボード確認":
    readings         list[str]  What to report, ["レスポンスタイム", "エラーレート", "スループット"]
                                (from the 確認項目 line). Response time, error rate and throughput
                                are recognized in Japanese or English; other items are listed as
                                not measured.
    metrics          list[str]  The same three metric names (the planner copies them from the setup task).
    url              str        Optional dashboard URL from the runbook, shown in the output.
    window_seconds   int        Optional, default 300: how far back the query reads.
    duration_unit    str        Optional, "ms" (default) or "s": the unit of the duration metric.

Both forms are idempotent: setup finds the dashboard by title and the monitor
by name and updates them, and readings only reads. StepResult.data of setup
contains the ids, whether each object was created, and the previous
definition of an updated one, which rollback uses to delete or restore it.
The API and application keys never appear in output, errors or data.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult

DEFAULT_WINDOW_SECONDS = 300
MANAGED_TAG = "managed-by:postmerge"
# Dashboard and monitor fields the step writes and restores on rollback.
DASHBOARD_FIELDS = ("title", "description", "layout_type", "widgets", "template_variables",
                    "notify_list", "reflow_type")
MONITOR_FIELDS = ("name", "type", "query", "message", "tags", "options", "priority")
READING_KINDS = {
    "response_time": ("レスポンス", "response", "latency", "レイテンシ"),
    "error_rate": ("エラー", "error"),
    "throughput": ("スループット", "throughput", "rps", "req/s"),
}


class DatadogExecutor(BaseExecutor):
    kind = "datadog"

    def repeat_safe(self, step: Step) -> bool:
        return True

    def has_inverse(self, step: Step) -> bool:
        return step.params.get("action", "setup") == "setup"

    async def execute(self, context: StepContext) -> StepResult:
        action = context.step.params.get("action", "setup")
        if action == "setup":
            return await self._setup(context)
        if action == "readings":
            return await self._readings(context)
        raise StepError("datadog.invalid_action", step=context.step.id, action=str(action))

    async def rollback(self, context: StepContext) -> StepResult:
        data = context.previous_data
        if data.get("action") != "setup" or "dashboard" not in data:
            raise StepError("datadog.rollback_without_data", step=context.step.id)
        async with _Session(context) as session:
            dashboard = await _rollback_dashboard(session, data["dashboard"])
            monitor = await _rollback_monitor(session, data.get("monitor") or {})
        summary = translate("datadog.rollback_summary", context.locale, dashboard=dashboard, monitor=monitor)
        return StepResult(ok=True, summary=summary, data={"dashboard": dashboard, "monitor": monitor})

    async def _setup(self, context: StepContext) -> StepResult:
        plan = _setup_params(context.step)
        earlier = context.previous_data if context.previous_data.get("action") == "setup" else {}
        data: dict[str, Any] = {
            "action": "setup",
            "dashboard": _earlier_record(earlier.get("dashboard"), "title", plan["dashboard"]),
            "monitor": _earlier_record(earlier.get("monitor"), "name", plan["monitor_name"]),
        }
        async with _Session(context) as session:
            await _setup_dashboard(session, plan, data)
            await _setup_monitor(session, plan, data)
        summary = translate("datadog.summary", context.locale, dashboard=plan["dashboard"],
                            widgets=len(plan["metrics"]), monitor=plan["monitor_name"])
        return StepResult(ok=True, summary=summary, data=data)

    async def _readings(self, context: StepContext) -> StepResult:
        params = _readings_params(context.step)
        locale = context.locale
        if params["url"]:
            context.output.write(translate("datadog.output_dashboard_url", locale, url=params["url"]))
        window = params["window_seconds"]
        end = int(time.time())
        start = end - window

        async with _Session(context) as session:
            requests = await _query_total(session, f"sum:{params['requests_metric']}{{*}}.as_count()", start, end)
            errors = await _query_total(session, f"sum:{params['errors_metric']}{{*}}.as_count()", start, end)
            average = await _query_values(session, f"avg:{params['duration_metric']}{{*}}", start, end)
            p95 = await _query_values(session, f"p95:{params['duration_metric']}{{*}}", start, end)

        scale = 1000.0 if params["duration_unit"] == "s" else 1.0
        readings: dict[str, Any] = {
            "window_seconds": window,
            "requests": requests,
            "errors": errors,
            "response_time_avg_ms": round(sum(average) / len(average) * scale, 1) if average else None,
            # The highest p95 of the query's intervals: an upper bound of the window's p95.
            "response_time_p95_ms": round(max(p95) * scale, 1) if p95 else None,
            "error_rate_percent": None,
            "throughput_rps": None,
        }
        if requests:
            readings["error_rate_percent"] = round((errors or 0.0) / requests * 100, 3)
            readings["throughput_rps"] = round(requests / window, 3)

        has_data = False
        for item in params["readings"]:
            line, measured = _reading_line(item, readings, locale)
            has_data = has_data or measured
            context.output.write(line)

        key = "datadog.readings_summary" if has_data else "datadog.readings_summary_no_data"
        summary = translate(key, locale, seconds=window, count=len(params["readings"]))
        return StepResult(ok=True, summary=summary, data={"action": "readings", "readings": readings,
                                                          "has_data": has_data})


# --- Parameters -----------------------------------------------------------------


def _setup_params(step: Step) -> dict[str, Any]:
    params = step.params
    title = params.get("dashboard")
    if not isinstance(title, str) or not title.strip():
        raise StepError("datadog.missing_dashboard", step=step.id)
    metrics = _metric_list(step)
    if params.get("alert_metric", "error_rate") != "error_rate":
        raise StepError("datadog.unsupported_alert", step=step.id, alert=str(params.get("alert")))
    threshold = params.get("alert_threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 100:
        raise StepError("datadog.invalid_threshold", step=step.id, alert=str(params.get("alert")),
                        threshold=str(threshold))
    errors_metric = params.get("errors_metric") or _pick_metric(metrics, ("errors",))
    requests_metric = params.get("requests_metric") or _pick_metric(metrics, ("requests", "count"))
    if not errors_metric or not requests_metric:
        raise StepError("datadog.alert_metrics_unknown", step=step.id, metrics=", ".join(metrics))
    threshold_text = f"{float(threshold):g}"
    return {
        "dashboard": title.strip(),
        "metrics": metrics,
        "alert": str(params.get("alert") or f"error rate > {threshold_text}%"),
        "threshold": float(threshold),
        "threshold_text": threshold_text,
        "errors_metric": errors_metric,
        "requests_metric": requests_metric,
        "monitor_name": params.get("monitor_name") or f"{title.strip()}: error rate > {threshold_text}%",
    }


def _readings_params(step: Step) -> dict[str, Any]:
    params = step.params
    metrics = _metric_list(step)
    readings = params.get("readings") or ["レスポンスタイム", "エラーレート", "スループット"]
    window = params.get("window_seconds", DEFAULT_WINDOW_SECONDS)
    if isinstance(window, bool) or not isinstance(window, int) or window < 10:
        raise StepError("datadog.invalid_window", step=step.id, window=str(window))
    unit = params.get("duration_unit", "ms")
    if unit not in ("ms", "s"):
        raise StepError("datadog.invalid_duration_unit", step=step.id, unit=str(unit))
    result = {
        "readings": [str(item) for item in readings],
        "url": params.get("url"),
        "window_seconds": window,
        "duration_unit": unit,
        "requests_metric": params.get("requests_metric") or _pick_metric(metrics, ("requests", "count")),
        "errors_metric": params.get("errors_metric") or _pick_metric(metrics, ("errors",)),
        "duration_metric": params.get("duration_metric") or _pick_metric(metrics, ("duration",)),
    }
    if not all(result[key] for key in ("requests_metric", "errors_metric", "duration_metric")):
        raise StepError("datadog.reading_metrics_unknown", step=step.id, metrics=", ".join(metrics))
    return result


def _metric_list(step: Step) -> list[str]:
    metrics = step.params.get("metrics")
    if not isinstance(metrics, list) or not metrics or not all(isinstance(name, str) and name for name in metrics):
        raise StepError("datadog.missing_metrics", step=step.id)
    return metrics


def _pick_metric(metrics: list[str], words: tuple[str, ...]) -> str | None:
    return next((name for name in metrics if all(word in name for word in words)), None)


def _earlier_record(earlier: Any, name_key: str, name: str) -> dict[str, Any]:
    """Return an object's record, keeping what an earlier attempt on the same object stored."""
    if isinstance(earlier, dict) and earlier.get(name_key) == name:
        return {name_key: name, "id": earlier.get("id"), "created": bool(earlier.get("created")),
                "previous": earlier.get("previous")}
    return {name_key: name, "id": None, "created": False, "previous": None}


# --- Definitions ----------------------------------------------------------------


def metric_widget(metric: str) -> dict[str, Any]:
    """Return a timeseries widget for one metric: counts as bars of their sum, others as an average line."""
    if metric.endswith(".count"):
        query, display = f"sum:{metric}{{*}}.as_count()", "bars"
    else:
        query, display = f"avg:{metric}{{*}}", "line"
    return {"definition": {"type": "timeseries", "title": metric,
                           "requests": [{"q": query, "display_type": display}]}}


def monitor_definition(plan: dict[str, Any]) -> dict[str, Any]:
    """Return the error-rate monitor: errors as a percentage of requests over the last 5 minutes."""
    query = (f"sum(last_5m):sum:{plan['errors_metric']}{{*}}.as_count() / "
             f"sum:{plan['requests_metric']}{{*}}.as_count() * 100 > {plan['threshold_text']}")
    return {
        "name": plan["monitor_name"],
        "type": "query alert",
        "query": query,
        "message": (f"{plan['alert']}: {plan['errors_metric']} is above {plan['threshold_text']}% "
                    f"of {plan['requests_metric']} (set up by postmerge for {plan['dashboard']})."),
        "tags": [MANAGED_TAG],
        "options": {"thresholds": {"critical": plan["threshold"]}, "notify_no_data": False,
                    "require_full_window": False},
        "priority": None,
    }


def _widget_metrics(widgets: list[dict[str, Any]]) -> set[str]:
    """Return the metrics that the widgets' queries already show."""
    metric_names = set()
    for widget in widgets:
        for request in (widget.get("definition") or {}).get("requests") or []:
            query = request.get("q") or ""
            _, _, rest = query.partition(":")
            metric_names.add(rest.split("{", 1)[0])
    return metric_names


def _pick(definition: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    picked = {key: definition[key] for key in fields if definition.get(key) is not None}
    # Datetimes and model objects become JSON values, so the data can be stored with the step.
    return json.loads(json.dumps(picked, default=str))


# --- Setup and rollback ---------------------------------------------------------


async def _setup_dashboard(session: _Session, plan: dict[str, Any], data: dict[str, Any]) -> None:
    from datadog_api_client.v1.api.dashboards_api import DashboardsApi
    from datadog_api_client.v1.model.dashboard import Dashboard

    record = data["dashboard"]
    api = DashboardsApi(session.client)
    title = plan["dashboard"]
    object_name = session.object_name("dashboard", title)
    summaries = await session.call(object_name, api.list_dashboards)
    match = next((item for item in summaries.dashboards or [] if item.title == title), None)

    if match is None:
        body = {"title": title, "layout_type": "ordered", "reflow_type": "auto",
                "description": "Created by postmerge.",
                "widgets": [metric_widget(metric) for metric in plan["metrics"]]}
        record["created"] = True
        await session.context.save(data)
        created = await session.call(object_name, lambda: api.create_dashboard(body=session.model(body, Dashboard)))
        record["id"] = created.id
        session.write("datadog.output_dashboard_created", title=title, id=created.id, widgets=len(plan["metrics"]))
        return

    record["id"] = match.id
    current = await session.call(object_name, lambda: api.get_dashboard(match.id))
    definition = _pick(current.to_dict(), DASHBOARD_FIELDS)
    missing = [metric for metric in plan["metrics"] if metric not in _widget_metrics(definition.get("widgets", []))]
    if not missing:
        session.write("datadog.output_dashboard_unchanged", title=title, id=match.id)
        return
    if not record["created"] and record["previous"] is None:
        record["previous"] = definition
    await session.context.save(data)
    body = {**definition, "widgets": definition.get("widgets", []) + [metric_widget(metric) for metric in missing]}
    await session.call(object_name, lambda: api.update_dashboard(match.id, body=session.model(body, Dashboard)))
    session.write("datadog.output_dashboard_updated", title=title, id=match.id, metrics=", ".join(missing))


async def _setup_monitor(session: _Session, plan: dict[str, Any], data: dict[str, Any]) -> None:
    from datadog_api_client.v1.api.monitors_api import MonitorsApi
    from datadog_api_client.v1.model.monitor import Monitor
    from datadog_api_client.v1.model.monitor_update_request import MonitorUpdateRequest

    record = data["monitor"]
    api = MonitorsApi(session.client)
    name = plan["monitor_name"]
    object_name = session.object_name("monitor", name)
    desired = monitor_definition(plan)
    found = await session.call(object_name, lambda: api.list_monitors(name=name))
    match = next((monitor for monitor in found if monitor.name == name), None)

    if match is None:
        record["created"] = True
        await session.context.save(data)
        created = await session.call(object_name, lambda: api.create_monitor(body=session.model(desired, Monitor)))
        record["id"] = created.id
        session.write("datadog.output_monitor_created", name=name, id=created.id, query=desired["query"])
        return

    record["id"] = match.id
    current = _pick(match.to_dict(), MONITOR_FIELDS)
    compared = ("type", "query", "message")
    same = all(current.get(key) == desired[key] for key in compared)
    same = same and (current.get("options") or {}).get("thresholds", {}).get("critical") == plan["threshold"]
    if same:
        session.write("datadog.output_monitor_unchanged", name=name, id=match.id)
        return
    if not record["created"] and record["previous"] is None:
        record["previous"] = current
    await session.context.save(data)
    body = {key: value for key, value in desired.items() if key != "type" and value is not None}
    await session.call(object_name, lambda: api.update_monitor(match.id, body=session.model(body, MonitorUpdateRequest)))
    session.write("datadog.output_monitor_updated", name=name, id=match.id, query=desired["query"])


async def _rollback_dashboard(session: _Session, record: dict[str, Any]) -> str:
    from datadog_api_client.v1.api.dashboards_api import DashboardsApi
    from datadog_api_client.v1.model.dashboard import Dashboard

    api = DashboardsApi(session.client)
    title = record.get("title", "")
    object_name = session.object_name("dashboard", title)
    dashboard_id = record.get("id")
    if dashboard_id is None and record.get("created"):
        # The step stopped before it stored the id: find the dashboard by title.
        summaries = await session.call(object_name, api.list_dashboards)
        dashboard_id = next((item.id for item in summaries.dashboards or [] if item.title == title), None)

    def restore(previous: dict[str, Any]):
        return api.update_dashboard(dashboard_id, body=session.model(previous, Dashboard))

    return await _undo(session, record, object_name, dashboard_id, api.delete_dashboard, restore)


async def _rollback_monitor(session: _Session, record: dict[str, Any]) -> str:
    from datadog_api_client.v1.api.monitors_api import MonitorsApi
    from datadog_api_client.v1.model.monitor_update_request import MonitorUpdateRequest

    if not record:
        return "none"
    api = MonitorsApi(session.client)
    name = record.get("name", "")
    object_name = session.object_name("monitor", name)
    monitor_id = record.get("id")
    if monitor_id is None and record.get("created"):
        found = await session.call(object_name, lambda: api.list_monitors(name=name))
        monitor_id = next((monitor.id for monitor in found if monitor.name == name), None)

    def restore(previous: dict[str, Any]):
        body = {key: value for key, value in previous.items() if key != "type"}
        return api.update_monitor(monitor_id, body=session.model(body, MonitorUpdateRequest))

    return await _undo(session, record, object_name, monitor_id, api.delete_monitor, restore)


async def _undo(session: _Session, record: dict[str, Any], object_name: str, object_id, delete, restore) -> str:
    """Delete the object the step created, or put back the copy it saved before changing it; return what was done."""
    from datadog_api_client.exceptions import NotFoundException

    if record.get("created"):
        if object_id is None:
            session.write("datadog.output_already_deleted", object=object_name)
            return "none"
        try:
            await session.call(object_name, lambda: delete(object_id), passthrough=NotFoundException)
        except NotFoundException:
            session.write("datadog.output_already_deleted", object=object_name)
            return "none"
        session.write("datadog.output_deleted", object=object_name, id=object_id)
        return "deleted"
    if record.get("previous") and object_id is not None:
        await session.call(object_name, lambda: restore(record["previous"]))
        session.write("datadog.output_restored", object=object_name, id=object_id)
        return "restored"
    session.write("datadog.output_nothing_to_undo", object=object_name)
    return "none"


# --- Readings -------------------------------------------------------------------


async def _query_values(session: _Session, query: str, start: int, end: int) -> list[float]:
    from datadog_api_client.v1.api.metrics_api import MetricsApi

    api = MetricsApi(session.client)
    object_name = session.object_name("query", query)
    response = await session.call(object_name, lambda: api.query_metrics(_from=start, to=end, query=query))
    values: list[float] = []
    for series in response.get("series") or []:
        for point in series.pointlist or []:
            value = point.value[1] if hasattr(point, "value") else point[1]
            if value is not None:
                values.append(float(value))
    return values


async def _query_total(session: _Session, query: str, start: int, end: int) -> float | None:
    values = await _query_values(session, query, start, end)
    return sum(values) if values else None


def _reading_line(item: str, readings: dict[str, Any], locale: str) -> tuple[str, bool]:
    """Return the output line for one 確認項目 entry and whether it had data."""
    lowered = item.lower()
    kind = next((name for name, words in READING_KINDS.items() if any(word in lowered for word in words)), None)
    if kind == "response_time" and readings["response_time_avg_ms"] is not None:
        return translate("datadog.output_response_time", locale, item=item,
                         p95=readings["response_time_p95_ms"], avg=readings["response_time_avg_ms"]), True
    if kind == "error_rate" and readings["error_rate_percent"] is not None:
        return translate("datadog.output_error_rate", locale, item=item, rate=readings["error_rate_percent"],
                         errors=_count(readings["errors"]), requests=_count(readings["requests"])), True
    if kind == "throughput" and readings["throughput_rps"] is not None:
        return translate("datadog.output_throughput", locale, item=item, rps=readings["throughput_rps"],
                         requests=_count(readings["requests"]), seconds=readings["window_seconds"]), True
    if kind is None:
        return translate("datadog.output_not_measured", locale, item=item), False
    return translate("datadog.output_no_data", locale, item=item, seconds=readings["window_seconds"]), False


def _count(value: float | None) -> str:
    return f"{value or 0:g}"


# --- Client session and errors --------------------------------------------------


class _Session:
    """An AsyncApiClient for the environment's Datadog site, with failures raised as StepError."""

    def __init__(self, context: StepContext) -> None:
        settings = context.environment.datadog
        if settings is None:
            raise StepError("datadog.missing_settings", environment=context.environment.name)
        api_key = context.environment.secret(settings.api_key_variable)
        app_key = context.environment.secret(settings.app_key_variable)
        missing = [name for name, value in ((settings.api_key_variable, api_key),
                                            (settings.app_key_variable, app_key)) if not value]
        if missing:
            raise StepError("datadog.missing_keys", variables=", ".join(missing), environment=context.environment.name)
        self.context = context
        self.settings = settings
        self.timeout = min(context.environment.http_timeout_seconds, context.timeout_seconds)
        self._keys = (api_key, app_key)
        self.client: Any = None
        self.configuration: Any = None

    async def __aenter__(self) -> _Session:
        from datadog_api_client import AsyncApiClient, Configuration

        api_key, app_key = self._keys
        self.configuration = Configuration(
            host=self.settings.api_url.rstrip("/"),
            api_key={"apiKeyAuth": api_key, "appKeyAuth": app_key},
            request_timeout=self.timeout,
        )
        self.client = AsyncApiClient(self.configuration)
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.client is not None:
            await self.client.__aexit__(*exc_info)

    def write(self, key: str, **params: object) -> None:
        self.context.output.write(translate(key, self.context.locale, **params))

    def object_name(self, kind: str, name: str) -> str:
        return translate(f"datadog.object_{kind}", self.context.locale, name=name)

    def model(self, body: dict[str, Any], model_class: type) -> Any:
        """Convert a JSON definition into the client's model, as the client converts responses."""
        from datadog_api_client.exceptions import ApiTypeError, ApiValueError
        from datadog_api_client.model_utils import validate_and_convert_types

        try:
            return validate_and_convert_types(body, (model_class,), ["body"], True, True, self.configuration)
        except (ApiTypeError, ApiValueError, TypeError, ValueError) as error:
            raise StepError("datadog.invalid_definition", object=model_class.__name__, error=str(error)) from None

    async def call(
        self,
        object_name: str,
        request: Callable[[], Awaitable[Any]],
        passthrough: type[BaseException] | None = None,
    ) -> Any:
        """Run one API request and turn its failure into a StepError that names the object."""
        import aiosonic.exceptions
        from datadog_api_client.exceptions import ApiException

        variables = f"{self.settings.api_key_variable}, {self.settings.app_key_variable}"
        common = {"object": object_name, "url": self.settings.api_url}
        try:
            # The client's request_timeout covers each request, and this wait_for also
            # covers a connection that hangs before the request is sent.
            return await asyncio.wait_for(request(), timeout=self.timeout + 1)
        except ApiException as error:
            if passthrough is not None and isinstance(error, passthrough):
                raise
            raise _api_failure(error, common, variables) from None
        except (asyncio.TimeoutError, aiosonic.exceptions.BaseTimeout):
            raise StepError("datadog.timed_out", seconds=self.timeout, **common) from None
        except (OSError, aiosonic.exceptions.ConnectionDisconnected) as error:
            raise StepError("datadog.connection_failed", error=_describe(error), **common) from None
        except aiosonic.exceptions.AiosonicError as error:
            raise StepError("datadog.request_failed", error=_describe(error), **common) from None


def _api_failure(error: Any, common: dict[str, Any], variables: str) -> StepError:
    status = error.status or 0
    details = _error_text(error.body)
    if status == 401:
        return StepError("datadog.unauthorized", status=status, errors=details, variables=variables, **common)
    if status == 403:
        return StepError("datadog.forbidden", status=status, errors=details, variables=variables, **common)
    if status == 404:
        return StepError("datadog.not_found", status=status, errors=details, **common)
    if status == 409:
        return StepError("datadog.conflict", status=status, errors=details, **common)
    if status == 429:
        return StepError("datadog.rate_limited", status=status, errors=details, **common)
    if status >= 500:
        return StepError("datadog.server_error", status=status, errors=details, **common)
    return StepError("datadog.rejected", status=status, errors=details, **common)


def _error_text(body: Any) -> str:
    """Return the messages of Datadog's {"errors": [...]} body."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except ValueError:
            return str(body)[:300] or "-"
    if isinstance(body, dict) and body.get("errors"):
        return "; ".join(str(message) for message in body["errors"])
    return "-"


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
