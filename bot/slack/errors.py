"""Report the bot's own exceptions to Sentry when SENTRY_DSN is set, with secrets masked."""

from __future__ import annotations

import logging
import os

from bot.slack.text import mask_secrets

log = logging.getLogger(__name__)


def _scrub(value):
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return value


def scrub_event(event: dict, hint: dict | None = None) -> dict:
    """Mask token-like values anywhere in a Sentry event before it leaves the process."""
    return _scrub(event)


def init_error_reporting(secrets: list[str] | None = None) -> bool:
    """Start Sentry when SENTRY_DSN is set; return whether it was started."""
    dsn = os.environ.get("SENTRY_DSN")
    if not dsn:
        return False
    import sentry_sdk

    known = [secret for secret in (secrets or []) if secret]

    def before_send(event, hint):
        scrubbed = scrub_event(event, hint)
        text = repr(scrubbed)
        if any(secret in text for secret in known):
            # A configured secret survived the patterns: drop the event rather than send it.
            log.warning("dropped a Sentry event that contained a configured secret")
            return None
        return scrubbed

    from sentry_sdk.utils import BadDsn

    try:
        sentry_sdk.init(dsn=dsn, send_default_pii=False, before_send=before_send,
                        environment=os.environ.get("POSTMERGE_SENTRY_ENVIRONMENT", "postmerge"))
    except BadDsn as error:
        from bot.errors import ConfigError

        raise ConfigError("slack.invalid_sentry_dsn", error=str(error)) from None
    return True
