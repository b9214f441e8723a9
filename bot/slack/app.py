"""Build the slack-bolt AsyncApp and serve it over HTTP or Socket Mode."""

from __future__ import annotations

import logging

from bot.config import Settings
from bot.slack.service import SlackService, SlackSettings

log = logging.getLogger(__name__)


def build_client(slack: SlackSettings):
    from slack_sdk.http_retry.builtin_async_handlers import (
        AsyncConnectionErrorRetryHandler,
        AsyncRateLimitErrorRetryHandler,
        AsyncServerErrorRetryHandler,
    )
    from slack_sdk.web.async_client import AsyncWebClient

    client = AsyncWebClient(token=slack.slack_bot_token, base_url=slack.slack_api_url)
    client.retry_handlers.extend([
        AsyncRateLimitErrorRetryHandler(max_retry_count=3),
        AsyncServerErrorRetryHandler(max_retry_count=2),
    ])
    if not any(isinstance(handler, AsyncConnectionErrorRetryHandler) for handler in client.retry_handlers):
        client.retry_handlers.append(AsyncConnectionErrorRetryHandler())
    return client


def build_app(settings: Settings, slack: SlackSettings, store):
    from slack_bolt.async_app import AsyncApp

    import handlers.actions
    import handlers.commands
    import handlers.deliveries

    client = build_client(slack)
    app = AsyncApp(client=client, signing_secret=slack.slack_signing_secret or "socket-mode",
                   request_verification_enabled=slack.slack_app_token is None)
    service = SlackService(settings, slack, store, client)
    handlers.deliveries.register(app)
    handlers.commands.register(app, service)
    handlers.actions.register(app, service)
    return app, service


async def serve(settings: Settings, slack: SlackSettings, store, port: int) -> None:
    """Serve until cancelled: Socket Mode when SLACK_APP_TOKEN is set, else HTTP at /slack/events on the port."""
    import asyncio

    from bot.slack.errors import init_error_reporting
    from storage.store import LEASE_SECONDS

    init_error_reporting([slack.slack_bot_token, slack.slack_signing_secret, slack.slack_app_token])
    app, service = build_app(settings, slack, store)
    # Runs that were active when the bot last stopped carry on in their Slack messages.
    watcher = asyncio.create_task(service.watch_orphans(LEASE_SECONDS / 2))
    try:
        if slack.slack_app_token:
            await _serve_socket_mode(app, slack.slack_app_token)
        else:
            await _serve_http(app, port)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await service.close()


async def _serve_socket_mode(app, app_token: str) -> None:
    import asyncio

    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    handler = AsyncSocketModeHandler(app, app_token)
    await handler.connect_async()
    log.info("connected to Slack over Socket Mode")
    try:
        await asyncio.Event().wait()
    finally:
        await handler.close_async()


async def _serve_http(app, port: int) -> None:
    import asyncio

    from aiohttp import web

    runner = web.AppRunner(app.web_app(path="/slack/events", port=port))
    await runner.setup()
    # A deployed bot must be reachable by Slack, so it listens on every interface
    # unless POSTMERGE_LISTEN_HOST names one (tests use 127.0.0.1).
    site = web.TCPSite(runner, host=settings_host(), port=port)
    await site.start()
    log.info("serving Slack events on port %s", port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def settings_host() -> str:
    import os

    return os.environ.get("POSTMERGE_LISTEN_HOST", "0.0.0.0")
