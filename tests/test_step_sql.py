"""SqlExecutor against the PostgreSQL on 127.0.0.1:5432, in a database each test creates and drops."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from bot.config import Environment
from bot.errors import StepError
from bot.plan import Step
from steps.base import OutputBuffer, StepContext
from steps.sql import SqlExecutor, format_table, redact_url

SERVER_URL = "postgresql://postgres@127.0.0.1:5432"

# The Verification section's database checks, as the runbook writes them.
SCHEMA_QUERY = "SELECT column_name FROM information_schema.columns WHERE table_name='api_endpoints';"
COUNT_QUERY = "SELECT version, COUNT(*) FROM api_endpoints GROUP BY version;"


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    name = f"postmerge_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{SERVER_URL}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{SERVER_URL}/{name}"
    try:
        connection = await asyncpg.connect(url)
        await connection.execute(
            """
            CREATE TABLE api_endpoints (
                id serial PRIMARY KEY,
                path text NOT NULL,
                version text NOT NULL DEFAULT 'v1'
            );
            INSERT INTO api_endpoints (path, version)
            SELECT '/users/' || n, CASE WHEN n <= 30 THEN 'v1' ELSE 'v2' END
            FROM generate_series(1, 42) AS n;
            """
        )
        await connection.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def make_context(query: str, database_url: str | None, tmp_path: Path, timeout: float = 10.0) -> StepContext:
    step = Step(id="s1", title="check", kind="sql", source_line=1, query=query)
    environment = Environment(name="sandbox", workdir=tmp_path, database_url=database_url)
    return StepContext(
        run_id="run-1",
        step=step,
        environment=environment,
        artifacts_dir=tmp_path,
        output=OutputBuffer(limit_bytes=1_000_000),
        timeout_seconds=timeout,
    )


async def test_sql_runbook_schema_query(database_url: str, tmp_path: Path) -> None:
    context = make_context(SCHEMA_QUERY, database_url, tmp_path)

    result = await SqlExecutor().execute(context)

    assert result.ok
    assert result.data["rows"] == 3
    lines = context.output.text().splitlines()
    assert lines[0] == "column_name"
    assert lines[1] == "-----------"
    assert sorted(lines[2:5]) == ["id", "path", "version"]
    assert lines[5] == "(3 rows)"
    assert "3" in result.summary


async def test_sql_runbook_count_query(database_url: str, tmp_path: Path) -> None:
    context = make_context(COUNT_QUERY + "\n", database_url, tmp_path)

    result = await SqlExecutor().execute(context)

    assert result.data["rows"] == 2
    assert result.data["columns"] == ["version", "count"]
    lines = context.output.text().splitlines()
    assert lines[0] == "version | count"
    assert lines[1] == "--------+------"
    assert sorted(lines[2:4]) == ["v1      |    30", "v2      |    12"]


async def test_sql_output_capped_at_200_rows(database_url: str, tmp_path: Path) -> None:
    context = make_context("SELECT n FROM generate_series(1, 250) AS n", database_url, tmp_path)

    result = await SqlExecutor().execute(context)

    assert result.data["rows"] == 250
    lines = context.output.text().splitlines()
    assert lines[2].strip() == "1"
    assert lines[201].strip() == "200"
    assert lines[202] == "... 50 more rows not shown"
    assert lines[203] == "(250 rows)"


async def test_sql_write_rejected(database_url: str, tmp_path: Path) -> None:
    query = "INSERT INTO api_endpoints (path) VALUES ('/written')"
    context = make_context(query, database_url, tmp_path)

    with pytest.raises(StepError) as caught:
        await SqlExecutor().execute(context)

    error = caught.value
    assert error.key == "sql.write_rejected"
    assert error.params["query"] == query
    assert "read-only transaction" in error.params["error"]
    assert "READ ONLY" in error.render("en")
    connection = await asyncpg.connect(database_url)
    written = await connection.fetchval("SELECT count(*) FROM api_endpoints WHERE path = '/written'")
    await connection.close()
    assert written == 0


async def test_sql_multiple_statements_rejected(database_url: str, tmp_path: Path) -> None:
    query = "COMMIT; DELETE FROM api_endpoints"
    context = make_context(query, database_url, tmp_path)

    with pytest.raises(StepError) as caught:
        await SqlExecutor().execute(context)

    assert caught.value.key == "sql.query_failed"
    assert "multiple commands" in caught.value.params["error"]
    connection = await asyncpg.connect(database_url)
    remaining = await connection.fetchval("SELECT count(*) FROM api_endpoints")
    await connection.close()
    assert remaining == 42


async def test_sql_session_defaults_read_only(database_url: str, tmp_path: Path) -> None:
    context = make_context("SHOW default_transaction_read_only", database_url, tmp_path)

    await SqlExecutor().execute(context)

    assert context.output.text().splitlines()[2] == "on"


async def test_sql_syntax_error(database_url: str, tmp_path: Path) -> None:
    query = "SELEC version FROM api_endpoints"
    context = make_context(query, database_url, tmp_path)

    with pytest.raises(StepError) as caught:
        await SqlExecutor().execute(context)

    error = caught.value
    assert error.key == "sql.query_failed"
    assert error.params["query"] == query
    assert 'syntax error at or near "SELEC"' in error.params["error"]
    assert "42601" in error.params["error"]
    assert query in error.render("ja")


async def test_sql_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    url = f"postgresql://postgres:secret@127.0.0.1:{port}/postgres"
    context = make_context("SELECT 1", url, tmp_path)

    with pytest.raises(StepError) as caught:
        await SqlExecutor().execute(context)

    error = caught.value
    assert error.key == "sql.connection_failed"
    assert error.params["environment"] == "sandbox"
    assert error.params["url"] == f"postgresql://postgres:***@127.0.0.1:{port}/postgres"
    assert "Connection refused" in error.params["error"] or "Connect call failed" in error.params["error"]
    assert "secret" not in error.render("en")


async def test_sql_missing_database_url(tmp_path: Path) -> None:
    context = make_context("SELECT 1", None, tmp_path)

    with pytest.raises(StepError) as caught:
        await SqlExecutor().execute(context)

    assert caught.value.key == "sql.missing_database_url"
    assert caught.value.params["environment"] == "sandbox"
    assert "database_url" in caught.value.render("en")


async def test_sql_missing_database(tmp_path: Path) -> None:
    url = f"{SERVER_URL}/postmerge_test_absent_{uuid.uuid4().hex[:8]}"
    context = make_context("SELECT 1", url, tmp_path)

    with pytest.raises(StepError) as caught:
        await SqlExecutor().execute(context)

    assert caught.value.key == "sql.connection_failed"
    assert "does not exist" in caught.value.params["error"]


async def test_sql_cancel_stops_server_query(database_url: str, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    context = make_context(f"SELECT pg_sleep(30), '{marker}'", database_url, tmp_path, timeout=60)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(SqlExecutor().execute(context), timeout=1.0)

    connection = await asyncpg.connect(database_url)
    running = await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
        f"%{marker}%",
    )
    await connection.close()
    assert running == 0


async def test_sql_statement_timeout(database_url: str, tmp_path: Path) -> None:
    context = make_context("SELECT pg_sleep(5)", database_url, tmp_path, timeout=0.5)

    with pytest.raises(StepError) as caught:
        await SqlExecutor().execute(context)

    assert caught.value.key == "sql.timed_out"


async def test_sql_error_before_engine_timeout(database_url: str, tmp_path: Path) -> None:
    context = make_context("SELECT pg_sleep(5)", database_url, tmp_path, timeout=1.0)

    with pytest.raises(StepError) as caught:
        async with asyncio.timeout(context.timeout_seconds):
            await SqlExecutor().execute(context)

    assert caught.value.key == "sql.timed_out"


def test_format_table_aligns_wide_characters() -> None:
    lines = format_table(["name", "n"], [("移行", 1), ("ab", None), ("x\ny", 10)])

    assert lines == [
        "name | n",
        "-----+-----",
        "移行 |    1",
        "ab   | NULL",
        "x\\ny |   10",
    ]


def test_redact_url_hides_password() -> None:
    assert redact_url("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact_url("postgresql://app@db/x") == "postgresql://app@db/x"


async def test_sql_cancelled_by_admin_not_timeout(database_url: str, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    context = make_context(f"SELECT pg_sleep(10), '{marker}'", database_url, tmp_path, timeout=30)
    task = asyncio.create_task(SqlExecutor().execute(context))
    admin = await asyncpg.connect(database_url)
    cancelled = False
    for _ in range(50):
        await asyncio.sleep(0.05)
        cancelled = await admin.fetchval(
            "SELECT bool_or(pg_cancel_backend(pid)) FROM pg_stat_activity"
            " WHERE query LIKE $1 AND pid <> pg_backend_pid()",
            f"%{marker}%",
        )
        if cancelled:
            break
    await admin.close()
    assert cancelled

    with pytest.raises(StepError) as caught:
        await task

    assert caught.value.key == "sql.query_failed"
    assert "57014" in caught.value.params["error"]
