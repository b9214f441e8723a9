"""Text for Slack: cutting by characters, and masking secrets before anything is posted.

Slack counts characters (code points), so text is cut by code points and
never by bytes: `デプロイ完了😀` stays valid however it is cut.
"""

from __future__ import annotations

import re

ELLIPSIS = "…"

MASK = "****"

# Values that must never reach a channel, each with the part of the match to
# keep: Slack and bearer tokens, AWS access keys, passwords in URLs, and the
# values of KEY=VALUE pairs whose key names a secret.
_SECRET_PATTERNS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"xox[abposr]-[A-Za-z0-9-]{8,}"), MASK),
    (re.compile(r"xapp-[A-Za-z0-9-]{8,}"), MASK),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\g<1>" + MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),
    (re.compile(r"(://[^/\s:@]+:)[^@\s/]+(@)"), r"\g<1>" + MASK + r"\g<2>"),
    (re.compile(r"(?i)\b([A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|DSN)[A-Z0-9_]*\s*[=:]\s*)"
                r"(?:\"[^\"]*\"|'[^']*'|\S+)"), r"\g<1>" + MASK),
)


def mask_secrets(text: str) -> str:
    """Replace token-like values with a mask; the surrounding words stay readable."""
    masked = text
    for pattern, replacement in _SECRET_PATTERNS:
        masked = pattern.sub(replacement, masked)
    return masked


def cut_end(text: str, limit: int) -> str:
    """Keep the first `limit` characters, ending with an ellipsis when something was cut."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + ELLIPSIS


def tail_lines(lines: list[str], limit: int) -> str:
    """Join the last lines that fit in `limit` characters; a cut is marked on the first line."""
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        cost = len(line) + (1 if kept else 0)
        if used + cost > limit:
            break
        kept.append(line)
        used += cost
    kept.reverse()
    if len(kept) < len(lines):
        marker = f"{ELLIPSIS} ({len(lines) - len(kept)} lines above)"
        while kept and used + len(marker) + 1 > limit:
            used -= len(kept.pop(0)) + 1
        if not kept and lines:
            # One line longer than the limit: keep its end.
            last = lines[-1]
            return ELLIPSIS + last[-(limit - 1):] if limit > 1 else ELLIPSIS
        kept.insert(0, marker)
    return "\n".join(kept)
