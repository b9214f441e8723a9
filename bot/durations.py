"""Durations as runbooks write them: 約30秒, 約10分, （15分）, 1時間30分, ~10 min, 90s."""

from __future__ import annotations

import re
import unicodedata

_UNIT_SECONDS = {
    "時間": 3600,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "分": 60,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "秒": 1,
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
}
_PREFIXES = ("約", "およそ", "最大", "~", "〜", "about", "approx.", "approx", "approximately", "ca.", "up to", "max")
_SUFFIXES = ("程度", "ほど", "以内", "くらい", "ぐらい")
_PART = re.compile(
    r"\s*(?P<number>[-+]?\d+(?:\.\d+)?)\s*(?P<unit>時間|分|秒|hours|hour|hrs|hr|h|minutes|minute|mins|min|m|seconds|second|secs|sec|s)(?![a-z])",
    re.IGNORECASE,
)


class DurationError(ValueError):
    """The text is not a duration; `reason` is "unreadable" or "negative"."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"{reason} duration: {text!r}")
        self.text = text
        self.reason = reason


def parse_duration(text: str) -> int:
    """Return the duration in whole seconds, rounding fractions of a second up."""
    original = text
    normalized = unicodedata.normalize("NFKC", text).strip().strip("()（）").strip()
    normalized = normalized.replace(",", "")
    lowered = normalized.lower()
    for prefix in _PREFIXES:
        if lowered.startswith(prefix):
            normalized = normalized[len(prefix):].strip()
            lowered = normalized.lower()
            break
    for suffix in _SUFFIXES:
        if normalized.endswith(suffix):
            normalized = normalized[: -len(suffix)].strip()

    total = 0.0
    position = 0
    matched = False
    while position < len(normalized):
        match = _PART.match(normalized, position)
        if match is None:
            raise DurationError(original, "unreadable")
        value = float(match.group("number"))
        if value < 0:
            raise DurationError(original, "negative")
        total += value * _UNIT_SECONDS[match.group("unit").lower()]
        position = match.end()
        matched = True
        while position < len(normalized) and normalized[position] in " 　":
            position += 1
    if not matched:
        raise DurationError(original, "unreadable")

    seconds = int(total)
    return seconds if seconds == total else seconds + 1


def looks_like_duration(text: str) -> bool:
    """Return whether text was meant as a duration: it contains a digit or a time unit."""
    normalized = unicodedata.normalize("NFKC", text)
    return bool(re.search(r"\d|時間|分|秒|\bmin|\bsec|\bhour", normalized, re.IGNORECASE))
