"""The monitor step: watch blue (v2) in Datadog for a window and fail as soon as a threshold breaks.

A runbook line such as "監視（5分）" after a traffic shift becomes a monitor step.
Over the window (`step.duration_seconds` × `monitor.time_scale`) the step polls
Datadog every `monitor.poll_interval_seconds` × `time_scale` seconds through
datadog-api-client's Datadog API v1 metrics query (MetricsApi.query_metrics,
GET /api/v1/query), the endpoint the sandbox's SaaS emulator serves. It reads
v2's request count, error count and latency percentile, and from them the
error rate and the throughput.

Thresholds come from `step.thresholds` (the planner reads them from the
runbook: `p95_ms` 200, `error_rate_percent` 0.1 and `throughput_rps` 1000 from
the Verification section, `abort_error_rate_percent` 5 from the alert line
"エラーレート > 5%"), overridden by `environment.monitor.thresholds`. Any
`pNN_ms` key is a latency percentile threshold. How they are judged:

- Each poll adds the requests since the previous poll to a batch. Once the
  batch has `monitor.min_requests` requests or more, it is judged and a new
  batch starts. With enough traffic every poll is judged on its own, so a
  fault is caught within one poll interval. A smaller batch is not judged
  alone, because a few requests give no reliable rate.
- A judged batch whose error rate is above `abort_error_rate_percent` fails
  the step at once (monitor.alert). A judged batch above a latency percentile
  or `error_rate_percent` threshold fails it too (monitor.poll_breach).
- At the end of the window, the whole window must have `min_requests`
  requests or more, else the step fails as too little traffic to judge
  (monitor.too_little_traffic). Its error rate, latency percentiles and
  throughput are then judged (monitor.window_breach), which covers the
  requests of a last batch too small to judge alone.
- Throughput is judged only on the whole window, because one poll's count
  depends on how fast the metrics reach Datadog. v2 gets only blue's share of
  the requests, so with `throughput_scope` "share" (the default) the limit
  is `throughput_rps` × weight / 100, the throughput v2 has when the total
  meets the runbook's figure. With "v2" the limit applies to v2 as it is.
  When blue's share is unknown, throughput is not judged, and an output line states it.

Any failure (a breach, the alert, too little traffic, a Datadog error or an
invalid parameter) first puts all traffic on green (v1) with
`steps.traffic.send_all_to_green` when the environment has a [traffic]
section. The step measures how long that took, and only then raises
StepError with the readings. Cancellation (an abort or a timeout) stops polling at once and
leaves traffic where it is.

Step params, all optional (the planner may leave them empty):

    metrics            list[str]  Metric names; defaults are the runbook's "api.v2.requests.count",
                                  "api.v2.requests.duration" and "api.v2.errors.count".
    requests_metric,
    errors_metric,
    duration_metric    str        The request count, error count and latency metric; default the metric
                                  of `metrics` with "requests" and "count", with "errors", and with "duration".
    scope              str        Datadog tag scope of the default queries, such as "version:v2"; default "*".
    duration_unit      str        "ms" (default) or "s": the unit of the latency metric.
    weight_percent     float      Blue's share of the requests during the window, 0 to 100. Default
                                  params["weight"] or `step.weight` (as traffic steps read it), then
                                  `steps.traffic.current_weight(environment)`.
    throughput_scope   str        "share" (default) or "v2", as described above; also read from an
                                  environment's `monitor.throughput_scope` when that setting exists.
    evaluation_delay_seconds
                       float      Seconds to wait after the window before its totals are read once more,
                                  for points that reach Datadog late. time_scale does not shorten it.
                                  Default 0, or the environment's `monitor.evaluation_delay_seconds` when
                                  that setting exists. The sandbox's load generator posts each second
                                  about a second late.

`environment.monitor.queries` replaces the default queries by name:

    requests  sum:api.v2.requests.count{*}.as_count()   summed over its points
    errors    sum:api.v2.errors.count{*}.as_count()     summed over its points
    p95_ms    p95:api.v2.requests.duration{*}           the maximum of its points, in ms

Counts are read from the start of the window on each poll and the previous
total is subtracted, so points that reach Datadog late still count once.

StepResult.data, which the engine shows in the next traffic approval:

    window_seconds, time_scale, scaled_window_seconds, poll_interval_seconds, polls, judged_polls,
    weight_percent, throughput_scope, throughput_limit_rps, min_requests, evaluation_delay_seconds,
    thresholds, queries,
    window   readings of the whole window: requests, errors, error_rate_percent, throughput_rps,
             seconds and one pNN_ms per percentile threshold
    last     readings of the last judged poll, or None
    worst    the highest pNN_ms and error_rate_percent of the judged polls

A StepError of the step has `readings` (the batch or window that failed),
`window`, `thresholds`, `breaches`, `traffic` (what happened to traffic) and
`traffic_reset_seconds` in its params. Running the step again is harmless; it
has no inverse.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bot.config import Environment
from bot.errors import PostmergeError, StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("api.v2.requests.count", "api.v2.requests.duration", "api.v2.errors.count")
COUNT_QUERIES = ("requests", "errors")
THRESHOLD_NAMES = ("error_rate_percent", "throughput_rps", "abort_error_rate_percent")
PERCENTILE_THRESHOLD = re.compile(r"^p(\d{2})_ms$")
THROUGHPUT_SCOPES = ("share", "v2")

SendAllToGreen = Callable[[Environment], Awaitable[float] | float]
CurrentWeight = Callable[[Environment], Awaitable[float | None] | float | None]


class MonitorExecutor(BaseExecutor):
    """The executor of monitor steps, which watch v2's metrics in Datadog (rules in the module docstring).

    `send_all_to_green` and `current_weight` default to the functions of
    steps.traffic, imported when first needed. Tests and the engine may pass
    their own.
    """

    kind = "monitor"

    def __init__(self, send_all_to_green: SendAllToGreen | None = None,
                 current_weight: CurrentWeight | None = None) -> None:
        self._send_all_to_green = send_all_to_green
        self._current_weight = current_weight

    def repeat_safe(self, step: Step) -> bool:
        return True

    async def execute(self, context: StepContext) -> StepResult:
        try:
            return await self._watch(context)
        except StepError as error:
            if error.key.startswith("datadog."):
                error = _error("monitor.datadog_failed", step=context.step.title,
                               error=error.render(context.locale), datadog_error=error.key)
            await self._put_traffic_on_green(context, error)
            raise error from None
        except Exception:
            # A bug must not leave blue with traffic that is no longer watched.
            log.exception("monitor step %s failed unexpectedly", context.step.id)
            await self._put_traffic_on_green(context, None)
            raise

    # --- Traffic --------------------------------------------------------------

    async def _put_traffic_on_green(self, context: StepContext, error: StepError | None) -> None:
        """Put all traffic on green before the failure is raised, and note the outcome in error's params."""
        locale = context.locale
        seconds: float | None = None
        if context.environment.traffic is None:
            text = translate("monitor.traffic_not_configured", locale)
        else:
            started = time.monotonic()
            try:
                if self._send_all_to_green is None:
                    from steps.traffic import send_all_to_green

                    await send_all_to_green(context.environment, output=context.output, locale=locale)
                else:
                    outcome = self._send_all_to_green(context.environment)
                    if inspect.isawaitable(outcome):
                        await outcome
                seconds = round(time.monotonic() - started, 3)
                text = translate("monitor.traffic_reset", locale, seconds=f"{seconds:.2f}")
            except asyncio.CancelledError:
                raise
            except Exception as failure:  # noqa: BLE001 - reported with the step's own failure
                log.error("monitor step %s: putting traffic on green failed: %s", context.step.id, failure)
                described = failure.render(locale) if isinstance(failure, PostmergeError) else _describe(failure)
                text = translate("monitor.traffic_reset_failed", locale, error=described)
        context.output.write(text)
        if error is not None:
            error.params["traffic"] = text
            error.params["traffic_reset_seconds"] = seconds

    async def _blue_weight(self, context: StepContext) -> float | None:
        """Return blue's share in percent: the step's param or weight, else the traffic module's reading."""
        step = context.step
        weight = step.params.get("weight_percent", step.params.get("weight", step.weight))
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
                raise _error("monitor.invalid_weight", step=step.title, value=str(weight))
            return float(weight)
        if context.environment.traffic is None and self._current_weight is None:
            return None
        try:
            reader = self._current_weight
            if reader is None:
                from steps.traffic import current_weight as reader
            value = reader(context.environment)
            if inspect.isawaitable(value):
                value = await value
        except asyncio.CancelledError:
            raise
        except Exception as failure:  # noqa: BLE001 - the weight only scales the throughput limit
            log.warning("monitor step %s: reading blue's share failed: %s", step.id, failure)
            return None
        return None if value is None else float(value)

    # --- The window ------------------------------------------------------------

    async def _watch(self, context: StepContext) -> StepResult:
        from steps.datadog import _Session

        step = context.step
        locale = context.locale
        settings = context.environment.monitor
        plan = _read_plan(step, context.environment)

        scale = settings.time_scale
        window = step.duration_seconds * scale
        interval = min(settings.poll_interval_seconds * scale, window)
        if window >= context.timeout_seconds:
            raise _error("monitor.window_exceeds_timeout", step=step.title, seconds=_number(window),
                         timeout=_number(context.timeout_seconds))

        weight = await self._blue_weight(context)
        throughput_limit = _throughput_limit(plan, weight)
        context.output.write(translate("monitor.output_window", locale,
                                       window=_window_text(step.duration_seconds, scale, locale),
                                       interval=_number(interval), limits=_limits_text(plan, throughput_limit, locale),
                                       minimum=plan["min_requests"]))
        context.output.write(_throughput_note(plan, weight, throughput_limit, locale))

        watch = _Watch(context, plan, window, interval, throughput_limit)
        async with _Session(context) as session:
            watch.session = session
            await watch.run()

        data = {
            "window_seconds": step.duration_seconds,
            "time_scale": scale,
            "scaled_window_seconds": round(window, 3),
            "poll_interval_seconds": round(interval, 3),
            "polls": watch.polls,
            "judged_polls": watch.judged_polls,
            "weight_percent": weight,
            "throughput_scope": plan["throughput_scope"],
            "throughput_limit_rps": throughput_limit,
            "min_requests": plan["min_requests"],
            "evaluation_delay_seconds": plan["evaluation_delay_seconds"],
            "thresholds": plan["thresholds"],
            "queries": plan["queries"],
            "window": watch.window_readings,
            "last": watch.last_judged,
            "worst": watch.worst,
        }
        summary = translate("monitor.summary", locale, window=_window_text(step.duration_seconds, scale, locale),
                            readings=_readings_text(watch.window_readings, plan, locale))
        return StepResult(ok=True, summary=summary, data=data)


class _Watch:
    """The polling loop of one window: the totals so far, the batch being collected and the judgements."""

    def __init__(self, context: StepContext, plan: dict[str, Any], window: float, interval: float,
                 throughput_limit: float | None) -> None:
        self.context = context
        self.plan = plan
        self.window = window
        self.interval = interval
        self.throughput_limit = throughput_limit
        self.session: Any = None
        self.polls = 0
        self.judged_polls = 0
        self.last_judged: dict[str, Any] | None = None
        self.worst: dict[str, float | None] = {name: None for name in [*plan["percentiles"], "error_rate_percent"]}
        self.window_readings: dict[str, Any] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started_at = time.time()
        started = loop.time()
        # Datadog takes whole seconds, so the counts of the second the window starts in
        # are read once now and subtracted from every later total.
        # NOTE: points that reach Datadog late (the sandbox generator posts 1-2 s late) are
        # missing from this baseline, so up to about a second from before the window can count in it.
        first_second = math.floor(started_at)
        baseline = await self._totals(first_second, math.ceil(started_at))
        previous = dict(baseline)
        batch = {"requests": 0.0, "errors": 0.0, "since": started_at, "since_loop": started}

        while True:
            poll_at = min(started + (self.polls + 1) * self.interval, started + self.window)
            await asyncio.sleep(max(0.0, poll_at - loop.time()))
            self.polls += 1
            now = time.time()
            elapsed = loop.time() - started
            last_poll = elapsed >= self.window - 1e-6

            totals = await self._totals(first_second, math.ceil(now))
            for name in COUNT_QUERIES:
                batch[name] += max(0.0, totals[name] - previous[name])
            previous = totals
            percentiles = await self._percentiles(math.floor(batch["since"]), math.ceil(now))
            readings = _readings(batch["requests"], batch["errors"], loop.time() - batch["since_loop"], percentiles)
            window_readings = _readings(totals["requests"] - baseline["requests"],
                                        totals["errors"] - baseline["errors"], elapsed, {})

            judged = readings["requests"] >= self.plan["min_requests"]
            self._write_poll(elapsed, readings, window_readings, judged)
            if judged:
                self.judged_polls += 1
                self.last_judged = readings
                self._note_worst(readings)
                self._judge_poll(readings, window_readings)
                batch = {"requests": 0.0, "errors": 0.0, "since": now, "since_loop": loop.time()}
            if last_poll:
                break

        delay = self.plan["evaluation_delay_seconds"]
        if delay:
            # Points of the window's last seconds may reach Datadog late, so count the window once more after
            # waiting for them, like the evaluation_delay of a Datadog monitor.
            self.context.output.write(translate("monitor.output_evaluation_delay", self.context.locale,
                                                seconds=_number(delay)))
            await asyncio.sleep(delay)
            totals = await self._totals(first_second, math.ceil(now))
            window_readings = _readings(totals["requests"] - baseline["requests"],
                                        totals["errors"] - baseline["errors"], elapsed, {})
        window_readings.update(await self._percentiles(first_second, math.ceil(now)))
        self.window_readings = window_readings
        self._judge_window(window_readings)

    # --- Queries ---------------------------------------------------------------

    async def _totals(self, start: int, end: int) -> dict[str, float]:
        from steps.datadog import _query_values

        totals = {}
        for name in COUNT_QUERIES:
            totals[name] = sum(await _query_values(self.session, self.plan["queries"][name], start, end))
        return totals

    async def _percentiles(self, start: int, end: int) -> dict[str, float | None]:
        from steps.datadog import _query_values

        readings: dict[str, float | None] = {}
        for name in self.plan["percentiles"]:
            values = await _query_values(self.session, self.plan["queries"][name], start, end)
            # The highest value of the query's intervals: an upper bound of the range's percentile.
            readings[name] = round(max(values) * self.plan["duration_scale"], 1) if values else None
        return readings

    # --- Judgements ------------------------------------------------------------

    def _judge_poll(self, readings: dict[str, Any], window_readings: dict[str, Any]) -> None:
        thresholds = self.plan["thresholds"]
        locale = self.context.locale
        alert = thresholds.get("abort_error_rate_percent")
        rate = readings["error_rate_percent"]
        if alert is not None and rate is not None and rate > alert:
            breach = translate("monitor.breach_error_rate", locale, value=_number(rate), limit=_number(alert))
            raise self._failure("monitor.alert", readings, window_readings, [breach])

        breaches = self._breaches(readings, with_throughput=False)
        if breaches:
            raise self._failure("monitor.poll_breach", readings, window_readings, breaches)

    def _judge_window(self, window_readings: dict[str, Any]) -> None:
        minimum = self.plan["min_requests"]
        if window_readings["requests"] < minimum:
            raise self._failure("monitor.too_little_traffic", window_readings, window_readings, [],
                                requests=window_readings["requests"], minimum=minimum)
        breaches = self._breaches(window_readings, with_throughput=True)
        if breaches:
            raise self._failure("monitor.window_breach", window_readings, window_readings, breaches)

    def _breaches(self, readings: dict[str, Any], *, with_throughput: bool) -> list[str]:
        thresholds = self.plan["thresholds"]
        locale = self.context.locale
        breaches = []
        for name in self.plan["percentiles"]:
            value = readings.get(name)
            if value is not None and value > thresholds[name]:
                breaches.append(translate("monitor.breach_latency", locale, percentile=name.split("_")[0],
                                          value=_number(value), limit=_number(thresholds[name])))
        limit = thresholds.get("error_rate_percent")
        rate = readings["error_rate_percent"]
        if limit is not None and rate is not None and rate > limit:
            breaches.append(translate("monitor.breach_error_rate", locale, value=_number(rate), limit=_number(limit)))
        throughput = readings["throughput_rps"]
        if with_throughput and self.throughput_limit is not None and throughput is not None \
                and throughput < self.throughput_limit:
            breaches.append(translate("monitor.breach_throughput", locale, value=_number(throughput, 1),
                                      limit=_number(self.throughput_limit)))
        return breaches

    def _failure(self, key: str, readings: dict[str, Any], window_readings: dict[str, Any],
                 breaches: list[str], **params: Any) -> StepError:
        locale = self.context.locale
        return _error(
            key,
            step=self.context.step.title,
            elapsed=_number(window_readings["seconds"]),
            window=_number(self.window),
            breaches=translate("monitor.separator", locale).join(breaches),
            readings_text=_readings_text(readings, self.plan, locale),
            readings=readings,
            window_readings=window_readings,
            thresholds={**self.plan["thresholds"], "throughput_limit_rps": self.throughput_limit},
            **params,
        )

    def _note_worst(self, readings: dict[str, Any]) -> None:
        for name in self.worst:
            value = readings.get(name)
            if value is not None and (self.worst[name] is None or value > self.worst[name]):
                self.worst[name] = value

    def _write_poll(self, elapsed: float, readings: dict[str, Any], window_readings: dict[str, Any],
                    judged: bool) -> None:
        locale = self.context.locale
        line = translate("monitor.output_poll", locale, elapsed=f"{elapsed:.1f}", window=_number(self.window),
                         readings=_readings_text(readings, self.plan, locale),
                         total=_count(window_readings["requests"]),
                         limits=_limits_text(self.plan, self.throughput_limit, locale))
        if not judged:
            line += translate("monitor.output_collecting", locale, requests=_count(readings["requests"]),
                              minimum=self.plan["min_requests"])
        self.context.output.write(line)


# --- Parameters -------------------------------------------------------------------


def _read_plan(step: Step, environment: Environment) -> dict[str, Any]:
    """Return the queries, thresholds and options of the step, or raise StepError for an invalid one."""
    settings = environment.monitor
    params = step.params
    if not isinstance(step.duration_seconds, (int, float)) or step.duration_seconds <= 0:
        raise _error("monitor.invalid_window", step=step.title, value=str(step.duration_seconds))

    thresholds = {**step.thresholds, **settings.thresholds}
    known = [name for name in thresholds if name in THRESHOLD_NAMES or PERCENTILE_THRESHOLD.match(name)]
    unknown = sorted(set(thresholds) - set(known))
    if unknown:
        raise _error("monitor.unknown_threshold", step=step.title, names=", ".join(unknown))
    thresholds = {name: float(thresholds[name]) for name in known}
    if not thresholds:
        raise _error("monitor.no_thresholds", step=step.title)
    percentiles = sorted(name for name in thresholds if PERCENTILE_THRESHOLD.match(name))

    metrics = params.get("metrics") or list(DEFAULT_METRICS)
    if not isinstance(metrics, list) or not all(isinstance(name, str) and name for name in metrics):
        raise _error("monitor.invalid_param", step=step.title, name="metrics", value=str(metrics))
    scope = str(params.get("scope") or "*")
    names = {
        "requests": params.get("requests_metric") or _pick_metric(metrics, ("requests", "count")),
        "errors": params.get("errors_metric") or _pick_metric(metrics, ("errors",)),
        "duration": params.get("duration_metric") or _pick_metric(metrics, ("duration",)),
    }
    defaults = {
        "requests": f"sum:{names['requests']}{{{scope}}}.as_count()",
        "errors": f"sum:{names['errors']}{{{scope}}}.as_count()",
    }
    for name in percentiles:
        defaults[name] = f"{name.split('_')[0]}:{names['duration']}{{{scope}}}"

    unknown_queries = sorted(set(settings.queries) - set(defaults))
    if unknown_queries:
        raise _error("monitor.unknown_query", step=step.title, names=", ".join(unknown_queries),
                     known=", ".join(defaults))
    queries = {name: settings.queries.get(name) or query for name, query in defaults.items()}
    needed = {"requests": "requests" not in settings.queries, "errors": "errors" not in settings.queries,
              "duration": any(name not in settings.queries for name in percentiles)}
    missing = [name for name, metric in names.items() if needed[name] and not metric]
    if missing:
        raise _error("monitor.metrics_unknown", step=step.title, metrics=", ".join(metrics),
                     missing=", ".join(missing))

    unit = params.get("duration_unit", "ms")
    if unit not in ("ms", "s"):
        raise _error("monitor.invalid_param", step=step.title, name="duration_unit", value=str(unit))
    delay = params.get("evaluation_delay_seconds", getattr(settings, "evaluation_delay_seconds", 0))
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 600:
        raise _error("monitor.invalid_param", step=step.title, name="evaluation_delay_seconds", value=str(delay))
    scope_setting = params.get("throughput_scope") or getattr(settings, "throughput_scope", None) or "share"
    if scope_setting not in THROUGHPUT_SCOPES:
        raise _error("monitor.invalid_param", step=step.title, name="throughput_scope",
                     value=str(scope_setting))
    return {
        "thresholds": thresholds,
        "percentiles": percentiles,
        "queries": queries,
        "duration_scale": 1000.0 if unit == "s" else 1.0,
        "throughput_scope": scope_setting,
        "min_requests": settings.min_requests,
        "evaluation_delay_seconds": float(delay),
    }


def _pick_metric(metrics: list[str], words: tuple[str, ...]) -> str | None:
    return next((name for name in metrics if all(word in name for word in words)), None)


def _throughput_limit(plan: dict[str, Any], weight: float | None) -> float | None:
    """Return the lowest throughput v2 may have over the window, or None when it is not judged."""
    threshold = plan["thresholds"].get("throughput_rps")
    if threshold is None:
        return None
    if plan["throughput_scope"] == "v2":
        return threshold
    if weight is None:
        return None
    return round(threshold * weight / 100, 3)


def _error(key: str, **params: Any) -> StepError:
    """Return a monitor StepError with the params every monitor error has, filled in later when known."""
    defaults: dict[str, Any] = {"traffic": "", "traffic_reset_seconds": None, "breaches": "", "readings": None}
    return StepError(key, **{**defaults, **params})


# --- Readings and text --------------------------------------------------------------


def _readings(requests: float, errors: float, seconds: float, percentiles: dict[str, float | None]) -> dict[str, Any]:
    requests_count = max(0, round(requests))
    errors_count = max(0, round(errors))
    return {
        "requests": requests_count,
        "errors": errors_count,
        "error_rate_percent": round(errors_count / requests_count * 100, 3) if requests_count else None,
        "throughput_rps": round(requests_count / seconds, 3) if seconds > 0 else None,
        "seconds": round(seconds, 3),
        **percentiles,
    }


def _readings_text(readings: dict[str, Any], plan: dict[str, Any], locale: str) -> str:
    parts = [translate("monitor.reading_latency", locale, percentile=name.split("_")[0],
                       value=_number(readings.get(name))) for name in plan["percentiles"]]
    parts.append(translate("monitor.reading_error_rate", locale, value=_number(readings.get("error_rate_percent")),
                           errors=_count(readings.get("errors"))))
    parts.append(translate("monitor.reading_throughput", locale, value=_number(readings.get("throughput_rps"), 1)))
    parts.append(translate("monitor.reading_requests", locale, value=_count(readings.get("requests"))))
    return translate("monitor.separator", locale).join(parts)


def _limits_text(plan: dict[str, Any], throughput_limit: float | None, locale: str) -> str:
    thresholds = plan["thresholds"]
    parts = [translate("monitor.limit_latency", locale, percentile=name.split("_")[0],
                       value=_number(thresholds[name])) for name in plan["percentiles"]]
    if "error_rate_percent" in thresholds:
        parts.append(translate("monitor.limit_error_rate", locale, value=_number(thresholds["error_rate_percent"])))
    if "abort_error_rate_percent" in thresholds:
        parts.append(translate("monitor.limit_alert", locale, value=_number(thresholds["abort_error_rate_percent"])))
    if throughput_limit is not None:
        parts.append(translate("monitor.limit_throughput", locale, value=_number(throughput_limit)))
    return translate("monitor.separator", locale).join(parts)


def _throughput_note(plan: dict[str, Any], weight: float | None, limit: float | None, locale: str) -> str:
    threshold = plan["thresholds"].get("throughput_rps")
    if threshold is None:
        return translate("monitor.output_throughput_none", locale)
    if plan["throughput_scope"] == "v2":
        return translate("monitor.output_throughput_v2", locale, limit=_number(threshold))
    if weight is None:
        return translate("monitor.output_throughput_unknown_weight", locale, threshold=_number(threshold))
    return translate("monitor.output_throughput_share", locale, threshold=_number(threshold),
                     weight=_number(weight), limit=_number(limit))


def _window_text(planned_seconds: float, scale: float, locale: str) -> str:
    if planned_seconds % 60 == 0:
        planned = translate("monitor.minutes", locale, value=_number(planned_seconds / 60))
    else:
        planned = translate("monitor.seconds", locale, value=_number(planned_seconds))
    if scale == 1:
        return translate("monitor.window", locale, planned=planned)
    return translate("monitor.window_scaled", locale, planned=planned, scale=_number(scale),
                     seconds=_number(planned_seconds * scale))


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{round(float(value), digits):g}"


def _count(value: float | None) -> str:
    return f"{value or 0:g}"


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
