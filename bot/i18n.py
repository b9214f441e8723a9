"""Message catalogs: Japanese by default, English when configured.

Catalogs are TOML files under bot/locales/<locale>/, one per area, merged
into one flat table of dotted keys such as "lint.duplicate_phase".
"""

from __future__ import annotations

import os
import tomllib
from functools import cache
from pathlib import Path

LOCALES = ("ja", "en")
DEFAULT_LOCALE = "ja"
_ROOT = Path(__file__).parent / "locales"


def current_locale(locale: str | None = None) -> str:
    chosen = locale or os.environ.get("POSTMERGE_LOCALE") or DEFAULT_LOCALE
    return chosen if chosen in LOCALES else DEFAULT_LOCALE


@cache
def catalog(locale: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for path in sorted((_ROOT / locale).glob("*.toml")):
        with path.open("rb") as handle:
            _flatten(tomllib.load(handle), "", table)
    return table


def _flatten(data: dict, prefix: str, into: dict[str, str]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, dotted + ".", into)
        else:
            into[dotted] = str(value)


def translate(key: str, locale: str | None = None, /, **params: object) -> str:
    """Return the message for key in locale, falling back to English, then to the key."""
    chosen = current_locale(locale)
    template = catalog(chosen).get(key) or catalog("en").get(key)
    if template is None:
        details = ", ".join(f"{name}={value}" for name, value in params.items())
        return f"{key} ({details})" if details else key
    try:
        return template.format(**params)
    except (KeyError, IndexError, ValueError):
        return template
