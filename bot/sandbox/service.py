"""The sandbox's API services, stand-ins for https://api.example.com.

Run one as `python -m bot.sandbox.service --port N [--port-file PATH]
[--api-version v1|v2]`. It binds to 127.0.0.1 only. With `--port 0` the
system picks a free port, and `--port-file` receives the port once the
service accepts connections.

The v2 service serves the runbook's /v2 endpoints. For any other path,
both versions return their version and the X-Served-By header, so a
request sent through nginx shows which backend served it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web

logger = logging.getLogger("bot.sandbox.service")

HOST = "127.0.0.1"
VERSION = "2.0.0"
VERSIONS = {"v1": "1.9.0", "v2": VERSION}

USER_IDS = web.AppKey("user_ids", itertools.count)
API_VERSION = web.AppKey("api_version", str)


def create_app(api_version: str = "v2") -> web.Application:
    app = web.Application(middlewares=[served_by])
    app[USER_IDS] = itertools.count(1)
    app[API_VERSION] = api_version
    if api_version == "v2":
        app.router.add_get("/v2/health", handle_health)
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


async def handle_any(request: web.Request) -> web.Response:
    api_version = request.app[API_VERSION]
    return web.json_response({"version": VERSIONS[api_version], "served_by": api_version, "path": request.path})


async def handle_health(request: web.Request) -> web.Response:
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


async def serve(port: int, port_file: Path | None, api_version: str = "v2") -> None:
    """Serve until SIGTERM or SIGINT, writing the bound port to port_file once listening."""
    runner = web.AppRunner(create_app(api_version))
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
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(args.port, args.port_file, args.api_version))
    except OSError as error:
        logger.error("%s service failed to listen on %s:%d: %s", args.api_version, HOST, args.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
