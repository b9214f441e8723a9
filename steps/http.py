"""The http step: one request, retried until it succeeds or the step's time runs out.

A response succeeds when its status is the step's `expect_status`, or any
2xx status when none is set, and, when the step has `expect_json`, when its
body is JSON that contains the expected value as a subset. Failed attempts
are retried with exponential backoff until `StepContext.timeout_seconds` has
passed since the first request. A method that is not safe to repeat (POST,
PUT, PATCH, DELETE) is retried only when the server cannot have acted on the
request: the connection failed, or the server responded 429.

`parse_curl` turns a runbook's `curl …` line into the request the planner
stores in the step.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult

if TYPE_CHECKING:
    import aiohttp

REPEAT_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 5.0
# A retry is only worth making when at least this much of the step's time is
# left for the request itself.
MIN_ATTEMPT_SECONDS = 0.2
# The engine cancels the step at its timeout, so the executor stops this much
# earlier (at most 10% of the timeout) to raise its own error, which names the
# attempts and the last result.
FINISH_MARGIN_SECONDS = 0.25
# The response body is written to the step output cut to this many characters.
BODY_OUTPUT_CHARS = 2000

# curl's Content-Type for -d data when the command sets none.
CURL_DEFAULT_CONTENT_TYPE = "application/x-www-form-urlencoded"

MISSING = object()


@dataclass
class Outcome:
    """The result of one request attempt: a response, or the error that prevented one."""

    status: int | None = None
    body: str = ""
    error: str | None = None
    # "connect", "timeout" or "request" for an error, "status", "json" or
    # "not_json" for a response that does not meet the expectations.
    failure: str | None = None
    mismatch: JsonMismatch | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass
class JsonMismatch:
    """The first place where the response JSON differs from the expected subset."""

    path: str
    expected: Any
    actual: Any


class HttpExecutor(BaseExecutor):
    kind = "http"

    def repeat_safe(self, step: Step) -> bool:
        return request_method(step) in REPEAT_SAFE_METHODS

    async def execute(self, context: StepContext) -> StepResult:
        import aiohttp

        step = context.step
        if not step.target_url and not step.url:
            raise StepError("http.missing_url", step=step.id, title=step.title)

        url = step.target_url or context.environment.rewrite_url(step.url or "")
        method = request_method(step)
        if url != step.url and step.url:
            context.output.write(translate("http.output_rewritten", context.locale, url=step.url, target=url))
        for expectation in step.unchecked_expectations:
            context.output.write(translate("http.output_unchecked", context.locale, text=expectation))

        loop = asyncio.get_running_loop()
        started = loop.time()
        margin = min(FINISH_MARGIN_SECONDS, context.timeout_seconds * 0.1)
        deadline = started + context.timeout_seconds - margin
        backoff = FIRST_BACKOFF_SECONDS
        attempts = 0
        last_body_written: str | None = None

        async with aiohttp.ClientSession() as session:
            while True:
                attempts += 1
                request_started = loop.time()
                outcome = await self._attempt(session, step, method, url, deadline - request_started)
                elapsed_ms = round((loop.time() - request_started) * 1000)

                context.output.write(_attempt_line(method, url, outcome, elapsed_ms))
                if outcome.status is not None and outcome.body != last_body_written:
                    _write_body(context, outcome.body)
                    last_body_written = outcome.body

                if outcome.ok:
                    break
                if not self._may_retry(method, outcome):
                    break

                remaining = deadline - loop.time()
                if remaining < MIN_ATTEMPT_SECONDS:
                    break
                delay = min(backoff, remaining - MIN_ATTEMPT_SECONDS)
                context.output.write(translate("http.output_retrying", context.locale, seconds=f"{delay:.1f}"))
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

        seconds = round(loop.time() - started, 1)
        if not outcome.ok:
            raise _failure(step, method, url, outcome, attempts, seconds, context.timeout_seconds)

        summary = translate(
            "http.summary",
            context.locale,
            method=method,
            url=url,
            status=outcome.status,
            attempts=attempts,
            seconds=seconds,
        )
        return StepResult(
            ok=True,
            summary=summary,
            data={"url": url, "method": method, "status": outcome.status, "attempts": attempts},
        )

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        step: Step,
        method: str,
        url: str,
        timeout_seconds: float,
    ) -> Outcome:
        import aiohttp

        headers = dict(step.headers)
        data = None
        if step.body is not None:
            data = step.body.encode("utf-8")
            if not any(name.lower() == "content-type" for name in headers):
                headers["Content-Type"] = CURL_DEFAULT_CONTENT_TYPE

        try:
            async with session.request(
                method,
                url,
                headers=headers,
                data=data,
                timeout=aiohttp.ClientTimeout(total=max(timeout_seconds, 0.001)),
            ) as response:
                raw = await response.read()
                status = response.status
                body = _decode_body(response, raw)
        except aiohttp.InvalidURL as error:
            raise StepError("http.invalid_url", url=url, error=str(error) or type(error).__name__) from None
        except aiohttp.ClientConnectorError as error:
            return Outcome(error=_describe_error(error), failure="connect")
        except asyncio.TimeoutError:
            return Outcome(error="timed out", failure="timeout")
        except aiohttp.ClientError as error:
            return Outcome(error=_describe_error(error), failure="request")

        return check_response(step, status, body)

    def _may_retry(self, method: str, outcome: Outcome) -> bool:
        # A request that is not safe to repeat is retried only when the server
        # cannot have acted on it: the connection failed or the server responded with 429.
        if method in REPEAT_SAFE_METHODS:
            return True
        return outcome.failure == "connect" or outcome.status == 429


def request_method(step: Step) -> str:
    return (step.method or "GET").upper()


def check_response(step: Step, status: int, body: str) -> Outcome:
    """Return the outcome of a response measured against the step's expectations."""
    if step.expect_status is not None:
        status_ok = status == step.expect_status
    else:
        status_ok = 200 <= status < 300
    if not status_ok:
        return Outcome(status=status, body=body, failure="status")

    if step.expect_json is None:
        return Outcome(status=status, body=body)

    try:
        actual = json.loads(body)
    except ValueError as error:
        return Outcome(status=status, body=body, error=str(error), failure="not_json")

    mismatch = find_json_mismatch(step.expect_json, actual)
    if mismatch is not None:
        return Outcome(status=status, body=body, failure="json", mismatch=mismatch)
    return Outcome(status=status, body=body)


def find_json_mismatch(expected: Any, actual: Any, path: str = "$") -> JsonMismatch | None:
    """Return where `actual` fails to contain `expected`, or None when it does.

    Objects match when every expected key is present and matches, so extra keys
    are allowed. Lists match element by element and must have the same length.
    Scalars must be equal, and a boolean never equals a number.
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return JsonMismatch(path, expected, actual)
        for key, value in expected.items():
            child = _json_path(path, key)
            if key not in actual:
                return JsonMismatch(child, value, MISSING)
            mismatch = find_json_mismatch(value, actual[key], child)
            if mismatch is not None:
                return mismatch
        return None

    if isinstance(expected, list):
        if not isinstance(actual, list):
            return JsonMismatch(path, expected, actual)
        for index, (want, got) in enumerate(zip(expected, actual)):
            mismatch = find_json_mismatch(want, got, f"{path}[{index}]")
            if mismatch is not None:
                return mismatch
        if len(expected) != len(actual):
            return JsonMismatch(f"{path}.length", len(expected), len(actual))
        return None

    if isinstance(expected, bool) or isinstance(actual, bool):
        equal = type(expected) is type(actual) and expected == actual
    else:
        equal = expected == actual
    return None if equal else JsonMismatch(path, expected, actual)


def _decode_body(response: aiohttp.ClientResponse, raw: bytes) -> str:
    try:
        encoding = response.get_encoding()
        return raw.decode(encoding, errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")


def _json_path(parent: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{parent}.{key}"
    return f"{parent}[{json.dumps(key, ensure_ascii=False)}]"


def _json_text(value: Any) -> str:
    if value is MISSING:
        return "(missing)"
    return json.dumps(value, ensure_ascii=False)


def _describe_error(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _attempt_line(method: str, url: str, outcome: Outcome, elapsed_ms: int) -> str:
    if outcome.status is None:
        result = outcome.error or "failed"
    else:
        result = str(outcome.status)
    line = f"{method} {url} -> {result} in {elapsed_ms} ms"
    if outcome.mismatch is not None:
        mismatch = outcome.mismatch
        line += (
            f" (JSON {mismatch.path} is {_json_text(mismatch.actual)},"
            f" expected {_json_text(mismatch.expected)})"
        )
    elif outcome.failure == "not_json":
        line += " (body is not JSON)"
    return line


def _write_body(context: StepContext, body: str) -> None:
    if not body:
        return
    head = body[:BODY_OUTPUT_CHARS]
    for line in head.splitlines():
        context.output.write(line)
    if len(body) > BODY_OUTPUT_CHARS:
        context.output.write(f"... {len(body) - BODY_OUTPUT_CHARS} more characters not shown")


def _failure(
    step: Step,
    method: str,
    url: str,
    outcome: Outcome,
    attempts: int,
    seconds: float,
    timeout: float,
) -> StepError:
    common = {"method": method, "url": url, "attempts": attempts, "seconds": seconds, "timeout": timeout}
    if outcome.failure == "timeout":
        return StepError("http.timed_out", **common)
    if outcome.failure == "connect":
        return StepError("http.connection_failed", error=outcome.error, **common)
    if outcome.failure == "request":
        return StepError("http.request_failed", error=outcome.error, **common)
    if outcome.failure == "not_json":
        return StepError(
            "http.not_json",
            status=outcome.status,
            error=outcome.error,
            expected=_json_text(step.expect_json),
            **common,
        )
    if outcome.failure == "json" and outcome.mismatch is not None:
        return StepError(
            "http.json_mismatch",
            status=outcome.status,
            path=outcome.mismatch.path,
            expected=_json_text(outcome.mismatch.expected),
            actual=_json_text(outcome.mismatch.actual),
            **common,
        )
    expected = str(step.expect_status) if step.expect_status is not None else "2xx"
    return StepError("http.unexpected_status", status=outcome.status, expected=expected, **common)


@dataclass
class CurlRequest:
    """The request a runbook's curl command sends."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    fail_on_http_error: bool = False
    # -m/--max-time, in seconds.
    max_time_seconds: float | None = None


# Options that change nothing about the request: output and progress
# display (-s, -S, -i) and redirects (-L), which the executor always follows.
_CURL_IGNORED_FLAGS = {"-s", "--silent", "-S", "--show-error", "-L", "--location", "-i", "--include"}
_CURL_FAIL_FLAGS = {"-f", "--fail"}
_CURL_SHORT_WITH_VALUE = {"X", "H", "d", "m"}
_CURL_SHORT_FLAGS = {"s", "S", "L", "i", "f"}
_CURL_LONG_WITH_VALUE = {
    "--request": "-X",
    "--header": "-H",
    "--data": "-d",
    "--data-ascii": "-d",
    "--data-raw": "--data-raw",
    "--data-binary": "-d",
    "--max-time": "-m",
}


def parse_curl(command: str) -> CurlRequest:
    """Parse a runbook's curl command into a CurlRequest.

    Backslash-newline continuations are joined first, as a shell does. Raises
    ValueError naming the option or argument that is not supported.
    """
    joined = re.sub(r"\\\r?\n", "", command.strip())
    try:
        words = shlex.split(joined)
    except ValueError as error:
        raise ValueError(f"cannot split the curl command into words: {error}") from None
    if not words or words[0] != "curl":
        raise ValueError(f"not a curl command: {command.strip()[:80]!r}")

    method: str | None = None
    urls: list[str] = []
    headers: dict[str, str] = {}
    data: list[str] = []
    fail = False
    max_time: float | None = None

    options = _expand_curl_options(words[1:])
    for option, value in options:
        if option is None:
            urls.append(value)
        elif option == "-X":
            method = value.upper()
        elif option == "-H":
            name, separator, header_value = value.partition(":")
            if not separator or not name.strip():
                raise ValueError(f"curl header {value!r} is not in the form 'Name: value'")
            headers[name.strip()] = header_value.strip()
        elif option == "-d":
            if value.startswith("@"):
                raise ValueError(f"curl data from a file ({value!r}) is not supported")
            data.append(value)
        elif option == "--data-raw":
            data.append(value)
        elif option == "-m":
            try:
                max_time = float(value)
            except ValueError:
                raise ValueError(f"curl --max-time value {value!r} is not a number") from None
        elif option == "-f":
            fail = True

    if len(urls) != 1:
        raise ValueError(f"curl command must have exactly one URL, found {len(urls)}")
    body = "&".join(data) if data else None
    if method is None:
        method = "POST" if body is not None else "GET"

    return CurlRequest(
        method=method,
        url=urls[0],
        headers=headers,
        body=body,
        fail_on_http_error=fail,
        max_time_seconds=max_time,
    )


def _expand_curl_options(words: list[str]) -> list[tuple[str | None, str]]:
    """Split curl arguments into (option, value) pairs; a URL has the option None.

    Short options may be grouped (`-sS`, `-fsSL`) and an option's value may
    follow its letter directly (`-XPOST`). Flags get an empty value.
    """
    pairs: list[tuple[str | None, str]] = []
    index = 0

    def take_value(option: str) -> str:
        nonlocal index
        index += 1
        if index >= len(words):
            raise ValueError(f"curl option {option} needs a value")
        return words[index]

    while index < len(words):
        word = words[index]
        if word.startswith("--"):
            if word in _CURL_IGNORED_FLAGS:
                pass
            elif word in _CURL_FAIL_FLAGS:
                pairs.append(("-f", ""))
            elif word in _CURL_LONG_WITH_VALUE:
                pairs.append((_CURL_LONG_WITH_VALUE[word], take_value(word)))
            else:
                raise ValueError(f"curl option {word} is not supported")
        elif word.startswith("-") and len(word) > 1:
            letters = word[1:]
            position = 0
            while position < len(letters):
                letter = letters[position]
                if letter in _CURL_SHORT_WITH_VALUE:
                    rest = letters[position + 1 :]
                    value = rest if rest else take_value(f"-{letter}")
                    pairs.append((f"-{letter}", value))
                    break
                if letter in _CURL_SHORT_FLAGS:
                    if letter == "f":
                        pairs.append(("-f", ""))
                    position += 1
                    continue
                raise ValueError(f"curl option -{letter} is not supported")
        else:
            pairs.append((None, word))
        index += 1

    return pairs
