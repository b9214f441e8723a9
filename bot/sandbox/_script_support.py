"""Helpers shared by the sandbox scripts: settings from the environment, the database and tools."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bot.sandbox._state import mask_url


class ScriptFailed(Exception):
    """A script failure. Its message is the one-line reason printed before the script exits with status 1."""


def database_url() -> str:
    url = os.environ.get("SANDBOX_DATABASE_URL", "").strip()
    if not url:
        raise ScriptFailed(
            "SANDBOX_DATABASE_URL is not set; run this script in the postmerge sandbox environment"
        )
    return url


async def connect() -> asyncpg.Connection:
    url = database_url()
    try:
        return await asyncpg.connect(url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise ScriptFailed(f"cannot connect to the sandbox database {mask_url(url)}: {error}") from None


def sandbox_dir() -> Path:
    """Return the sandbox folder: SANDBOX_DIR, or the parent of the working directory npm runs in."""
    configured = os.environ.get("SANDBOX_DIR")
    if configured:
        return Path(configured)
    parent = Path.cwd().parent
    if (parent / "state.json").is_file():
        return parent
    raise ScriptFailed("SANDBOX_DIR is not set and the current directory is not a sandbox working directory")


def workdir() -> Path:
    """Return the sandbox working directory, or the current directory outside a sandbox environment."""
    configured = os.environ.get("SANDBOX_DIR")
    return Path(configured) / "work" if configured else Path.cwd()


def positive_int_setting(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ScriptFailed(f"{name} must be a positive integer, not {raw!r}")
    return value


def non_negative_float_setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ScriptFailed(f"{name} must be a number of seconds of 0 or more, not {raw!r}")
    return value


def run_postgres_tool(name: str, arguments: list[str], url: str) -> None:
    """Run pg_dump or pg_restore against url, raising ScriptFailed with its last error line.

    A password in the URL goes to the tool as PGPASSWORD, so that it does not
    show in the process list.
    """
    executable = shutil.which(name)
    if executable is None:
        raise ScriptFailed(f"{name} not found on PATH; install the PostgreSQL client tools")

    parts = urlsplit(url)
    environment = dict(os.environ)
    if parts.password is not None:
        environment["PGPASSWORD"] = parts.password
        userinfo, _, hostport = parts.netloc.rpartition("@")
        url = urlunsplit(parts._replace(netloc=userinfo.split(":", 1)[0] + "@" + hostport))

    completed = subprocess.run(
        [executable, *arguments, "--dbname", url],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else "no error output"
        raise ScriptFailed(f"{name} failed with exit code {completed.returncode}: {reason}")
