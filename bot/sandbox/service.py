"""The sandbox's API services, stand-ins for https://api.example.com.

Run one as `python -m bot.sandbox.service --port N [--port-file PATH]
[--api-version v1|v2]`. It binds to 127.0.0.1 only. With `--port 0` the
system picks a free port, and `--port-file` receives the port once the
service accepts connections.

The v2 service serves the runbook's /v2 endpoints. For any other path,
both versions return their version and the X-Served-By header, so a
request sent through nginx shows which backend served it.

The v2 service also obeys two numeric fault switches of the sandbox's
switch file (`--switches PATH`, by default switches.json beside the
`--port-file`), which monitor steps are tested against:

    v2-error-percent  that percentage of responses are HTTP 500; the failures
                      are spread evenly (every 50th response at 2), not random
    v2-latency-ms     each response waits a random time between 0.5 and 1.026
                      times the value, so the p95 latency is about the value

The service reads the file at most every 0.5 seconds, on the first request
after that time, so a change takes effect within a second under load. The
health endpoint /v2/health is not affected by these two, so health checks
still pass while traffic shows the fault. Only the boolean switch
`v2-unhealthy` fails it, with HTTP 503. The v1 service ignores the switches.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web

from bot.errors import PostmergeError
from bot.sandbox._state import read_service_switches

logger = logging.getLogger("bot.sandbox.service")

HOST = "127.0.0.1"
VERSION = "2.0.0"
VERSIONS = {"v1": "1.9.0", "v2": VERSION}

# How long the service uses the switch values it read before it reads the file again.
SWITCH_RELOAD_SECONDS = 0.5
# The delay of v2-latency-ms is uniform between these multiples of the value. The
# 95th percentile of that is 0.5 + 0.95 * (1.0263 - 0.5) = 1.0 times the value.
LATENCY_SPREAD = (0.5, 1.0263)
# The path the sandbox polls to see that the service is up. No fault switch affects it.
READY_PATH = "/_sandbox/ready"
UNAFFECTED_PATHS = frozenset({"/v2/health", READY_PATH})


class FaultSwitches:
    """The v2 fault switch values, read from the switch file at most every SWITCH_RELOAD_SECONDS."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self.error_percent = 0.0
        self.latency_ms = 0.0
        self.unhealthy = False
        self._read_at: float | None = None
        self._last_problem: str | None = None
        # Failures owed so far: each response adds error_percent / 100, and a response
        # fails whenever the sum reaches 1, so the failures are evenly spread.
        self._error_credit = 0.0

    def refresh(self) -> None:
        """Read the switch file again if the values are older than SWITCH_RELOAD_SECONDS."""
        now = self.clock()
        if self.path is None or (self._read_at is not None and now - self._read_at < SWITCH_RELOAD_SECONDS):
            return
        self._read_at = now
        try:
            values, unhealthy = read_service_switches(self.path)
        except PostmergeError as error:
            problem = str(error)
            if problem != self._last_problem:
                # Logged once per distinct problem; the previous values stay in effect.
                logger.warning("cannot read the switch file %s, keeping the previous values: %s", self.path, problem)
                self._last_problem = problem
            return
        self._last_problem = None
        if unhealthy != self.unhealthy:
            logger.info("fault switch changed: v2-unhealthy=%s", unhealthy)
        self.unhealthy = unhealthy
        error_percent, latency_ms = values["v2-error-percent"], values["v2-latency-ms"]
        if (error_percent, latency_ms) != (self.error_percent, self.latency_ms):
            logger.info("fault switches changed: v2-error-percent=%g v2-latency-ms=%g", error_percent, latency_ms)
            if error_percent != self.error_percent:
                self._error_credit = 0.0
        self.error_percent, self.latency_ms = error_percent, latency_ms

    def next_fails(self) -> bool:
        """Return whether the next response is an injected HTTP 500."""
        if self.error_percent <= 0:
            return False
        self._error_credit += self.error_percent / 100
        if self._error_credit >= 1 - 1e-9:
            self._error_credit -= 1
            return True
        return False

    def next_delay_seconds(self) -> float:
        if self.latency_ms <= 0:
            return 0.0
        return random.uniform(*LATENCY_SPREAD) * self.latency_ms / 1000


USER_IDS = web.AppKey("user_ids", itertools.count)
API_VERSION = web.AppKey("api_version", str)
FAULTS = web.AppKey("faults", FaultSwitches)


def create_app(api_version: str = "v2", switches_file: Path | None = None) -> web.Application:
    """Return the app of one API version; v2 obeys the fault switches of switches_file."""
    middlewares = [served_by]
    if api_version == "v2":
        middlewares.append(injected_faults)
    app = web.Application(middlewares=middlewares)
    app[USER_IDS] = itertools.count(1)
    app[API_VERSION] = api_version
    if api_version == "v2":
        app[FAULTS] = FaultSwitches(switches_file)
    if api_version == "v2":
        app.router.add_get("/v2/health", handle_health)
        app.router.add_get(READY_PATH, handle_ready)
        app.router.add_get("/v2/version", handle_version)
        app.router.add_post("/v2/users", handle_create_user)
    else:
        app.router.add_get("/v1/health", handle_health)
    app.router.add_route("*", "/{path:.*}", handle_any)
    return app


@web.middleware
async def served_by(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers["X-Served-By"] = request.app[API_VERSION]
    return response


@web.middleware
async def injected_faults(request: web.Request, handler) -> web.StreamResponse:
    """Delay or fail a v2 response as the fault switches set it. The v1 app has no such middleware."""
    if request.path in UNAFFECTED_PATHS:
        return await handler(request)
    faults = request.app[FAULTS]
    faults.refresh()
    delay = faults.next_delay_seconds()
    if delay:
        await asyncio.sleep(delay)
    if faults.next_fails():
        return _error_response(500, "internal_error",
                               "Internal server error (injected by the sandbox switch v2-error-percent).")
    return await handler(request)


async def handle_any(request: web.Request) -> web.Response:
    api_version = request.app[API_VERSION]
    return web.json_response({"version": VERSIONS[api_version], "served_by": api_version, "path": request.path})


async def handle_health(request: web.Request) -> web.Response:
    faults = request.app.get(FAULTS)
    if faults is not None:
        faults.refresh()
        if faults.unhealthy:
            return web.json_response({"status": "unavailable", "version": VERSIONS[request.app[API_VERSION]],
                                      "detail": "injected by the sandbox switch v2-unhealthy"}, status=503)
    return web.json_response({"status": "ok", "version": VERSIONS[request.app[API_VERSION]]})


async def handle_ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": VERSIONS[request.app[API_VERSION]]})


async def handle_version(request: web.Request) -> web.Response:
    return web.json_response({"version": VERSIONS[request.app[API_VERSION]]})


async def handle_create_user(request: web.Request) -> web.Response:
    """Create a user in memory and return it in the v2 response format."""
    try:
        body = await request.json()
    except ValueError:
        return _error_response(400, "invalid_json", "The request body is not valid JSON.")

    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name.strip():
        return _error_response(422, "invalid_name", "The field 'name' must be a non-empty string.")

    user = {
        "id": next(request.app[USER_IDS]),
        "name": name.strip(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return web.json_response({"data": user, "meta": {"version": "2"}}, status=201)


def _error_response(status: int, code: str, detail: str) -> web.Response:
    body = {"errors": [{"code": code, "detail": detail}], "meta": {"version": "2"}}
    return web.json_response(body, status=status)


async def serve(port: int, port_file: Path | None, api_version: str = "v2",
                switches_file: Path | None = None) -> None:
    """Serve until SIGTERM or SIGINT, writing the bound port to port_file once listening."""
    if switches_file is None and port_file is not None:
        # The sandbox keeps the port file and switches.json in its root folder.
        switches_file = port_file.parent / "switches.json"
    if api_version == "v2" and switches_file is not None:
        logger.info("v2 service reads fault switches from %s", switches_file)
    runner = web.AppRunner(create_app(api_version, switches_file))
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise

    bound_port = runner.addresses[0][1]
    if port_file is not None:
        # Write then rename, so a reader never sees a partial number.
        partial = port_file.with_name(port_file.name + ".tmp")
        partial.write_text(f"{bound_port}\n", encoding="utf-8")
        os.replace(partial, port_file)
    logger.info("%s service listening on http://%s:%d (pid %d)", api_version, HOST, bound_port, os.getpid())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    logger.info("%s service stopping (pid %d)", api_version, os.getpid())
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.sandbox.service", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1; 0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="file that receives the bound port once listening")
    parser.add_argument("--api-version", choices=sorted(VERSIONS), default="v2", help="which API to serve")
    parser.add_argument("--switches", type=Path,
                        help="JSON switch file of the v2 fault switches (default: switches.json beside --port-file)")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(args.port, args.port_file, args.api_version, args.switches))
    except OSError as error:
        logger.error("%s service failed to listen on %s:%d: %s", args.api_version, HOST, args.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
