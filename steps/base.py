"""The interface every step executor implements.

The engine owns state, timeouts and retries of whole steps. An executor
does one thing: carry out a step, report its output as it goes and return a
result. It keeps whatever its rollback needs in `StepResult.data`, which the
engine stores with the step.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from bot.config import Environment
from bot.errors import StepError
from bot.plan import Step

OutputCallback = Callable[[str], None]


class OutputBuffer:
    """The output of one step: a bounded copy for the store and a live callback.

    Keeps the first and the last part of the output when it is longer than
    `limit_bytes`, and notes how much was dropped between them.
    """

    def __init__(self, limit_bytes: int, on_line: OutputCallback | None = None,
                 mask: list[str] | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.on_line = on_line
        # Credential values replaced in every line before it is kept or shown.
        self.mask = [value for value in (mask or []) if value]
        self._head: list[str] = []
        self._head_bytes = 0
        self._tail: deque[str] = deque()
        self._tail_bytes = 0
        self.dropped_lines = 0
        self.last_line = ""

    def write(self, line: str) -> None:
        line = line.rstrip("\r\n")
        for value in self.mask:
            line = line.replace(value, "****")
        size = len(line.encode("utf-8", "replace")) + 1
        self.last_line = line or self.last_line
        if self.on_line is not None:
            self.on_line(line)

        half = self.limit_bytes // 2
        if self._head_bytes + size <= half and not self._tail:
            self._head.append(line)
            self._head_bytes += size
            return
        self._tail.append(line)
        self._tail_bytes += size
        while self._tail_bytes > half and len(self._tail) > 1:
            dropped = self._tail.popleft()
            self._tail_bytes -= len(dropped.encode("utf-8", "replace")) + 1
            self.dropped_lines += 1

    def text(self) -> str:
        lines = list(self._head)
        if self.dropped_lines:
            lines.append(f"... {self.dropped_lines} lines omitted ...")
        lines.extend(self._tail)
        return "\n".join(lines)

    def tail(self, count: int) -> list[str]:
        combined = list(self._head) + list(self._tail)
        return combined[-count:]


@dataclass
class StepContext:
    """The step, environment and callbacks an executor gets to run one step."""

    run_id: str
    step: Step
    environment: Environment
    artifacts_dir: Path
    output: OutputBuffer
    timeout_seconds: float
    locale: str = "ja"
    # Data stored with the step by an earlier attempt or by the forward step
    # a rollback undoes (for example the previous value of a variable).
    previous_data: dict[str, Any] = field(default_factory=dict)
    # Persist data before an effect starts, such as a process group id, so a
    # resumed run can find what may still be running.
    checkpoint: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    # Process groups of steps still running in this run, for `kill -INT <pid>`.
    running_process_groups: Callable[[], Awaitable[list[int]]] | None = None

    async def save(self, data: dict[str, Any]) -> None:
        if self.checkpoint is not None:
            await self.checkpoint(data)


@dataclass
class StepResult:
    ok: bool = True
    exit_code: int | None = None
    summary: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    kind: ClassVar[str]

    async def execute(self, context: StepContext) -> StepResult:
        """Carry out the step. Raise StepError for a failure the user must read.

        Cancellation (a timeout or an abort) arrives as asyncio.CancelledError,
        and the executor must stop its effect before re-raising it.
        """
        ...

    def repeat_safe(self, step: Step) -> bool:
        """Return whether running the step again after an interruption is harmless."""
        ...

    def has_inverse(self, step: Step) -> bool:
        """Return whether `rollback` can undo a succeeded step."""
        ...

    async def rollback(self, context: StepContext) -> StepResult:
        """Undo a succeeded step, using the data its execution returned."""
        ...


class BaseExecutor:
    """Defaults for executors without an inverse."""

    kind: ClassVar[str] = ""

    def repeat_safe(self, step: Step) -> bool:
        return False

    def has_inverse(self, step: Step) -> bool:
        return False

    async def rollback(self, context: StepContext) -> StepResult:
        raise NotImplementedError(f"{self.kind} steps have no inverse")


_HTTP_FAILURES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict", 429: "rate_limited"}


def http_failure_key(prefix: str, status: int) -> str:
    """Return the catalog key for an HTTP API failure, such as "cdn.forbidden" for 403."""
    if status in _HTTP_FAILURES:
        return f"{prefix}.{_HTTP_FAILURES[status]}"
    return f"{prefix}.server_error" if status >= 500 else f"{prefix}.rejected"


async def send_json(session, method: str, url: str, *, token: str, json_body: Any, timeout_seconds: float,
                    prefix: str, **params: Any) -> tuple[int, Any]:
    """Send one request with a Bearer token; return the status and the JSON body (None when the body is not JSON).

    A timeout, a refused connection or another client error raises StepError
    with `{prefix}.timed_out`, `.connection_failed` or `.request_failed`, and
    params. The caller decides which statuses are failures.
    """
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    try:
        async with session.request(method, url, json=json_body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout_seconds)) as response:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            return response.status, body
    except asyncio.TimeoutError:
        raise StepError(f"{prefix}.timed_out", method=method, url=url, seconds=timeout_seconds, **params) from None
    except aiohttp.ClientConnectorError as error:
        raise StepError(f"{prefix}.connection_failed", method=method, url=url, error=_describe(error),
                        **params) from None
    except aiohttp.ClientError as error:
        raise StepError(f"{prefix}.request_failed", method=method, url=url, error=_describe(error),
                        **params) from None


def _describe(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def sleep_until_cancelled() -> None:
    """Wait until cancelled, for gates decided from outside."""
    await asyncio.Event().wait()
