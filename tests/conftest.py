"""Shared fixtures: throwaway PostgreSQL databases, store URLs and a CLI runner."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

PG_ADMIN_URL = os.environ.get("POSTMERGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parent.parent
REAL_RUNBOOK = REPO / "examples" / "api-v2-migration.md"


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def create_database(prefix: str = "postmerge_test") -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_database():
    """Yield the URL of a new, empty PostgreSQL database and drop it afterwards."""
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """Yield a run store URL for each backend the engine supports."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        return
    name, url = create_database("postmerge_store")
    try:
        yield url.replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        drop_database(name)


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("POSTMERGE_DATABASE_URL", None)
    env.update(POSTMERGE_HOME=str(home), POSTMERGE_LOCALE="en", COLUMNS="200", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(*args: str, home: Path, input: str | None = None, timeout: float = 300,
            env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `postmerge ARGS` in a child process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        cwd=cwd or home,
        env=env or cli_env(home),
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def sandbox(tmp_path):
    """Start a sandbox with its own home and database; yield (home, env, database URL)."""
    home = tmp_path / "home"
    home.mkdir()
    database = f"postmerge_e2e_{uuid.uuid4().hex[:10]}"
    env = cli_env(home, POSTMERGE_SANDBOX_DB=database, POSTMERGE_SANDBOX_PG_URL=PG_ADMIN_URL)
    result = run_cli("sandbox", "up", home=home, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield home, env, f"{base}/{database}"
    finally:
        run_cli("sandbox", "down", "--purge", home=home, env=env)
        drop_database(database)
