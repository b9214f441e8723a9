"""The sandbox's load generator: steady requests through nginx, counted by the backend that served them.

Run it as a sandbox service:

    python -m bot.sandbox.loadgen --url http://127.0.0.1:P/api/users --rate 200
        [--concurrency 64] [--timeout 5] [--keepalive]
        [--datadog-control http://127.0.0.1:Q/_emulator] [--tag env:sandbox]
        [--port 0] [--port-file FILE]

or in-process (tests):

    async with LoadGenerator(url, rate=200) as load:
        load.reset(); await load.wait_for_responses(2000); load.stats()

It sends GET requests to --url at --rate requests per second, with at most
--concurrency requests in flight; when all are in flight the rate drops
rather than queueing without bound (`behind` counts the requests it gave
up on). Redirects are not followed and proxy settings of the process
environment are ignored. Every URL it is given must point at 127.0.0.1, and
it sends nothing anywhere else.

Keep-alive is off by default, so each request opens its own connection and
is routed by the weights nginx has when it arrives. It also means that no
request is lost when an nginx reload closes an idle kept-alive connection
just as a request is sent on it. --keepalive reuses connections instead.

For each response it records the status, the latency and the X-Served-By
header (v1, v2, or "unknown" when absent, such as nginx's own 502). A
request without a response (refused connection, timeout, closed
connection) is a failure.

Datadog: with --datadog-control, once a second it posts the finished
seconds to the Datadog emulator's control endpoint
`POST <control>/datadog/series` as {"points": [{"metric", "value",
"timestamp", "tags"}]}, for each of v1 and v2 (VERSION):

    api.VERSION.requests.count     one point per second: the responses VERSION served
    api.VERSION.requests.duration  one point per response: its latency in ms
                                   (so p95:api.v2.requests.duration{*} is exact)
    api.VERSION.errors.count       one point per second: VERSION's 5xx responses

Timestamps are the Unix second the responses finished in; tags are
["service:api", "version:VERSION"] plus each --tag. Counts of 0 are posted
too, so a backend that gets no traffic reads 0, not "no data". Seconds
that could not be posted are tried again, up to the last 60.

Control HTTP server on 127.0.0.1:--port (the bound port goes to --port-file):

    GET  /stats   counts since the last reset (see LoadGenerator.stats)
    POST /reset   start counting again; returns the counts before the reset
    POST /rate    {"rate": N} changes the target rate
    GET  /health  {"status": "ok"}
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

logger = logging.getLogger("bot.sandbox.loadgen")

HOST = "127.0.0.1"
BACKENDS = ("v1", "v2")
UNKNOWN = "unknown"
TICK_SECONDS = 0.005
FLUSH_SECONDS = 1.0
# Finished seconds kept for the per-second split and for posts that failed.
KEPT_SECONDS = 60
# Latencies kept per backend for the percentiles in /stats.
KEPT_LATENCIES = 100_000
STOP_GRACE_SECONDS = 2.0


def check_local_url(url: str, what: str) -> str:
    """Return the URL when it is http(s) to 127.0.0.1, else raise ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname != HOST:
        raise ValueError(f"{what} must be an http URL on {HOST}, not {url!r}")
    return url


@dataclass
class _Second:
    """The responses and failures that finished in one Unix second."""

    counts: dict[str, int] = field(default_factory=lambda: {name: 0 for name in (*BACKENDS, UNKNOWN)})
    errors: dict[str, int] = field(default_factory=lambda: {name: 0 for name in (*BACKENDS, UNKNOWN)})
    durations: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in BACKENDS})
    failures: int = 0


@dataclass
class _Totals:
    started: float = field(default_factory=time.time)
    sent: int = 0
    behind: int = 0
    responses: dict[str, int] = field(default_factory=lambda: {name: 0 for name in (*BACKENDS, UNKNOWN)})
    errors: dict[str, int] = field(default_factory=lambda: {name: 0 for name in (*BACKENDS, UNKNOWN)})
    statuses: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    last_failure: str | None = None
    latencies: dict[str, deque] = field(
        default_factory=lambda: {name: deque(maxlen=KEPT_LATENCIES) for name in (*BACKENDS, UNKNOWN)})


class LoadGenerator:
    """Steady GET requests to one URL on 127.0.0.1, counted by X-Served-By."""

    def __init__(self, url: str, rate: float = 200.0, *, concurrency: int = 64, timeout: float = 5.0,
                 keepalive: bool = False, datadog_control: str | None = None, tags: list[str] | None = None) -> None:
        self.url = check_local_url(url, "--url")
        self.datadog_control = (check_local_url(datadog_control, "--datadog-control").rstrip("/")
                                if datadog_control else None)
        if rate <= 0 or concurrency < 1:
            raise ValueError("rate must be above 0 and concurrency at least 1")
        self.rate = float(rate)
        self.concurrency = concurrency
        self.timeout = timeout
        self.keepalive = keepalive
        self.tags = list(tags or [])
        self.totals = _Totals()
        self.seconds: dict[int, _Second] = {}
        self.posted_points = 0
        self.post_failures = 0
        self.last_post_error: str | None = None
        self._posted_until = 0
        self._failing_since: float | None = None
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._session: Any = None
        self._runner: asyncio.Task | None = None
        self._flusher: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None

    # Life cycle ---------------------------------------------------------------

    async def __aenter__(self) -> LoadGenerator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=not self.keepalive)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        self._slots = asyncio.Semaphore(self.concurrency)
        self._runner = asyncio.create_task(self._run())
        self._flusher = asyncio.create_task(self._flush_loop())

    async def stop(self) -> None:
        """Stop sending, let requests in flight finish (briefly), post what is left and close."""
        for task in (self._runner, self._flusher):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._runner = self._flusher = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.datadog_control and self._session is not None:
            await self._post(final=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # Counts -------------------------------------------------------------------

    def reset(self) -> dict[str, Any]:
        """Start counting again and return the counts before the reset."""
        before = self.stats()
        self.totals = _Totals()
        return before

    def completed(self) -> int:
        return sum(self.totals.responses.values()) + sum(self.totals.failures.values())

    async def wait_for_responses(self, count: int, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until `count` requests finished since the last reset and return the stats."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.completed() < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"only {self.completed()} of {count} requests finished in {timeout} s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Return the counts since the last reset.

            responses   by X-Served-By: v1, v2, unknown
            errors      5xx responses by backend
            statuses    responses by status code
            failures    requests without a response by kind: connect,
                        timeout, disconnected, other
            failed      the sum of failures
            v2_share    v2's fraction of the responses from v1 or v2
            latency_ms  count, p50, p95, p99 and max by backend
            per_second  the last finished seconds with their split
        """
        totals = self.totals
        served = totals.responses["v1"] + totals.responses["v2"]
        now = int(time.time())
        per_second = [
            {"second": second, **{name: bucket.counts[name] for name in (*BACKENDS, UNKNOWN)},
             "errors": sum(bucket.errors.values()), "failures": bucket.failures}
            for second, bucket in sorted(self.seconds.items()) if second >= totals.started - 1 and second < now
        ][-KEPT_SECONDS:]
        return {
            "url": self.url,
            "rate": self.rate,
            "concurrency": self.concurrency,
            "keepalive": self.keepalive,
            "since": totals.started,
            "seconds": round(time.time() - totals.started, 3),
            "sent": totals.sent,
            "in_flight": len(self._tasks),
            "behind": totals.behind,
            "completed": self.completed(),
            "responses": dict(totals.responses),
            "errors": dict(totals.errors),
            "statuses": dict(sorted(totals.statuses.items())),
            "failures": dict(totals.failures),
            "failed": sum(totals.failures.values()),
            "last_failure": totals.last_failure,
            "v2_share": round(totals.responses["v2"] / served, 4) if served else None,
            "latency_ms": {name: _percentiles(values) for name, values in totals.latencies.items() if values},
            "per_second": per_second,
            "datadog": {"control": self.datadog_control, "posted_points": self.posted_points,
                        "post_failures": self.post_failures, "last_error": self.last_post_error},
        }

    # Sending ------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        scheduled = 0
        while True:
            due = math.floor((loop.time() - started) * self.rate) - scheduled
            # After a stall, give up on more than one second of backlog instead of bursting.
            if due > self.rate:
                skipped = due - math.ceil(self.rate)
                self.totals.behind += skipped
                scheduled += skipped
                due -= skipped
            for _ in range(max(due, 0)):
                await self._slots.acquire()
                scheduled += 1
                self.totals.sent += 1
                task = asyncio.create_task(self._one())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(TICK_SECONDS)

    async def _one(self) -> None:
        import aiohttp

        loop = asyncio.get_running_loop()
        begun = loop.time()
        try:
            async with self._session.get(self.url, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                await response.read()
                status = response.status
                backend = response.headers.get("X-Served-By", UNKNOWN)
        except aiohttp.ClientConnectorError as error:
            self._fail("connect", error)
        except asyncio.TimeoutError as error:
            self._fail("timeout", error)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as error:
            self._fail("disconnected", error)
        except aiohttp.ClientError as error:
            self._fail("other", error)
        else:
            self._record(backend if backend in BACKENDS else UNKNOWN, status, (loop.time() - begun) * 1000)
        finally:
            self._slots.release()
            self._changed.set()

    def _record(self, backend: str, status: int, latency_ms: float) -> None:
        totals = self.totals
        totals.responses[backend] += 1
        totals.statuses[str(status)] = totals.statuses.get(str(status), 0) + 1
        totals.latencies[backend].append(latency_ms)
        bucket = self._bucket()
        bucket.counts[backend] += 1
        if backend in BACKENDS:
            bucket.durations[backend].append(round(latency_ms, 3))
        if status >= 500:
            totals.errors[backend] += 1
            bucket.errors[backend] += 1

    def _fail(self, kind: str, error: BaseException) -> None:
        self.totals.failures[kind] = self.totals.failures.get(kind, 0) + 1
        self.totals.last_failure = f"{kind}: {type(error).__name__}: {error}"[:300]
        self._bucket().failures += 1

    def _bucket(self) -> _Second:
        second = int(time.time())
        bucket = self.seconds.get(second)
        if bucket is None:
            bucket = self.seconds[second] = _Second()
            for old in [key for key in self.seconds if key < second - KEPT_SECONDS]:
                del self.seconds[old]
        return bucket

    # Datadog ------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if self.datadog_control:
                await self._post()

    def _points(self, final: bool) -> tuple[list[dict[str, Any]], int]:
        now = int(time.time())
        points: list[dict[str, Any]] = []
        last = self._posted_until
        for second, bucket in sorted(self.seconds.items()):
            if second < self._posted_until or (second >= now and not final):
                continue
            for name in BACKENDS:
                tags = ["service:api", f"version:{name}", *self.tags]
                points.append({"metric": f"api.{name}.requests.count", "value": bucket.counts[name],
                               "timestamp": second, "tags": tags})
                points.append({"metric": f"api.{name}.errors.count", "value": bucket.errors[name],
                               "timestamp": second, "tags": tags})
                points.extend({"metric": f"api.{name}.requests.duration", "value": value,
                               "timestamp": second, "tags": tags} for value in bucket.durations[name])
            last = second + 1
        return points, last

    async def _post(self, final: bool = False) -> None:
        import aiohttp

        points, until = self._points(final)
        if not points:
            return
        try:
            async with self._session.post(f"{self.datadog_control}/datadog/series", json={"points": points},
                                          allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                body = await response.text()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {body[:200]}")
        except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as error:
            self.post_failures += 1
            self.last_post_error = f"{type(error).__name__}: {error}"[:300]
            # One line when posting starts failing, then one a minute while it keeps failing.
            if self._failing_since is None or self.post_failures % 60 == 0:
                logger.warning("could not post %d points to %s (failure %d): %s", len(points),
                               self.datadog_control, self.post_failures, error)
            self._failing_since = self._failing_since or time.time()
            return
        if self._failing_since is not None:
            logger.info("posting points to %s works again", self.datadog_control)
            self._failing_since = None
        self.posted_points += len(points)
        self._posted_until = until


def _percentiles(values: deque) -> dict[str, float]:
    ordered = sorted(values)

    def rank(percent: float) -> float:
        return round(ordered[max(math.ceil(percent / 100 * len(ordered)), 1) - 1], 3)

    return {"count": len(ordered), "p50": rank(50), "p95": rank(95), "p99": rank(99), "max": round(ordered[-1], 3)}


# Control server ---------------------------------------------------------------


def create_control_app(load: LoadGenerator) -> web.Application:
    app = web.Application()

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(load.stats())

    async def reset(request: web.Request) -> web.Response:
        return web.json_response(load.reset())

    async def rate(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            value = float(body["rate"])
            if value <= 0:
                raise ValueError("rate must be above 0")
        except (ValueError, KeyError, TypeError) as error:
            return web.json_response({"error": f"a JSON object with a positive 'rate' is required ({error})"},
                                     status=400)
        load.rate = value
        return web.json_response({"rate": value})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_post("/rate", rate)
    app.router.add_get("/health", health)
    return app


async def serve(args: argparse.Namespace) -> None:
    load = LoadGenerator(args.url, args.rate, concurrency=args.concurrency, timeout=args.timeout,
                         keepalive=args.keepalive, datadog_control=args.datadog_control, tags=args.tag)
    runner = web.AppRunner(create_control_app(load), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, args.port)
    await site.start()
    port = runner.addresses[0][1]
    if args.port_file is not None:
        # Write then rename, so a reader never sees a partial number.
        partial = args.port_file.with_name(args.port_file.name + ".tmp")
        partial.write_text(f"{port}\n", encoding="utf-8")
        os.replace(partial, args.port_file)
    await load.start()
    logger.info("load generator sending %.0f requests/s to %s; stats on http://%s:%d/stats (pid %d)",
                load.rate, load.url, HOST, port, os.getpid())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("load generator stopping (pid %d)", os.getpid())
    await load.stop()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.sandbox.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="URL on 127.0.0.1 to send GET requests to")
    parser.add_argument("--rate", type=float, default=200.0, help="target requests per second (default 200)")
    parser.add_argument("--concurrency", type=int, default=64, help="maximum requests in flight (default 64)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before a request fails (default 5)")
    parser.add_argument("--keepalive", action="store_true", help="reuse connections (default: one per request)")
    parser.add_argument("--datadog-control", help="the Datadog emulator's control URL, http://127.0.0.1:Q/_emulator")
    parser.add_argument("--tag", action="append", default=[], help="extra tag on every point, such as env:sandbox")
    parser.add_argument("--port", type=int, default=0, help="control port on 127.0.0.1; 0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="file that receives the control port once listening")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        check_local_url(args.url, "--url")
        if args.datadog_control:
            check_local_url(args.datadog_control, "--datadog-control")
    except ValueError as error:
        parser.error(str(error))
    try:
        asyncio.run(serve(args))
    except OSError as error:
        logger.error("load generator failed to listen on %s:%d: %s", HOST, args.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
