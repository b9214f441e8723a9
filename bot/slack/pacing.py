"""Spacing of Slack calls per channel, shared by every run that posts there.

Slack limits chat.update to about 50 calls a minute per channel (Tier 3)
and chat.postMessage to about one a second per channel. Two runs in one
channel must share that budget, so the service keeps one pacer for all of
its notifiers. Each caller reserves the next free slot before it sleeps,
so callers that arrive together are spread out rather than sent at once.
"""

from __future__ import annotations

import asyncio
import time

UPDATE_INTERVAL = 1.25
POST_INTERVAL = 1.1


class ChannelPacer:
    def __init__(self, update_interval: float = UPDATE_INTERVAL, post_interval: float = POST_INTERVAL) -> None:
        self.update_interval = update_interval
        self.post_interval = post_interval
        self._next_update: dict[str, float] = {}
        self._next_post: dict[str, float] = {}

    def update_delay(self, channel: str) -> float:
        """Seconds until the channel may take another chat.update."""
        return max(0.0, self._next_update.get(channel, 0.0) - time.monotonic())

    async def space_updates(self, channel: str) -> None:
        """Wait for the channel's next chat.update slot, and take it."""
        await _reserve(self._next_update, channel, self.update_interval)

    async def space_posts(self, channel: str) -> None:
        """Wait for the channel's next post slot, and take it."""
        await _reserve(self._next_post, channel, self.post_interval)


async def _reserve(slots: dict[str, float], channel: str, interval: float) -> None:
    now = time.monotonic()
    slot = max(now, slots.get(channel, 0.0))
    slots[channel] = slot + interval
    if slot > now:
        await asyncio.sleep(slot - now)
