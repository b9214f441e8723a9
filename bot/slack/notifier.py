"""A notifier that mirrors a run into Slack: one root message edited in place, a reply per phase.

Edits are coalesced because Slack limits chat.update to about 50 calls a
minute and chat.postMessage to about one a second per channel. So the root
message is updated at most once per `update_interval` seconds, and posts to
the channel are spaced by `post_interval`. A Slack error or
outage never reaches the engine: the run's state is in the store, and the
next flush sends the latest state.
"""

from __future__ import annotations

import asyncio
import logging

from bot.gates import RunEvent
from bot.plan import Plan, Step
from bot.slack.blocks import failure_reply, phase_reply, root_message
from bot.slack.pacing import POST_INTERVAL, UPDATE_INTERVAL, ChannelPacer
from bot.slack.views import build_run_view, rollback_reports, step_reports

log = logging.getLogger(__name__)

FINAL_EVENTS = ("run.completed", "run.failed", "run.aborted", "run.paused")


class SlackRunNotifier:
    def __init__(self, client, store, channel: str, locale: str, *, update_interval: float = UPDATE_INTERVAL,
                 post_interval: float = POST_INTERVAL, pacer: ChannelPacer | None = None) -> None:
        self.client = client
        self.store = store
        self.channel = channel
        self.locale = locale
        # Runs in one channel share one pacer, so their calls count against one budget.
        self.pacer = pacer or ChannelPacer(update_interval, post_interval)
        self.root_ts: dict[str, str] = {}
        # A rollback or emergency run posts its root message as a reply in this thread (the incident's).
        self.parent_ts: dict[str, str] = {}
        self.plans: dict[str, Plan] = {}
        self._dirty: set[str] = set()
        self._pending_replies: list[tuple[str, int | None]] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self.failures = 0

    # -- notifier interface -----------------------------------------------

    def output_line(self, run_id: str, step: Step, line: str) -> None:
        self._mark(run_id)

    async def notify(self, event: RunEvent) -> None:
        self.plans[event.run_id] = event.plan
        if event.type == "phase.finished":
            self._pending_replies.append((event.run_id, event.phase))
        if event.type in ("step.failed", "step.timed_out"):
            self._pending_replies.append((event.run_id, event.phase))
        self._mark(event.run_id)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())
        if event.type in FINAL_EVENTS:
            await self.flush()

    async def close(self) -> None:
        await self.flush()
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
            self._flusher = None

    # -- flushing ---------------------------------------------------------

    def _mark(self, run_id: str) -> None:
        self._dirty.add(run_id)
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait = self.pacer.update_delay(self.channel)
            if wait > 0:
                await asyncio.sleep(wait)
            await self.flush(respect_interval=True)

    async def flush(self, respect_interval: bool = False) -> None:
        """Send the latest state of every changed run, and the phase replies waiting."""
        # The flush loop and a final event may flush at once. The lock makes the root post happen once.
        async with self._lock:
            await self._flush(respect_interval)

    async def _flush(self, respect_interval: bool) -> None:
        for run_id in list(self._dirty):
            if respect_interval and self.pacer.update_delay(self.channel) > 0:
                self._wake.set()
                return
            self._dirty.discard(run_id)
            if not await self._send_root(run_id):
                self._dirty.add(run_id)
        while self._pending_replies:
            run_id, phase = self._pending_replies[0]
            if run_id not in self.root_ts:
                break
            if not await self._send_reply(run_id, phase):
                break
            self._pending_replies.pop(0)

    async def _send_root(self, run_id: str) -> bool:
        plan = self.plans.get(run_id)
        if plan is None:
            return True
        run = await self.store.get_run(run_id)
        records = await self.store.steps(run_id)
        text, blocks = root_message(build_run_view(run, plan, records), self.locale)
        try:
            if run_id in self.root_ts:
                await self.space_updates()
                await self.client.chat_update(channel=self.channel, ts=self.root_ts[run_id], text=text, blocks=blocks)
            else:
                await self.space_posts()
                parent = self.parent_ts.get(run_id)
                response = await self.client.chat_postMessage(channel=self.channel, text=text, blocks=blocks,
                                                              thread_ts=parent)
                self.root_ts[run_id] = response["ts"]
                options = dict(run.options or {})
                options["slack"] = {"channel": self.channel, "ts": response["ts"], "thread_ts": parent}
                await self.store.update_run(run_id, options=options)
            return True
        except Exception as error:  # noqa: BLE001 - Slack must never stop a run; the next flush retries
            self.failures += 1
            log.warning("run %s: Slack update of the root message failed: %s", run_id, error)
            return False

    def thread_of(self, run_id: str) -> str | None:
        """Return the thread a run's replies and buttons go to: its parent's thread, else its root message's."""
        return self.parent_ts.get(run_id) or self.root_ts.get(run_id)

    async def _send_reply(self, run_id: str, phase: int | None) -> bool:
        plan = self.plans[run_id]
        records = await self.store.steps(run_id)
        run = await self.store.get_run(run_id)
        if run.kind != "run":
            # A rollback's root message lists its steps; a failure adds a reply with the step's output.
            reports = [report for report in rollback_reports(plan, records) if report.status in ("failed", "timed_out")]
            if not reports:
                return True
            text, blocks = failure_reply(reports[-1], self.locale)
        else:
            view = build_run_view(run, plan, records)
            phase_view = next((item for item in view.phases if item.number == phase), None)
            if phase_view is None:
                return True
            text, blocks = phase_reply(phase_view, step_reports(plan, records, phase), self.locale)
        try:
            await self.space_posts()
            await self.client.chat_postMessage(channel=self.channel, thread_ts=self.thread_of(run_id), text=text,
                                               blocks=blocks)
            return True
        except Exception as error:  # noqa: BLE001 - Slack must never stop a run; the next flush retries
            self.failures += 1
            log.warning("run %s: Slack reply for phase %s failed: %s", run_id, phase, error)
            return False

    async def post_note(self, run_id: str, text: str) -> None:
        """Post a line in the run's thread, if its root message exists. A failure is logged and dropped."""
        thread = self.thread_of(run_id)
        if thread is None:
            return
        try:
            await self.space_posts()
            await self.client.chat_postMessage(channel=self.channel, thread_ts=thread, text=text)
        except Exception as error:  # noqa: BLE001 - Slack must never stop a run
            self.failures += 1
            log.warning("run %s: Slack note failed: %s", run_id, error)

    async def space_updates(self) -> None:
        """Wait until the channel may take another chat.update, and count this one."""
        await self.pacer.space_updates(self.channel)

    async def space_posts(self) -> None:
        """Wait until the channel may take another post, and count this one."""
        await self.pacer.space_posts(self.channel)
