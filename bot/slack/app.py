"""Build the slack-bolt AsyncApp and serve it over HTTP or Socket Mode."""

from __future__ import annotations

import logging
from collections.abc import Callable

from bot.config import Settings
from bot.errors import ConfigError
from bot.i18n import translate
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


class _DropClientTokenWarning(logging.Filter):
    """Drop Bolt's warning that the token is unused: Bolt reads SLACK_BOT_TOKEN itself, and the client carries it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be unused" not in record.getMessage()


def build_app(settings: Settings, slack: SlackSettings, store):
    from slack_bolt.async_app import AsyncApp

    import handlers.actions
    import handlers.commands
    import handlers.deliveries

    client = build_client(slack)
    bolt_logger = logging.getLogger("slack_bolt.AsyncApp")
    if not any(isinstance(item, _DropClientTokenWarning) for item in bolt_logger.filters):
        bolt_logger.addFilter(_DropClientTokenWarning())
    app = AsyncApp(client=client, signing_secret=slack.slack_signing_secret or "socket-mode",
                   request_verification_enabled=slack.slack_app_token is None, logger=bolt_logger)
    service = SlackService(settings, slack, store, client)
    handlers.deliveries.register(app)
    handlers.commands.register(app, service)
    handlers.actions.register(app, service)
    return app, service


async def serve(settings: Settings, slack: SlackSettings, store, port: int,
                announce: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled: Socket Mode when SLACK_APP_TOKEN is set, else HTTP at /slack/events on the port.

    Checks the token with auth.test first, so a rejected token or an
    unreachable Slack stops start-up with one ConfigError. announce receives
    one line for the terminal once the bot listens.
    """
    import asyncio

    from bot.slack.errors import init_error_reporting
    from storage.store import LEASE_SECONDS

    init_error_reporting([slack.slack_bot_token, slack.slack_signing_secret, slack.slack_app_token])
    app, service = build_app(settings, slack, store)
    await _check_token(app.client, slack.slack_api_url)
    if slack.slack_app_token:
        await _check_app_token(app.client, slack.slack_app_token, slack.slack_api_url)
    say = announce or (lambda text: None)
    missing = [str(folder) for folder in _runbook_folders(settings, slack) if not folder.is_dir()]
    if missing:
        log.warning("runbook folders not found: %s", ", ".join(missing))
        say(translate("slack.runbook_dir_missing", settings.locale, folders=", ".join(missing)))
    # Runs that were active when the bot last stopped carry on in their Slack messages.
    watcher = asyncio.create_task(service.watch_orphans(LEASE_SECONDS / 2))
    try:
        if slack.slack_app_token:
            await _serve_socket_mode(app, slack.slack_app_token,
                                     lambda: say(translate("slack.connected_socket_mode", settings.locale)))
        else:
            await _serve_http(app, port, lambda host: say(translate("slack.listening", settings.locale,
                                                                     host=host, port=port)))
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await service.close()


def _runbook_folders(settings: Settings, slack: SlackSettings) -> list:
    """Return the folders `start` looks in: each environment's runbook_dir, else POSTMERGE_RUNBOOK_DIR."""
    from bot.config import load_environments

    folders = {environment.runbook_dir or slack.postmerge_runbook_dir
               for environment in load_environments(settings).values()}
    return sorted(folders or {slack.postmerge_runbook_dir})


async def _check_token(client, api_url: str) -> None:
    """Call auth.test once; raise ConfigError when Slack rejects the token or cannot be reached."""
    import asyncio

    import aiohttp
    from slack_sdk.errors import SlackApiError

    try:
        response = await client.auth_test()
    except SlackApiError as error:
        raise ConfigError("slack.auth_failed", error=error.response.get("error", "?")) from None
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
        raise ConfigError("slack.unreachable", url=api_url, error=str(error) or type(error).__name__) from None
    log.info("authenticated to Slack as %s in team %s", response.get("user_id"), response.get("team_id"))


async def _check_app_token(client, app_token: str, api_url: str) -> None:
    """Ask Slack for a Socket Mode URL once; raise ConfigError when it rejects the app token.

    slack_sdk's Socket Mode client retries a rejected token forever, so the
    token is checked before it starts.
    """
    import asyncio

    import aiohttp
    from slack_sdk.errors import SlackApiError

    try:
        await client.apps_connections_open(app_token=app_token)
    except SlackApiError as error:
        raise ConfigError("slack.app_token_rejected", error=error.response.get("error", "?")) from None
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
        raise ConfigError("slack.unreachable", url=api_url, error=str(error) or type(error).__name__) from None


async def _serve_socket_mode(app, app_token: str, ready: Callable[[], None]) -> None:
    import asyncio

    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    handler = AsyncSocketModeHandler(app, app_token)
    await handler.connect_async()
    log.info("connected to Slack over Socket Mode")
    ready()
    try:
        await asyncio.Event().wait()
    finally:
        await handler.close_async()


async def _serve_http(app, port: int, ready: Callable[[str], None]) -> None:
    import asyncio

    from aiohttp import web

    runner = web.AppRunner(app.web_app(path="/slack/events", port=port))
    await runner.setup()
    # A deployed bot must be reachable by Slack, so it listens on every interface
    # unless POSTMERGE_LISTEN_HOST names one (tests use 127.0.0.1).
    host = settings_host()
    site = web.TCPSite(runner, host=host, port=port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise ConfigError("slack.port_in_use", host=host, port=port, error=error.strerror or str(error)) from None
    log.info("serving Slack events on %s:%s", host, port)
    ready(host)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def settings_host() -> str:
    import os

    return os.environ.get("POSTMERGE_LISTEN_HOST", "0.0.0.0")
