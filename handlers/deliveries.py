"""Repeated deliveries. Slack sends a request again when it thinks the first was lost.

An HTTP retry carries X-Slack-Retry-Num and a Socket Mode retry carries
retry_attempt, but both repeat the event id or trigger id of the first
delivery. A global middleware acks a repeat and drops it, so the work the
first delivery started never starts twice. The memory is per process. After
a restart, the store's own guards still apply: one active run per runbook
and environment, and decisions that are recorded once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

log = logging.getLogger(__name__)

SEEN_LIMIT = 5000


class Deliveries:
    """The most recent delivery keys, oldest forgotten first."""

    def __init__(self, limit: int = SEEN_LIMIT) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first(self, key: str) -> bool:
        """Remember key and return whether it is new."""
        if key in self._seen:
            return False
        self._seen[key] = None
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return True


def delivery_key(body: dict) -> str | None:
    """Return what identifies one delivery of a payload: its event id or its trigger id."""
    if not isinstance(body, dict):
        return None
    if body.get("event_id"):
        return f"event:{body['event_id']}"
    if body.get("trigger_id"):
        return f"trigger:{body['trigger_id']}"
    return None


def register(app) -> Deliveries:
    from slack_bolt.response import BoltResponse

    deliveries = Deliveries()

    @app.middleware
    async def skip_repeated_deliveries(req, next):
        key = delivery_key(req.body)
        if key is not None and not deliveries.first(key):
            retry = (req.headers.get("x-slack-retry-num") or ["-"])[0]
            log.info("ignoring a repeated delivery of %s (X-Slack-Retry-Num %s)", key, retry)
            return BoltResponse(status=200, body="")
        await next()

    return deliveries
