"""The monitor executor with the real Datadog client against the SaaS emulator, and the v2 fault switches.

Windows run at a small time scale: a 5-minute window at ×0.01 takes 3 seconds
and polls every 0.3 seconds. A load task records points the way a load
generator does: per v2 request, api.v2.requests.count 1, api.v2.requests.duration
its latency in ms and, for a 5xx, api.v2.errors.count 1.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.config import DatadogSettings, Environment, MonitorSettings, TrafficSettings
from bot.errors import StepError, UsageError
from bot.plan import Step
from bot.sandbox._state import parse_switch_value, read_numeric_switches, read_switch_file, write_json_atomic
from bot.sandbox.saas import SaasEmulator
from bot.sandbox.service import FaultSwitches, create_app
from steps.base import OutputBuffer, StepContext, StepResult
from steps.monitor import MonitorExecutor

# The thresholds the planner reads from the runbook's Verification section and alert line.
RUNBOOK_THRESHOLDS = {"p95_ms": 200.0, "error_rate_percent": 0.1, "throughput_rps": 1000.0,
                      "abort_error_rate_percent": 5.0}
QUERY_PATH = "/datadog/api/v1/query"


@pytest.fixture
async def saas() -> AsyncIterator[SaasEmulator]:
    async with SaasEmulator() as emulator:
        yield emulator


def environment_for(saas: SaasEmulator, *, scale: float = 0.01, min_requests: int = 20,
                    traffic: bool = True, http_timeout_seconds: float = 5) -> Environment:
    """Return an environment whose Datadog section points at the emulator."""
    credentials = saas.credentials["datadog"]
    return Environment(
        name="test",
        variables={"DD_API_KEY": credentials["api_key"], "DD_APP_KEY": credentials["app_key"]},
        http_timeout_seconds=http_timeout_seconds,
        datadog=DatadogSettings(api_url=saas.datadog_url),
        monitor=MonitorSettings(poll_interval_seconds=30, time_scale=scale, min_requests=min_requests),
        traffic=TrafficSettings(provider="nginx") if traffic else None,
    )


class FakeTraffic:
    """A stand-in for steps.traffic that records when all traffic was sent to green."""

    def __init__(self, weight: float | None = None) -> None:
        self.calls: list[float] = []
        self.weight = weight

    async def send_all_to_green(self, environment: Environment) -> float:
        await asyncio.sleep(0.05)
        self.calls.append(time.monotonic())
        return 0.05

    async def current_weight(self, environment: Environment) -> float | None:
        return self.weight


class Load:
    """A load task that records v2 request points into the emulator at `rate` requests per second."""

    def __init__(self, saas: SaasEmulator, rate: float = 400, error_percent: float = 0.0,
                 latency_ms: tuple[float, float] = (40, 150), lag_seconds: float = 0.0) -> None:
        self.saas = saas
        # Points reach the emulator this long after their timestamp, like a load generator that posts late.
        self.lag_seconds = lag_seconds
        self._late: list[tuple[str, float, float]] = []
        self.rate = rate
        self.error_percent = error_percent
        self.latency_ms = latency_ms
        self._error_credit = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        owed = 0.0
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            owed += (now - last) * self.rate
            last = now
            while owed >= 1:
                owed -= 1
                self.request()
            due = [point for point in self._late if point[2] <= time.time() - self.lag_seconds]
            self._late = self._late[len(due):]
            for metric, value, stamp in due:
                self.saas.datadog.record(metric, value, stamp)

    def request(self) -> None:
        stamp = time.time()
        self.record("api.v2.requests.count", 1, stamp)
        self.record("api.v2.requests.duration", random.uniform(*self.latency_ms), stamp)
        # Errors are spread evenly, like the v2 service's v2-error-percent switch.
        self._error_credit += self.error_percent / 100
        if self._error_credit >= 1:
            self._error_credit -= 1
            self.record("api.v2.errors.count", 1, stamp)

    def record(self, metric: str, value: float, stamp: float) -> None:
        if self.lag_seconds:
            self._late.append((metric, value, stamp))
        else:
            self.saas.datadog.record(metric, value, stamp)


class Runner:
    """A monitor step run the way the engine runs it, with its output lines."""

    def __init__(self, environment: Environment, traffic: FakeTraffic | None = None,
                 params: dict[str, Any] | None = None, duration_seconds: int = 300) -> None:
        self.traffic = traffic or FakeTraffic()
        self.executor = MonitorExecutor(send_all_to_green=self.traffic.send_all_to_green,
                                        current_weight=self.traffic.current_weight)
        self.step = Step(id="monitor-1", title="監視（5分）", kind="monitor", source_line=1,
                         duration_seconds=duration_seconds, thresholds=dict(RUNBOOK_THRESHOLDS),
                         params={"weight_percent": 10} if params is None else params)
        self.environment = environment
        self.lines: list[str] = []

    def context(self, locale: str = "en") -> StepContext:
        return StepContext(run_id="run-1", step=self.step, environment=self.environment,
                           artifacts_dir=Path("/nonexistent"), output=OutputBuffer(100_000, self.lines.append),
                           timeout_seconds=30, locale=locale)

    async def execute(self, locale: str = "en") -> StepResult:
        result = await self.executor.execute(self.context(locale))
        # The engine stores the data as JSON.
        json.dumps(result.data)
        return result

    async def fail(self, locale: str = "en") -> tuple[StepError, float]:
        """Run the step, expect a StepError and return it with the seconds until it was raised."""
        started = time.monotonic()
        with pytest.raises(StepError) as caught:
            await self.execute(locale)
        json.dumps(caught.value.params)
        return caught.value, time.monotonic() - started

    def poll_lines(self) -> list[str]:
        return [line for line in self.lines if line.startswith("[")]


# --- Windows --------------------------------------------------------------------


async def test_healthy_window_passes(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas))
    started = time.monotonic()
    async with Load(saas, rate=400):
        result = await runner.execute()
    elapsed = time.monotonic() - started

    assert 3.0 <= elapsed < 4.5
    assert runner.traffic.calls == []
    assert "5 min window (×0.01 scale: 3 s)" in runner.lines[0]
    assert "300 req/s" not in runner.lines[1]
    assert "= 100 req/s" in runner.lines[1]
    assert len(runner.poll_lines()) == 10

    data = result.data
    assert data["polls"] == 10
    assert data["judged_polls"] >= 8
    assert data["scaled_window_seconds"] == 3.0
    assert data["poll_interval_seconds"] == 0.3
    assert data["weight_percent"] == 10.0
    assert data["throughput_limit_rps"] == 100.0
    window = data["window"]
    assert 900 <= window["requests"] <= 1300
    assert window["errors"] == 0
    assert window["error_rate_percent"] == 0.0
    assert 300 <= window["throughput_rps"] <= 430
    assert 100 <= window["p95_ms"] <= 150
    assert data["last"]["requests"] >= 20
    assert data["worst"]["p95_ms"] <= 150
    assert "met every threshold" in result.summary


async def test_poll_line_shows_readings(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas, scale=0.004))
    async with Load(saas, rate=400):
        await runner.execute()
    # The first poll can come before the load's first points arrive, and then it has no error rate yet.
    line = next(line for line in runner.poll_lines() if ", 0 requests;" not in line)
    assert line.startswith("[0.")
    assert "/1.2 s]" in line
    for part in ("p95 ", " ms", "error rate 0%", "throughput ", "requests", "p95 ≤ 200 ms", "error rate ≤ 0.1%",
                 "alert above 5%", "throughput ≥ 100 req/s"):
        assert part in line


async def test_error_rate_trips_within_one_poll(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas))
    async with Load(saas, rate=400) as load:
        task = asyncio.create_task(runner.fail())
        await asyncio.sleep(0.7)
        load.error_percent = 2.0
        errors_started = time.monotonic()
        error, _ = await task
    detected = runner.traffic.calls[0] - 0.05 - errors_started

    assert error.key == "monitor.poll_breach"
    # Within one poll interval (0.3 s), with room for the queries and the scheduler.
    assert detected <= 0.3 + 0.25
    assert len(runner.traffic.calls) == 1
    assert error.params["traffic_reset_seconds"] >= 0.05
    assert error.params["readings"]["error_rate_percent"] > 0.1
    assert error.params["thresholds"]["error_rate_percent"] == 0.1
    message = error.render("en")
    assert "is above 0.1%" in message
    assert "All traffic was put back on green (v1) in" in message
    # The reset is reported before the step fails.
    assert runner.lines[-1].startswith("All traffic was put back on green (v1)")


async def test_p95_400_ms_trips(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas))
    async with Load(saas, rate=400, latency_ms=(390, 410)):
        error, seconds = await runner.fail()

    assert error.key == "monitor.poll_breach"
    assert seconds < 0.3 + 0.4
    assert 390 <= error.params["readings"]["p95_ms"] <= 410
    assert "p95 4" in error.render("en")
    assert "is above 200 ms" in error.render("en")
    assert len(runner.traffic.calls) == 1


async def test_alert_fails_at_once(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas))
    async with Load(saas, rate=400, error_percent=10):
        error, seconds = await runner.fail()

    assert error.key == "monitor.alert"
    assert seconds < 0.3 + 0.4
    assert error.params["readings"]["error_rate_percent"] > 5
    assert "is above 5%" in error.render("en")
    assert len(runner.traffic.calls) == 1


async def test_too_little_traffic_fails(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas, scale=0.005))
    async with Load(saas, rate=4):
        error, seconds = await runner.fail()

    assert error.key == "monitor.too_little_traffic"
    assert 1.5 <= seconds < 2.5
    requests = error.params["requests"]
    assert requests < 20
    message = error.render("en")
    assert f"got {requests} requests in the 1.5 s window" in message
    assert "fewer than the minimum of 20 (monitor.min_requests)" in message
    assert "lower monitor.min_requests" in message
    assert len(runner.traffic.calls) == 1
    assert any("not judged yet" in line for line in runner.poll_lines())


async def test_window_throughput_too_low(saas: SaasEmulator) -> None:
    # 60 req/s is enough requests to judge, but below 1000 req/s × 10% = 100 req/s.
    runner = Runner(environment_for(saas, scale=0.005, min_requests=20))
    async with Load(saas, rate=60):
        error, _ = await runner.fail()

    assert error.key == "monitor.window_breach"
    assert "is below 100 req/s" in error.render("en")


@pytest.mark.parametrize(("delay", "passes"), [(0, False), (0.6, True)])
async def test_evaluation_delay_counts_late_points(saas: SaasEmulator, delay: float, passes: bool) -> None:
    # Points arrive 0.4 s late: without a delay the 1.5 s window misses about a quarter of its requests.
    environment = environment_for(saas, scale=0.005)
    environment.monitor.thresholds = {"throughput_rps": 175}
    runner = Runner(environment, params={"throughput_scope": "v2", "evaluation_delay_seconds": delay})
    async with Load(saas, rate=200, lag_seconds=0.4):
        if passes:
            result = await runner.execute()
            assert result.data["window"]["throughput_rps"] >= 175
            assert result.data["evaluation_delay_seconds"] == 0.6
        else:
            error, _ = await runner.fail()
            assert error.key == "monitor.window_breach"
            assert "is below 175 req/s" in error.render("en")


@pytest.mark.parametrize(("status", "text"), [(500, "HTTP 500"), (403, "HTTP 403"), (429, "HTTP 429")])
async def test_datadog_error_fails_clearly(saas: SaasEmulator, status: int, text: str) -> None:
    saas.inject(QUERY_PATH, status, times=100)
    runner = Runner(environment_for(saas))
    error, seconds = await runner.fail()

    assert error.key == "monitor.datadog_failed"
    assert seconds < 1
    message = error.render("en")
    assert "reading the metrics from Datadog failed" in message
    assert text in message
    assert "metric query sum:api.v2.requests.count{*}.as_count()" in message
    assert len(runner.traffic.calls) == 1
    for secret in saas.credentials["datadog"].values():
        assert secret not in message
        assert all(secret not in line for line in runner.lines)


async def test_datadog_timeout_fails_clearly(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas, http_timeout_seconds=0.3))
    async with Load(saas, rate=400):
        task = asyncio.create_task(runner.fail())
        await asyncio.sleep(0.5)
        saas.inject(QUERY_PATH, delay_seconds=1.5)
        error, _ = await task

    assert error.key == "monitor.datadog_failed"
    assert "did not respond within 0.3 seconds" in error.render("en")
    assert len(runner.traffic.calls) == 1


async def test_datadog_refused_fails_clearly(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas))
    await saas.stop()
    error, _ = await runner.fail()
    await saas.start()

    assert error.key == "monitor.datadog_failed"
    assert "Could not connect to Datadog" in error.render("en")
    assert len(runner.traffic.calls) == 1


async def test_failure_without_traffic_section(saas: SaasEmulator) -> None:
    saas.inject(QUERY_PATH, 500)
    runner = Runner(environment_for(saas, traffic=False))
    error, _ = await runner.fail(locale="ja")

    assert runner.traffic.calls == []
    assert error.params["traffic_reset_seconds"] is None
    assert "手動ですべてのトラフィックを Green（v1）に戻してください" in error.render("ja")


async def test_failed_reset_is_reported(saas: SaasEmulator) -> None:
    async def broken_reset(environment: Environment) -> float:
        raise StepError("monitor.invalid_param", step="traffic-1", name="upstream_file", value="missing",
                        traffic="")

    saas.inject(QUERY_PATH, 500)
    runner = Runner(environment_for(saas))
    runner.executor = MonitorExecutor(send_all_to_green=broken_reset)
    error, _ = await runner.fail()

    assert error.key == "monitor.datadog_failed"
    assert error.params["traffic_reset_seconds"] is None
    message = error.render("en")
    assert "Putting all traffic back on green (v1) failed: traffic-1: the parameter upstream_file" in message
    assert "by hand now" in message


async def test_cancel_stops_at_once(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas))
    async with Load(saas, rate=400):
        task = asyncio.create_task(runner.execute())
        await asyncio.sleep(0.5)
        cancelled = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped = time.monotonic() - cancelled
        polls = len(runner.poll_lines())
        await asyncio.sleep(0.4)

    assert stopped < 0.1
    assert runner.traffic.calls == []
    # No poll runs after the cancellation.
    assert len(runner.poll_lines()) == polls


async def test_time_scale_shortens_window(saas: SaasEmulator) -> None:
    # Without weight_percent, blue's share comes from the traffic module's current weight.
    runner = Runner(environment_for(saas, scale=0.005), traffic=FakeTraffic(weight=10), params={})
    started = time.monotonic()
    async with Load(saas, rate=400):
        result = await runner.execute()
    elapsed = time.monotonic() - started

    assert 1.5 <= elapsed < 2.5
    assert "5 min window (×0.005 scale: 1.5 s)" in runner.lines[0]
    assert result.data["scaled_window_seconds"] == 1.5
    assert result.data["poll_interval_seconds"] == 0.15
    assert result.data["polls"] == 10
    assert result.data["weight_percent"] == 10.0


async def test_unknown_weight_skips_throughput(saas: SaasEmulator) -> None:
    runner = Runner(environment_for(saas, scale=0.004), params={})
    async with Load(saas, rate=60):
        result = await runner.execute()

    assert result.data["throughput_limit_rps"] is None
    assert "Throughput is not judged" in runner.lines[1]


async def test_environment_thresholds_override(saas: SaasEmulator) -> None:
    environment = environment_for(saas, scale=0.004)
    environment.monitor.thresholds = {"p95_ms": 500, "throughput_rps": 100}
    runner = Runner(environment)
    async with Load(saas, rate=60, latency_ms=(300, 400)):
        result = await runner.execute()

    assert result.data["thresholds"]["p95_ms"] == 500
    assert result.data["throughput_limit_rps"] == 10.0


async def test_unknown_query_name_fails(saas: SaasEmulator) -> None:
    environment = environment_for(saas)
    environment.monitor.queries = {"error_rate_percent": "sum:api.v2.errors.count{*}"}
    runner = Runner(environment)
    error, _ = await runner.fail()

    assert error.key == "monitor.unknown_query"
    assert "The known entries are requests, errors, p95_ms" in error.render("en")
    assert len(runner.traffic.calls) == 1


# --- Fault switches of the v2 service ---------------------------------------------


def test_switch_file_holds_numbers(tmp_path: Path) -> None:
    assert read_switch_file(tmp_path) == {"integrity-failure": False, "v2-unhealthy": False}
    write_json_atomic(tmp_path / "switches.json", {"integrity-failure": True, "v2-error-percent": 2,
                                                   "v2-latency-ms": 0})
    assert read_switch_file(tmp_path) == {"integrity-failure": True, "v2-unhealthy": False, "v2-error-percent": 2.0}
    assert read_numeric_switches(tmp_path / "switches.json") == {"v2-error-percent": 2.0, "v2-latency-ms": 0.0}


def test_switch_values_from_command_line() -> None:
    assert parse_switch_value("v2-error-percent", "2") == 2.0
    assert parse_switch_value("v2-latency-ms", "400") == 400.0
    assert parse_switch_value("v2-latency-ms", "off") == 0.0
    assert parse_switch_value("integrity-failure", "on") is True
    for name, text in (("v2-error-percent", "150"), ("v2-error-percent", "on"), ("v2-latency-ms", "nan"),
                       ("integrity-failure", "2")):
        with pytest.raises(UsageError):
            parse_switch_value(name, text)


def test_fault_switches_read_at_most_every_half_second(tmp_path: Path) -> None:
    path = tmp_path / "switches.json"
    now = [100.0]
    switches = FaultSwitches(path, clock=lambda: now[0])
    switches.refresh()
    assert switches.error_percent == 0

    write_json_atomic(path, {"v2-error-percent": 2})
    now[0] += 0.3
    switches.refresh()
    assert switches.error_percent == 0
    now[0] += 0.3
    switches.refresh()
    assert switches.error_percent == 2

    path.write_text("{not json", encoding="utf-8")
    now[0] += 0.6
    switches.refresh()
    assert switches.error_percent == 2


def test_latency_switch_sets_p95(tmp_path: Path) -> None:
    path = tmp_path / "switches.json"
    write_json_atomic(path, {"v2-latency-ms": 400})
    switches = FaultSwitches(path)
    switches.refresh()
    random.seed(7)
    delays = sorted(switches.next_delay_seconds() * 1000 for _ in range(4000))
    p95 = delays[int(len(delays) * 0.95) - 1]
    assert 385 <= p95 <= 415
    assert delays[0] >= 200


async def start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_v2_service_obeys_switches(tmp_path: Path) -> None:
    switches = tmp_path / "switches.json"
    write_json_atomic(switches, {"v2-error-percent": 2})
    v2, v2_url = await start_app(create_app("v2", switches))
    v1, v1_url = await start_app(create_app("v1", switches))
    try:
        async with aiohttp.ClientSession() as session:
            async def statuses(url: str, count: int) -> list[int]:
                results = []
                for _ in range(count):
                    async with session.get(url) as response:
                        results.append(response.status)
                return results

            assert (await statuses(v2_url + "/v2/anything", 100)).count(500) == 2
            assert set(await statuses(v2_url + "/v2/health", 60)) == {200}
            assert set(await statuses(v1_url + "/v1/anything", 100)) == {200}

            write_json_atomic(switches, {"v2-latency-ms": 100})
            await asyncio.sleep(0.6)

            async def timed(url: str) -> float:
                started = time.monotonic()
                async with session.get(url) as response:
                    assert response.status == 200
                return (time.monotonic() - started) * 1000

            # The first request after the reload interval reads the new values.
            await timed(v2_url + "/v2/anything")
            latencies = sorted(await asyncio.gather(*(timed(v2_url + "/v2/anything") for _ in range(60))))
            # Every response waits at least half the value; the p95 itself is checked without HTTP below.
            assert latencies[0] >= 48
            assert latencies[int(len(latencies) * 0.95) - 1] <= 300
            assert max(await asyncio.gather(*(timed(v1_url + "/v1/anything") for _ in range(20)))) < 50
    finally:
        await v2.cleanup()
        await v1.cleanup()


async def load_service(saas: SaasEmulator, url: str, workers: int = 4) -> Callable[[], Awaitable[None]]:
    """Start workers that call the service and record each request like a load generator; return a stop function."""
    session = aiohttp.ClientSession()

    async def worker() -> None:
        while True:
            started = time.monotonic()
            async with session.get(url) as response:
                await response.read()
                status = response.status
            stamp = time.time()
            saas.datadog.record("api.v2.requests.count", 1, stamp)
            saas.datadog.record("api.v2.requests.duration", (time.monotonic() - started) * 1000, stamp)
            if status >= 500:
                saas.datadog.record("api.v2.errors.count", 1, stamp)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()

    return stop


async def test_monitor_catches_v2_switch(saas: SaasEmulator, tmp_path: Path) -> None:
    switches = tmp_path / "switches.json"
    service, url = await start_app(create_app("v2", switches))
    stop = await load_service(saas, url + "/v2/anything")
    try:
        runner = Runner(environment_for(saas), params={"weight_percent": 1})
        task = asyncio.create_task(runner.fail())
        await asyncio.sleep(0.5)
        write_json_atomic(switches, {"v2-error-percent": 2})
        error, seconds = await task
    finally:
        await stop()
        await service.cleanup()

    assert error.key in ("monitor.poll_breach", "monitor.window_breach")
    assert seconds < 2.5
    assert error.params["readings"]["errors"] >= 1
    assert len(runner.traffic.calls) == 1
