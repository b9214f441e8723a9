"""The sandbox's v2 API service, a stand-in for https://api.example.com/v2.

Run it as `python -m bot.sandbox.service --port N [--port-file PATH]`. It
binds to 127.0.0.1 only. With `--port 0` the system picks a free port, and
`--port-file` receives the port once the service accepts connections.
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

USER_IDS = web.AppKey("user_ids", itertools.count)


def create_app() -> web.Application:
    app = web.Application()
    app[USER_IDS] = itertools.count(1)
    app.router.add_get("/v2/health", handle_health)
    app.router.add_get("/v2/version", handle_version)
    app.router.add_post("/v2/users", handle_create_user)
    return app


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": VERSION})


async def handle_version(request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION})


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


async def serve(port: int, port_file: Path | None) -> None:
    """Serve until SIGTERM or SIGINT, writing the bound port to port_file once listening."""
    runner = web.AppRunner(create_app())
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
    logger.info("v2 service listening on http://%s:%d (pid %d)", HOST, bound_port, os.getpid())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    logger.info("v2 service stopping (pid %d)", os.getpid())
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.sandbox.service", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1; 0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="file that receives the bound port once listening")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(args.port, args.port_file))
    except OSError as error:
        logger.error("v2 service failed to listen on %s:%d: %s", HOST, args.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
