"""HttpExecutor against a real aiohttp server on 127.0.0.1, and parse_curl on the runbook's curl lines."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bot.config import Environment
from bot.errors import StepError
from bot.plan import Step
from steps.base import OutputBuffer, StepContext
from steps.http import CurlRequest, HttpExecutor, find_json_mismatch, parse_curl

PUBLIC_API = "https://api.example.com"

RUNBOOK_POST = """curl -X POST https://api.example.com/v2/users \\
    -H "Content-Type: application/json" \\
    -d '{"name": "Test User"}'"""


class FakeApi:
    """An API on 127.0.0.1 whose health turns ok a set time after it starts."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.healthy_after_seconds = 0.0
        self.requests: list[dict] = []
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v2/health", self.health)
        app.router.add_get("/v2/slow", self.slow)
        app.router.add_get("/v2/broken", self.broken)
        app.router.add_get("/v2/text", self.text)
        app.router.add_get("/v2/big", self.big)
        app.router.add_post("/v2/users", self.create_user)
        self.app = app
        self.base_url = ""

    async def health(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path})
        if time.monotonic() - self.started < self.healthy_after_seconds:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response(
            {"status": "ok", "version": "2.0.0", "checks": [{"name": "db", "ok": True}], "uptime": 12}
        )

    async def slow(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path})
        await self.release.wait()
        return web.json_response({"status": "ok"})

    async def broken(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path})
        return web.Response(status=500, text="internal error")

    async def text(self, request: web.Request) -> web.Response:
        return web.Response(text="<html>not the API</html>")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(text="あ" * 5000)

    async def create_user(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.requests.append({"path": request.path, "body": body, "headers": request.headers.copy()})
        return web.json_response({"id": 1, **json.loads(body)}, status=201)


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    runner = web.AppRunner(fake.app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base_url = f"http://127.0.0.1:{port}"
    yield fake
    fake.release.set()
    await runner.cleanup()


def make_context(step: Step, base_url: str, tmp_path: Path, timeout: float = 5.0) -> StepContext:
    environment = Environment(name="test", workdir=tmp_path, url_rewrites={PUBLIC_API: base_url})
    return StepContext(
        run_id="run-1",
        step=step,
        environment=environment,
        artifacts_dir=tmp_path,
        output=OutputBuffer(limit_bytes=1_000_000),
        timeout_seconds=timeout,
    )


def http_step(path: str, **fields) -> Step:
    return Step(id="s1", title="health check", kind="http", source_line=1, url=f"{PUBLIC_API}{path}", **fields)


def closed_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


async def test_http_get_success(api: FakeApi, tmp_path: Path) -> None:
    context = make_context(http_step("/v2/health"), api.base_url, tmp_path)

    result = await HttpExecutor().execute(context)

    assert result.ok
    assert result.data["status"] == 200
    assert result.data["attempts"] == 1
    assert result.data["url"] == f"{api.base_url}/v2/health"
    output = context.output.text()
    assert f"GET {api.base_url}/v2/health -> 200 in " in output
    assert '"version": "2.0.0"' in output


async def test_http_json_subset_matches(api: FakeApi, tmp_path: Path) -> None:
    step = http_step("/v2/health", expect_json={"status": "ok", "version": "2.0.0", "checks": [{"ok": True}]})
    context = make_context(step, api.base_url, tmp_path)

    result = await HttpExecutor().execute(context)

    assert result.ok
    assert result.data["attempts"] == 1


async def test_http_json_mismatch_names_path(api: FakeApi, tmp_path: Path) -> None:
    step = http_step("/v2/health", expect_json={"status": "ok", "version": "2.1.0"})
    context = make_context(step, api.base_url, tmp_path, timeout=1.0)

    with pytest.raises(StepError) as caught:
        await HttpExecutor().execute(context)

    error = caught.value
    assert error.key == "http.json_mismatch"
    assert error.params["path"] == "$.version"
    assert error.params["expected"] == '"2.1.0"'
    assert error.params["actual"] == '"2.0.0"'
    assert error.params["attempts"] > 1
    message = error.render("en")
    assert f"{api.base_url}/v2/health" in message
    assert "$.version" in message


async def test_http_body_not_json(api: FakeApi, tmp_path: Path) -> None:
    step = http_step("/v2/text", expect_json={"status": "ok"})
    context = make_context(step, api.base_url, tmp_path, timeout=0.6)

    with pytest.raises(StepError) as caught:
        await HttpExecutor().execute(context)

    assert caught.value.key == "http.not_json"
    assert caught.value.params["status"] == 200


async def test_http_becomes_healthy_after_two_seconds(api: FakeApi, tmp_path: Path) -> None:
    api.healthy_after_seconds = 2.0
    step = http_step("/v2/health", expect_json={"status": "ok", "version": "2.0.0"})
    context = make_context(step, api.base_url, tmp_path, timeout=5.0)
    started = time.monotonic()

    result = await HttpExecutor().execute(context)

    elapsed = time.monotonic() - started
    assert result.ok
    assert result.data["attempts"] >= 3
    assert 2.0 <= elapsed < 5.0
    output = context.output.text()
    assert "-> 503 in " in output
    assert "-> 200 in " in output


async def test_http_timeout_message(api: FakeApi, tmp_path: Path) -> None:
    context = make_context(http_step("/v2/slow"), api.base_url, tmp_path, timeout=1.0)
    started = time.monotonic()

    with pytest.raises(StepError) as caught:
        await HttpExecutor().execute(context)

    elapsed = time.monotonic() - started
    assert elapsed < 1.5
    error = caught.value
    assert error.key == "http.timed_out"
    assert error.params["attempts"] == 1
    assert error.params["timeout"] == 1.0
    message = error.render("en")
    assert f"GET {api.base_url}/v2/slow did not respond within the step's timeout of 1.0 s" in message
    assert "タイムアウト 1.0 秒" in error.render("ja")


async def test_http_error_before_engine_timeout(api: FakeApi, tmp_path: Path) -> None:
    context = make_context(http_step("/v2/slow"), api.base_url, tmp_path, timeout=1.0)

    with pytest.raises(StepError) as caught:
        async with asyncio.timeout(context.timeout_seconds):
            await HttpExecutor().execute(context)

    assert caught.value.key == "http.timed_out"


async def test_http_connection_refused(tmp_path: Path) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}"
    context = make_context(http_step("/v2/health"), base_url, tmp_path, timeout=1.5)
    started = time.monotonic()

    with pytest.raises(StepError) as caught:
        await HttpExecutor().execute(context)

    elapsed = time.monotonic() - started
    assert elapsed < 1.6
    error = caught.value
    assert error.key == "http.connection_failed"
    assert error.params["attempts"] >= 2
    assert error.params["url"] == f"{base_url}/v2/health"
    assert "Connect" in error.params["error"]


async def test_http_500_stays_500(api: FakeApi, tmp_path: Path) -> None:
    context = make_context(http_step("/v2/broken"), api.base_url, tmp_path, timeout=2.0)
    started = time.monotonic()

    with pytest.raises(StepError) as caught:
        await HttpExecutor().execute(context)

    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 2.1
    error = caught.value
    assert error.key == "http.unexpected_status"
    assert error.params["status"] == 500
    assert error.params["expected"] == "2xx"
    assert error.params["attempts"] == len(api.requests)
    assert error.params["attempts"] >= 3
    assert "internal error" in context.output.text()


async def test_http_expect_status_accepts_500(api: FakeApi, tmp_path: Path) -> None:
    context = make_context(http_step("/v2/broken", expect_status=500), api.base_url, tmp_path)

    result = await HttpExecutor().execute(context)

    assert result.data["status"] == 500


async def test_http_post_json_with_headers(api: FakeApi, tmp_path: Path) -> None:
    request = parse_curl(RUNBOOK_POST)
    step = http_step(
        "/v2/users",
        method=request.method,
        headers={**request.headers, "X-Request-Id": "abc"},
        body=request.body,
        expect_json={"name": "Test User"},
    )
    context = make_context(step, api.base_url, tmp_path)

    result = await HttpExecutor().execute(context)

    assert result.data["status"] == 201
    assert len(api.requests) == 1
    received = api.requests[0]
    assert received["body"] == '{"name": "Test User"}'
    assert received["headers"]["Content-Type"] == "application/json"
    assert received["headers"]["X-Request-Id"] == "abc"


async def test_http_post_not_retried_on_status(api: FakeApi, tmp_path: Path) -> None:
    step = http_step("/v2/users", method="POST", body='{"name": "x"}', expect_status=200)
    context = make_context(step, api.base_url, tmp_path)

    with pytest.raises(StepError) as caught:
        await HttpExecutor().execute(context)

    assert caught.value.key == "http.unexpected_status"
    assert caught.value.params["attempts"] == 1
    assert len(api.requests) == 1


async def test_http_long_body_cut(api: FakeApi, tmp_path: Path) -> None:
    context = make_context(http_step("/v2/big"), api.base_url, tmp_path)

    await HttpExecutor().execute(context)

    lines = context.output.text().splitlines()
    assert "あ" * 2000 in lines
    assert "... 3000 more characters not shown" in lines


def test_http_repeat_safe_by_method() -> None:
    executor = HttpExecutor()

    assert executor.repeat_safe(http_step("/v2/health"))
    assert executor.repeat_safe(http_step("/v2/health", method="head"))
    assert not executor.repeat_safe(http_step("/v2/users", method="POST"))


@pytest.mark.parametrize(
    ("expected", "actual", "path"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, None),
        ({"a": {"b": [1, {"c": "x"}]}}, {"a": {"b": [1, {"c": "x", "d": 0}]}}, None),
        ({"a": {"b": [1, {"c": "x"}]}}, {"a": {"b": [1, {"c": "y"}]}}, "$.a.b[1].c"),
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, "$.a.length"),
        ({"a": 1}, {"b": 1}, "$.a"),
        ({"a": True}, {"a": 1}, "$.a"),
        ({"a": 1}, {"a": 1.0}, None),
        ({"a.b": 1}, {"a.b": 2}, '$["a.b"]'),
        ({"a": 1}, [1], "$"),
    ],
)
def test_json_subset_cases(expected: object, actual: object, path: str | None) -> None:
    mismatch = find_json_mismatch(expected, actual)

    assert (mismatch.path if mismatch else None) == path


def test_parse_curl_runbook_health() -> None:
    request = parse_curl("curl https://api.example.com/v2/health")

    assert request == CurlRequest(method="GET", url="https://api.example.com/v2/health")


def test_parse_curl_runbook_fail_flag() -> None:
    request = parse_curl("curl -f https://api.example.com/v2/health")

    assert request.method == "GET"
    assert request.url == "https://api.example.com/v2/health"
    assert request.fail_on_http_error


def test_parse_curl_runbook_post_continuations() -> None:
    request = parse_curl(RUNBOOK_POST)

    assert request.method == "POST"
    assert request.url == "https://api.example.com/v2/users"
    assert request.headers == {"Content-Type": "application/json"}
    assert request.body == '{"name": "Test User"}'
    assert not request.fail_on_http_error


def test_parse_curl_data_implies_post() -> None:
    request = parse_curl("curl -sS -d 'a=1' --data-raw 'b=@2' http://127.0.0.1/x")

    assert request.method == "POST"
    assert request.body == "a=1&b=@2"


def test_parse_curl_grouped_flags() -> None:
    request = parse_curl("curl -fsSL -XPUT -m 30 -i --header 'X-A: 1' http://127.0.0.1/x")

    assert request.method == "PUT"
    assert request.fail_on_http_error
    assert request.max_time_seconds == 30.0
    assert request.headers == {"X-A": "1"}


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ("curl -k https://api.example.com/v2/health", "-k"),
        ("curl -sk https://api.example.com/v2/health", "-k"),
        ("curl --insecure https://api.example.com/v2/health", "--insecure"),
        ("curl -o out.json https://api.example.com/v2/health", "-o"),
        ("curl -d @body.json https://api.example.com/v2/users", "@body.json"),
    ],
)
def test_parse_curl_unsupported_option(command: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_curl(command)


def test_parse_curl_not_curl() -> None:
    with pytest.raises(ValueError, match="not a curl command"):
        parse_curl("wget https://api.example.com/v2/health")
