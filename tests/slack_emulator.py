"""Local emulator of the Slack Web API for tests.

Point the real client at it::

    async with SlackEmulator() as slack:
        client = AsyncWebClient(token="xoxb-test", base_url=slack.base_url)
        await client.chat_postMessage(channel="C1", text="hi")
        assert slack.count("chat.postMessage") == 1

The wire format follows slack_sdk 3.48: methods are POSTed (or sent with GET)
to ``<base_url><method>``, the token arrives as ``Authorization: Bearer ...``,
chat.* arguments arrive as a JSON body, and other methods send form or query
parameters. Every response is a JSON object with ``ok`` and, on failure,
``error``. Errors use HTTP 200 like Slack, except rate limits (429), unknown
methods (404) and injected faults.

Socket Mode is emulated too. apps.connections.open takes the app-level
token (``xapp-...``) and returns a ``ws://`` URL on the emulator. The client
connects there and gets a ``hello`` message, and the test then pushes
envelopes with ``socket_send`` and reads the client's acks with ``socket_ack``::

    await slack.wait_for_socket_connection()
    envelope_id = await slack.socket_send("slash_commands", {"command": "/deploy", ...})
    ack = await slack.socket_ack(envelope_id, timeout=3)

The server binds to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

logger = logging.getLogger(__name__)

# Methods that take an app-level token (xapp-) instead of a bot token (xoxb-).
APP_TOKEN_METHODS = frozenset({"apps.connections.open"})

# Block types that Slack's Block Kit accepts in messages.
KNOWN_BLOCK_TYPES = frozenset(
    {
        "actions",
        "context",
        "divider",
        "file",
        "header",
        "image",
        "input",
        "markdown",
        "rich_text",
        "section",
        "table",
        "video",
    }
)


@dataclass(frozen=True)
class BlockLimits:
    """Block Kit and message size limits, in characters (Python ``len``, code points).

    NOTE: the defaults are Slack's published Block Kit limits as recalled, not
    checked against the live API. In particular, Slack recommends at most 4,000
    characters of top-level ``text``, and this emulator rejects more with
    ``msg_too_long``, although the live API may accept and truncate longer text.
    """

    max_blocks: int = 50
    max_section_text: int = 3000
    max_section_fields: int = 10
    max_section_field_text: int = 2000
    max_header_text: int = 150
    max_button_text: int = 75
    max_button_value: int = 2000
    max_button_url: int = 3000
    max_id_length: int = 255
    max_context_elements: int = 10
    max_actions_elements: int = 25
    max_text: int = 4000
    max_blocks_text_total: int = 12000


@dataclass(frozen=True)
class RateLimits:
    """Rate limits per method. Window lengths and intervals are in seconds."""

    # chat.update (Tier 3): a sliding window per channel, plus a minimum
    # interval between updates of the same message.
    update_per_channel: int = 50
    update_window: float = 60.0
    update_per_message_interval: float = 1.0
    # chat.postMessage: a token bucket per channel that refills one post every
    # `post_interval` seconds and contains at most `post_burst` posts.
    post_interval: float = 1.0
    post_burst: int = 3


@dataclass
class SlackCall:
    """One request the emulator received and the response it sent."""

    method: str
    args: dict[str, Any]
    time: float  # time.time() when the request arrived
    status: int
    error: str | None
    token: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _ApiResult:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class SlackApiFailure(Exception):
    """A Slack error response raised inside a method handler."""

    def __init__(self, error: str, status: int = 200, **extra: Any) -> None:
        super().__init__(error)
        self.error = error
        self.status = status
        self.extra = extra


class SlackEmulator:
    """aiohttp server that emulates a subset of the Slack Web API.

    Supported methods: auth.test, chat.postMessage, chat.update,
    chat.postEphemeral, usergroups.users.list, conversations.replies and
    apps.connections.open. Any other method gets ``unknown_method`` with
    HTTP 404. apps.connections.open takes only an app-level token, sent in
    the Authorization header, and the other methods take only a bot token.

    The Socket Mode websocket is served at ``/link/`` on the same port.
    """

    def __init__(
        self,
        *,
        team: str = "postmerge-test",
        team_id: str = "T0EMULATOR",
        user: str = "postmerge",
        user_id: str = "U0BOTUSER",
        bot_id: str = "B0BOTID",
        app_id: str = "A0EMULATOR",
        invalid_tokens: Iterable[str] = ("xoxb-invalid",),
        usergroups: Mapping[str, Iterable[str]] | None = None,
        channels: Iterable[str] | None = None,
        block_limits: BlockLimits | None = None,
        rate_limits: RateLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.team = team
        self.team_id = team_id
        self.user = user
        self.user_id = user_id
        self.bot_id = bot_id
        self.app_id = app_id
        self.invalid_tokens = set(invalid_tokens)
        self.usergroups: dict[str, list[str]] = {
            group: list(users) for group, users in (usergroups or {}).items()
        }
        # None accepts every channel; a set makes other channels `channel_not_found`.
        self.channels: set[str] | None = set(channels) if channels is not None else None
        self.block_limits = block_limits or BlockLimits()
        self.rate_limits = rate_limits or RateLimits()
        self.clock = clock

        self.calls: list[SlackCall] = []
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}
        self.ephemerals: list[dict[str, Any]] = []

        # Socket Mode records. socket_messages stores every message the client
        # sent, parsed from JSON or kept as raw text when it does not parse.
        # socket_acks stores those messages that carry an envelope_id.
        self.socket_envelopes: list[dict[str, Any]] = []
        self.socket_messages: list[Any] = []
        self.socket_acks: list[dict[str, Any]] = []
        self._sockets: list[web.WebSocketResponse] = []
        self._tickets: set[str] = set()
        self._socket_state = asyncio.Condition()

        self._last_ts_micros = 0
        self._faults: dict[str, deque[tuple[str, int]]] = defaultdict(deque)
        self._outage = False
        self._update_times: dict[str, deque[float]] = defaultdict(deque)
        self._update_last_by_message: dict[tuple[str, str], float] = {}
        self._post_buckets: dict[str, tuple[float, float]] = {}

        self._handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.getPermalink": self._chat_get_permalink,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "usergroups.users.list": self._usergroups_users_list,
            "conversations.replies": self._conversations_replies,
            "apps.connections.open": self._apps_connections_open,
        }
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # Lifecycle

    async def start(self) -> str:
        """Start the server on 127.0.0.1 and return its base URL, which ends in ``/api/``."""
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle)
        app.router.add_get("/link/", self._handle_socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}/api/"
        self._socket_base = f"ws://{host}:{port}/link/"
        logger.debug("Slack emulator listening on %s", self.base_url)
        return self.base_url

    async def close(self) -> None:
        """Close open Socket Mode connections with code 1001 (going away), then stop the server."""
        for socket in list(self._sockets):
            await socket.close(code=WSCloseCode.GOING_AWAY, message=b"emulator closing")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SlackEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Records

    def calls_to(self, method: str) -> list[SlackCall]:
        """Return every recorded call to `method`, failed ones included, oldest first."""
        return [call for call in self.calls if call.method == method]

    def count(self, method: str) -> int:
        """Return the number of recorded calls to `method`, failed ones included."""
        return len(self.calls_to(method))

    def thread(self, channel: str, ts: str) -> list[dict[str, Any]]:
        """Return the parent message `ts` and its replies in `channel`, oldest first.

        Returns an empty list when `ts` is not a stored message.
        """
        if (channel, ts) not in self.messages:
            return []
        members = [
            message
            for (message_channel, message_ts), message in self.messages.items()
            if message_channel == channel and (message_ts == ts or message.get("thread_ts") == ts)
        ]
        return sorted(members, key=lambda message: _ts_key(message["ts"]))

    # Socket Mode

    @property
    def socket_connections(self) -> int:
        """Number of open Socket Mode connections that have received their hello message."""
        return len(self._sockets)

    async def wait_for_socket_connection(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least `count` Socket Mode connections are open.

        Raises TimeoutError after `timeout` seconds.
        """
        await self._wait_for_socket_state(
            lambda: len(self._sockets) >= count,
            timeout,
            f"{count} Socket Mode connection(s)",
        )

    async def socket_send(
        self,
        type: str,
        payload: dict[str, Any],
        *,
        accepts_response_payload: bool | None = None,
        retry_attempt: int = 0,
        retry_reason: str = "",
        envelope_id: str | None = None,
    ) -> str:
        """Send an envelope on the newest Socket Mode connection and return its envelope_id.

        `type` is "slash_commands", "interactive" or "events_api", and `payload`
        is what Slack would POST over HTTP, as a dict. `accepts_response_payload`
        defaults to True for slash commands and for view_submission and
        block_suggestion payloads, and to False otherwise. Pass the envelope_id of
        an earlier envelope with `retry_attempt` above 0 to send a retry.
        Raises RuntimeError when no connection is open.
        """
        if not self._sockets:
            raise RuntimeError(
                "No Socket Mode connection is open. Await wait_for_socket_connection() before socket_send()."
            )
        if accepts_response_payload is None:
            accepts_response_payload = type == "slash_commands" or (
                type == "interactive" and payload.get("type") in ("view_submission", "block_suggestion")
            )
        envelope = {
            "envelope_id": envelope_id or str(uuid.uuid4()),
            "type": type,
            "payload": payload,
            "accepts_response_payload": accepts_response_payload,
            "retry_attempt": retry_attempt,
            "retry_reason": retry_reason,
        }
        await self._sockets[-1].send_json(envelope)
        self.socket_envelopes.append(envelope)
        return envelope["envelope_id"]

    async def socket_ack(self, envelope_id: str, timeout: float = 3.0) -> dict[str, Any]:
        """Wait for the client's first ack of `envelope_id` and return it.

        An ack is a message such as ``{"envelope_id": ..., "payload": {...}}``.
        ``payload`` is absent when the client acks without a response.
        Raises TimeoutError when no ack arrives within `timeout` seconds.
        """
        await self._wait_for_socket_state(
            lambda: self._find_ack(envelope_id) is not None,
            timeout,
            f"an ack of envelope {envelope_id}",
        )
        ack = self._find_ack(envelope_id)
        assert ack is not None
        return ack

    def _find_ack(self, envelope_id: str) -> dict[str, Any] | None:
        return next((ack for ack in self.socket_acks if ack.get("envelope_id") == envelope_id), None)

    async def _wait_for_socket_state(self, predicate: Callable[[], bool], timeout: float, expected: str) -> None:
        async with self._socket_state:
            try:
                await asyncio.wait_for(self._socket_state.wait_for(predicate), timeout)
            except TimeoutError:
                raise TimeoutError(f"Slack emulator: timed out after {timeout} s waiting for {expected}") from None

    async def _notify_socket_state(self) -> None:
        async with self._socket_state:
            self._socket_state.notify_all()

    async def _handle_socket(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            logger.debug("Slack emulator: Socket Mode connection rejected, unknown ticket %r", ticket)
            return web.json_response({"ok": False, "error": "invalid_ticket"}, status=401)
        # NOTE: a ticket opens one connection here. Whether Slack accepts a reused
        # ticket, and the status it rejects one with, are not checked against Slack.
        self._tickets.discard(ticket)

        # autoping (the default) makes aiohttp reply to each ping with a pong.
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.append(socket)
        try:
            await socket.send_json(
                {
                    "type": "hello",
                    "num_connections": len(self._sockets),
                    "debug_info": {
                        "host": "applink-emulator",
                        "build_number": 1,
                        "approximate_connection_time": 18060,
                    },
                    "connection_info": {"app_id": self.app_id},
                }
            )
            await self._notify_socket_state()
            async for message in socket:
                if message.type == WSMsgType.TEXT:
                    self._record_socket_message(message.data)
                    await self._notify_socket_state()
        finally:
            self._sockets.remove(socket)
            await self._notify_socket_state()
        return socket

    def _record_socket_message(self, text: str) -> None:
        try:
            message: Any = json.loads(text)
        except json.JSONDecodeError:
            logger.warning("Slack emulator: Socket Mode client sent text that is not JSON: %.200r", text)
            self.socket_messages.append(text)
            return
        self.socket_messages.append(message)
        if isinstance(message, dict) and "envelope_id" in message:
            self.socket_acks.append(message)

    # Fault injection

    def fail_next(self, method: str, error: str = "internal_error", status: int = 500) -> None:
        """Make the next call to `method` fail with `error` and HTTP `status`.

        Calling it several times queues several failures. The injected failure
        comes before the token check and the rate limits.
        """
        self._faults[method].append((error, status))

    def outage(self, active: bool = True) -> None:
        """Start or end an outage, during which every call gets HTTP 503."""
        self._outage = active

    # Request handling

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        arrived = time.time()
        try:
            args = await _read_arguments(request)
        except ValueError:
            args = {}
            token = _extract_token(request, args)
            result = _ApiResult(200, {"ok": False, "error": "invalid_json"})
        else:
            token = _extract_token(request, args)
            checked_token = token
            if method in APP_TOKEN_METHODS and not request.headers.get("Authorization", "").startswith("Bearer "):
                # Slack's reference for apps.connections.open rejects a token sent as
                # a POST parameter. NOTE: the error name for that case is a guess.
                checked_token = None
            result = self._dispatch(method, args, checked_token)
        error = None if result.body.get("ok") else result.body.get("error")
        if error is not None:
            logger.debug("Slack emulator: %s returned HTTP %d, error %s", method, result.status, error)
        self.calls.append(
            SlackCall(
                method=method,
                args=args,
                time=arrived,
                status=result.status,
                error=error,
                token=token,
            )
        )
        return web.json_response(result.body, status=result.status, headers=result.headers)

    def _dispatch(self, method: str, args: dict[str, Any], token: str | None) -> _ApiResult:
        if self._outage:
            return _ApiResult(503, {"ok": False, "error": "service_unavailable"})
        if self._faults.get(method):
            error, status = self._faults[method].popleft()
            return _ApiResult(status, {"ok": False, "error": error})

        token_error = _check_token(method, token, self.invalid_tokens)
        if token_error is not None:
            return _ApiResult(200, {"ok": False, "error": token_error})

        handler = self._handlers.get(method)
        if handler is None:
            return _ApiResult(404, {"ok": False, "error": "unknown_method", "req_method": method})

        retry_after = self._check_rate_limit(method, args)
        if retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
            return _ApiResult(429, {"ok": False, "error": "ratelimited"}, headers)

        try:
            body = handler(args)
        except SlackApiFailure as failure:
            return _ApiResult(failure.status, {"ok": False, "error": failure.error, **failure.extra})
        return _ApiResult(200, {"ok": True, **body})

    # Rate limits

    def _check_rate_limit(self, method: str, args: dict[str, Any]) -> float | None:
        """Count this call against its limits and return seconds to wait, or None if allowed.

        A call rejected with 429 does not count against the limits, but a call
        that fails validation afterwards (invalid_blocks, message_not_found) does.
        """
        channel = str(args.get("channel", ""))
        now = self.clock()
        if method == "chat.update":
            return self._check_update_limit(channel, str(args.get("ts", "")), now)
        if method == "chat.postMessage":
            return self._check_post_limit(channel, now)
        return None

    def _check_update_limit(self, channel: str, ts: str, now: float) -> float | None:
        limits = self.rate_limits
        window = self._update_times[channel]
        while window and window[0] <= now - limits.update_window:
            window.popleft()

        waits = []
        if len(window) >= limits.update_per_channel:
            waits.append(window[0] + limits.update_window - now)
        last = self._update_last_by_message.get((channel, ts))
        if last is not None and now - last < limits.update_per_message_interval:
            waits.append(last + limits.update_per_message_interval - now)
        if waits:
            return max(waits)

        window.append(now)
        self._update_last_by_message[(channel, ts)] = now
        return None

    def _check_post_limit(self, channel: str, now: float) -> float | None:
        limits = self.rate_limits
        tokens, updated = self._post_buckets.get(channel, (float(limits.post_burst), now))
        if limits.post_interval > 0:
            tokens = min(float(limits.post_burst), tokens + (now - updated) / limits.post_interval)
        else:
            tokens = float(limits.post_burst)
        if tokens < 1.0:
            self._post_buckets[channel] = (tokens, now)
            return (1.0 - tokens) * limits.post_interval
        self._post_buckets[channel] = (tokens - 1.0, now)
        return None

    # Methods

    def _auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": f"https://{self.team}.slack.com/",
            "team": self.team,
            "user": self.user,
            "team_id": self.team_id,
            "user_id": self.user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _chat_post_message(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._require_channel(args)
        text, blocks = self._validate_content(args)
        ts = self._next_ts()
        message: dict[str, Any] = {
            "type": "message",
            "user": self.user_id,
            "bot_id": self.bot_id,
            "ts": ts,
            "text": text,
        }
        if blocks is not None:
            message["blocks"] = blocks
        thread_ts = args.get("thread_ts")
        if thread_ts:
            # NOTE: Slack's handling of a thread_ts that names no message is not
            # emulated. The reply is stored with that thread_ts all the same.
            message["thread_ts"] = str(thread_ts)
            parent = self.messages.get((channel, str(thread_ts)))
            if parent is not None:
                parent["thread_ts"] = parent["ts"]
                parent["reply_count"] = parent.get("reply_count", 0) + 1
        self.messages[(channel, ts)] = message
        return {"channel": channel, "ts": ts, "message": dict(message)}

    def _chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._require_channel(args)
        ts = str(args.get("ts") or "")
        message = self.messages.get((channel, ts))
        if message is None:
            raise SlackApiFailure("message_not_found")
        text, blocks = self._validate_content(args)
        # NOTE: fields missing from the request keep their stored values. Slack's
        # exact behaviour when only one of text and blocks is sent is not emulated.
        if "text" in args:
            message["text"] = text
        if blocks is not None:
            message["blocks"] = blocks
        message["edited"] = {"user": self.user_id, "ts": self._next_ts()}
        return {"channel": channel, "ts": ts, "text": message["text"], "message": dict(message)}

    def _chat_post_ephemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._require_channel(args)
        user = args.get("user")
        if not user:
            raise SlackApiFailure("user_not_in_channel")
        text, blocks = self._validate_content(args)
        message_ts = self._next_ts()
        self.ephemerals.append(
            {
                "channel": channel,
                "user": str(user),
                "message_ts": message_ts,
                "text": text,
                "blocks": blocks,
                "thread_ts": args.get("thread_ts"),
            }
        )
        return {"message_ts": message_ts}

    def _apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        # NOTE: ticket expiry and the rate limit of this method are not emulated.
        ticket = str(uuid.uuid4())
        self._tickets.add(ticket)
        return {"url": f"{self._socket_base}?ticket={ticket}&app_id={self.app_id}"}

    def _usergroups_users_list(self, args: dict[str, Any]) -> dict[str, Any]:
        usergroup = str(args.get("usergroup") or "")
        if usergroup not in self.usergroups:
            raise SlackApiFailure("no_such_subteam")
        return {"users": list(self.usergroups[usergroup])}

    def _chat_get_permalink(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._require_channel(args)
        ts = str(args.get("message_ts") or "")
        if (channel, ts) not in self.messages:
            raise SlackApiFailure("message_not_found")
        # Slack's form: the workspace URL, the channel, and the ts without its dot after "p".
        return {"channel": channel,
                "permalink": f"https://emulator.slack.test/archives/{channel}/p{ts.replace('.', '')}"}

    def _conversations_replies(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._require_channel(args)
        ts = str(args.get("ts") or "")
        thread = self.thread(channel, ts)
        if not thread:
            raise SlackApiFailure("thread_not_found")
        # NOTE: pagination (cursor, limit, oldest, latest) is not emulated.
        return {
            "messages": [dict(message) for message in thread],
            "has_more": False,
            "response_metadata": {"next_cursor": ""},
        }

    # Validation

    def _require_channel(self, args: dict[str, Any]) -> str:
        channel = args.get("channel")
        if not channel:
            raise SlackApiFailure("channel_not_found")
        channel = str(channel)
        if self.channels is not None and channel not in self.channels:
            raise SlackApiFailure("channel_not_found")
        return channel

    def _validate_content(self, args: dict[str, Any]) -> tuple[str, list[dict[str, Any]] | None]:
        """Check `text` and `blocks` against the limits and return them.

        Raises SlackApiFailure with Slack's error name on the first violation.
        """
        limits = self.block_limits
        text = args.get("text")
        text = "" if text is None else str(text)
        blocks = args.get("blocks")
        if blocks is not None and not isinstance(blocks, list):
            raise SlackApiFailure("invalid_blocks_format")
        if not text and not blocks and not args.get("attachments"):
            raise SlackApiFailure("no_text")

        if blocks is not None:
            problems = _check_blocks(blocks, limits)
            if problems:
                raise SlackApiFailure(
                    "invalid_blocks",
                    errors=problems,
                    response_metadata={"messages": [f"[ERROR] {problem}" for problem in problems]},
                )
            total = _count_block_text(blocks)
            if total > limits.max_blocks_text_total:
                raise SlackApiFailure("msg_blocks_too_long")
        if len(text) > limits.max_text:
            raise SlackApiFailure("msg_too_long")
        return text, blocks

    def _next_ts(self) -> str:
        """Return a new message ts such as "1733300000.000100", later than every earlier one."""
        micros = max(int(time.time() * 1_000_000), self._last_ts_micros + 1)
        self._last_ts_micros = micros
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


# Helpers for requests


async def _read_arguments(request: web.Request) -> dict[str, Any]:
    """Merge query parameters with the JSON or form body.

    Raises ValueError when a JSON body does not parse.
    """
    args: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        if request.content_type == "application/json":
            raw = await request.text()
            if raw.strip():
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("JSON body is not an object")
                args.update(body)
        else:
            form = await request.post()
            args.update({key: value for key, value in form.items() if isinstance(value, str)})
    # Form and query parameters carry structured values as JSON strings.
    for key in ("blocks", "attachments"):
        value = args.get(key)
        if isinstance(value, str):
            try:
                args[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    return args


def _extract_token(request: web.Request, args: dict[str, Any]) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer ") :].strip() or None
    token = args.get("token")
    return str(token) if token else None


def _check_token(method: str, token: str | None, invalid_tokens: set[str]) -> str | None:
    """Return Slack's error for a token that may not call `method`, or None if it may."""
    if token is None:
        return "not_authed"
    if method in APP_TOKEN_METHODS:
        if not token.startswith("xapp-"):
            return "not_allowed_token_type"
    elif not token.startswith("xoxb-"):
        return "not_authed"
    if token in invalid_tokens:
        return "invalid_auth"
    return None


def _ts_key(ts: str) -> tuple[int, int]:
    seconds, _, micros = ts.partition(".")
    return int(seconds), int(micros or 0)


# Helpers for Block Kit


def _text_of(value: Any) -> str:
    """Return the string of a text object, or "" when `value` is not one."""
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    return ""


def _check_blocks(blocks: list[Any], limits: BlockLimits) -> list[str]:
    """Return one message per limit that `blocks` breaks, in Slack's wording style."""
    problems: list[str] = []
    if len(blocks) > limits.max_blocks:
        problems.append(f"no more than {limits.max_blocks} items allowed [json-pointer:/blocks]")
    for index, block in enumerate(blocks):
        pointer = f"/blocks/{index}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            problems.append(f"missing required field: type [json-pointer:{pointer}]")
            continue
        block_type = block["type"]
        if block_type not in KNOWN_BLOCK_TYPES:
            problems.append(f"unsupported type: {block_type} [json-pointer:{pointer}/type]")
            continue
        _check_length(problems, block.get("block_id"), limits.max_id_length, f"{pointer}/block_id")

        if block_type == "section":
            _check_length(problems, _text_of(block.get("text")), limits.max_section_text, f"{pointer}/text/text")
            fields = block.get("fields") or []
            if len(fields) > limits.max_section_fields:
                problems.append(
                    f"no more than {limits.max_section_fields} items allowed [json-pointer:{pointer}/fields]"
                )
            for field_index, field_object in enumerate(fields):
                _check_length(
                    problems,
                    _text_of(field_object),
                    limits.max_section_field_text,
                    f"{pointer}/fields/{field_index}/text",
                )
            accessory = block.get("accessory")
            if isinstance(accessory, dict):
                _check_element(problems, accessory, limits, f"{pointer}/accessory")
        elif block_type == "header":
            _check_length(problems, _text_of(block.get("text")), limits.max_header_text, f"{pointer}/text/text")
        elif block_type == "context":
            elements = block.get("elements") or []
            if len(elements) > limits.max_context_elements:
                problems.append(
                    f"no more than {limits.max_context_elements} items allowed [json-pointer:{pointer}/elements]"
                )
        elif block_type == "actions":
            elements = block.get("elements") or []
            if len(elements) > limits.max_actions_elements:
                problems.append(
                    f"no more than {limits.max_actions_elements} items allowed [json-pointer:{pointer}/elements]"
                )
            for element_index, element in enumerate(elements):
                if isinstance(element, dict):
                    _check_element(problems, element, limits, f"{pointer}/elements/{element_index}")
    return problems


def _check_element(problems: list[str], element: dict[str, Any], limits: BlockLimits, pointer: str) -> None:
    _check_length(problems, element.get("action_id"), limits.max_id_length, f"{pointer}/action_id")
    if element.get("type") == "button":
        _check_length(problems, _text_of(element.get("text")), limits.max_button_text, f"{pointer}/text/text")
        _check_length(problems, element.get("value"), limits.max_button_value, f"{pointer}/value")
        _check_length(problems, element.get("url"), limits.max_button_url, f"{pointer}/url")


def _check_length(problems: list[str], value: Any, maximum: int, pointer: str) -> None:
    if isinstance(value, str) and len(value) > maximum:
        problems.append(f"must be less than {maximum + 1} characters [json-pointer:{pointer}]")


def _count_block_text(value: Any) -> int:
    """Return the summed length of every string stored under a "text" key, at any depth."""
    if isinstance(value, list):
        return sum(_count_block_text(item) for item in value)
    if not isinstance(value, dict):
        return 0
    total = 0
    for key, item in value.items():
        if key == "text" and isinstance(item, str):
            total += len(item)
        else:
            total += _count_block_text(item)
    return total
