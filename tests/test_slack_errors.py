"""Sentry reporting of the bot's exceptions, against a local Sentry envelope endpoint."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from aiohttp import web

from bot.slack.errors import scrub_event


def test_scrub_event_masks_tokens():
    event = {"exception": {"values": [{"value": "auth failed for xoxb-1234567890-secret"}]},
             "extra": {"url": "postgresql://app:hunter2@db/app"}}
    scrubbed = scrub_event(event)
    assert "xoxb-1234567890" not in json.dumps(scrubbed)
    assert "hunter2" not in json.dumps(scrubbed)


async def test_exception_reaches_sentry_without_secret(tmp_path):
    received: list[bytes] = []

    async def envelope(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/api/1/envelope/", envelope)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    code = (
        "import logging\n"
        "from bot.slack.errors import init_error_reporting\n"
        "import sentry_sdk\n"
        "assert init_error_reporting(['xoxb-configured-token-1'])\n"
        "try:\n"
        "    raise RuntimeError('Slack said invalid_auth for xoxb-configured-token-1')\n"
        "except RuntimeError as error:\n"
        "    sentry_sdk.capture_exception(error)\n"
        "try:\n"
        "    raise RuntimeError('connection to postgresql://app:hunter2@db/app failed')\n"
        "except RuntimeError as error:\n"
        "    sentry_sdk.capture_exception(error)\n"
        "sentry_sdk.flush(5)\n"
    )
    env = {"SENTRY_DSN": f"http://publickey@127.0.0.1:{port}/1", "PATH": "/usr/bin:/bin"}
    try:
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env,
                                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, output.decode()
    finally:
        await runner.cleanup()
    body = b"".join(received).decode("utf-8", "replace")
    assert "RuntimeError" in body
    assert "hunter2" not in body
    assert "xoxb-configured-token-1" not in body
