"""The database scripts: schema migration, v1-to-v2 data migration, rollback and the verify checks."""

from __future__ import annotations

import argparse
import asyncio

import asyncpg

from bot.sandbox import _schema
from bot.sandbox._script_support import (
    ScriptFailed,
    connect,
    non_negative_float_setting,
    positive_int_setting,
    sandbox_dir,
)
from bot.sandbox._state import read_switch_file

DEFAULT_BATCH_SIZE = 2000
DEFAULT_BATCH_DELAY_SECONDS = 0.1


async def migrate_schema(args: argparse.Namespace) -> None:
    """Add the version column if it is missing and mark every row without a version as v1."""
    connection = await connect()
    try:
        async with connection.transaction():
            had_column = await connection.fetchval(_schema.HAS_VERSION_COLUMN)
            await connection.execute("ALTER TABLE api_endpoints ADD COLUMN IF NOT EXISTS version text")
            status = await connection.execute("UPDATE api_endpoints SET version = 'v1' WHERE version IS NULL")
    finally:
        await connection.close()

    if had_column:
        print("column api_endpoints.version already exists")
    else:
        print("added column api_endpoints.version")
    # The status of an UPDATE is "UPDATE <rows>".
    print(f"marked {int(status.split()[-1])} rows without a version as v1")


async def migrate_data_v1_to_v2(args: argparse.Namespace) -> None:
    """Convert v1 rows to the v2 format in batches, one transaction per batch.

    A run that is killed loses at most its open batch, which PostgreSQL
    rolls back, so running the script again converts exactly the rows left.
    """
    batch_size = positive_int_setting("BATCH_SIZE", DEFAULT_BATCH_SIZE)
    delay_seconds = non_negative_float_setting("POSTMERGE_SANDBOX_BATCH_DELAY", DEFAULT_BATCH_DELAY_SECONDS)

    connection = await connect()
    try:
        await _require_version_column(connection)
        counts = await _count_versions(connection)
        if counts["unversioned"]:
            raise ScriptFailed(
                f"{counts['unversioned']} rows have no version; run `npm run migrate:schema` first"
            )
        total, converted = counts["total"], counts["v2"]
        if counts["v1"] == 0:
            print(f"nothing to migrate: {converted}/{total} rows are already v2")
            return

        print(
            f"migrating {counts['v1']} v1 rows to v2 in batches of {batch_size}"
            f" ({converted}/{total} rows already v2)"
        )
        sql = _schema.convert_batch_sql("v1", "v2", _schema.TO_V2_RESPONSE)
        last_id = 0
        try:
            while True:
                async with connection.transaction():
                    batch = await connection.fetch(sql, last_id, batch_size)
                if not batch:
                    break
                last_id = max(row["id"] for row in batch)
                converted += len(batch)
                print(f"migrated {converted}/{total} rows ({converted / total * 100:.1f}%)")
                if delay_seconds:
                    await asyncio.sleep(delay_seconds)
        except asyncio.CancelledError:
            print(f"interrupted with {converted}/{total} rows migrated; run the script again to continue")
            raise
    finally:
        await connection.close()

    print(f"done: {converted}/{total} rows are v2")


async def migrate_rollback(args: argparse.Namespace) -> None:
    """Convert v2 rows back to the v1 format and version. Does nothing when no row is v2."""
    batch_size = positive_int_setting("BATCH_SIZE", DEFAULT_BATCH_SIZE)

    connection = await connect()
    try:
        if not await connection.fetchval(_schema.HAS_VERSION_COLUMN):
            print("nothing to roll back: column api_endpoints.version does not exist")
            return
        counts = await _count_versions(connection)
        pending = counts["v2"]
        if pending == 0:
            print(f"nothing to roll back: no v2 rows ({counts['total']} rows in total)")
            return

        print(f"rolling back {pending} v2 rows to v1 in batches of {batch_size}")
        sql = _schema.convert_batch_sql("v2", "v1", _schema.TO_V1_RESPONSE)
        last_id = 0
        done = 0
        while True:
            async with connection.transaction():
                batch = await connection.fetch(sql, last_id, batch_size)
            if not batch:
                break
            last_id = max(row["id"] for row in batch)
            done += len(batch)
            print(f"rolled back {done}/{pending} rows ({done / pending * 100:.1f}%)")
    finally:
        await connection.close()

    print(f"done: {done} rows are v1 again")


async def verify(args: argparse.Namespace) -> None:
    """Check the row count against the expected count and each row's format against its version.

    Rows count as v1 when the version column does not exist yet.
    """
    connection = await connect()
    try:
        expected = await _expected_rows(connection)
        total = await connection.fetchval("SELECT count(*) FROM api_endpoints")
        problems = _count_problems(total, expected)
        problems += await _duplicate_problems(connection)

        if await connection.fetchval(_schema.HAS_VERSION_COLUMN):
            rows = await connection.fetch(
                f"""
                SELECT version, count(*) AS rows,
                       count(*) FILTER (WHERE NOT CASE version
                           WHEN 'v1' THEN {_schema.IS_V1_FORMAT}
                           WHEN 'v2' THEN {_schema.IS_V2_FORMAT}
                           ELSE false END) AS mismatched
                FROM api_endpoints GROUP BY version ORDER BY version NULLS FIRST
                """
            )
        else:
            print("column api_endpoints.version does not exist; checking every row against the v1 format")
            rows = await connection.fetch(
                f"SELECT 'v1' AS version, count(*) AS rows,"
                f" count(*) FILTER (WHERE NOT {_schema.IS_V1_FORMAT}) AS mismatched FROM api_endpoints"
            )
    finally:
        await connection.close()

    for row in rows:
        version = row["version"] or "no version"
        print(f"{version}: {row['rows']} rows, {row['mismatched']} not in the {version} format")
        if row["version"] is None:
            problems.append(f"{row['rows']} rows have no version")
        elif row["version"] not in ("v1", "v2"):
            problems.append(f"{row['rows']} rows have the unknown version {row['version']!r}")
        elif row["mismatched"]:
            problems.append(f"{row['mismatched']} {version} rows are not in the {version} format")

    if problems:
        raise ScriptFailed("integrity check failed: " + "; ".join(problems))
    print(f"ok: {total} rows, each in the format of its version")


async def verify_v2_migration(args: argparse.Namespace) -> None:
    """Check that every row is v2, in the v2 format, and that no row was lost or duplicated."""
    switches = read_switch_file(sandbox_dir())

    connection = await connect()
    try:
        await _require_version_column(connection)
        expected = await _expected_rows(connection)
        counts = await _count_versions(connection)
        malformed = await connection.fetchval(
            f"SELECT count(*) FROM api_endpoints WHERE version = 'v2' AND NOT {_schema.IS_V2_FORMAT}"
        )
        problems = _count_problems(counts["total"], expected)
        problems += await _duplicate_problems(connection)
    finally:
        await connection.close()

    print(
        f"rows: {counts['total']} (expected {expected}), v2: {counts['v2']}, v1: {counts['v1']},"
        f" other or no version: {counts['total'] - counts['v1'] - counts['v2']}"
    )
    not_v2 = counts["total"] - counts["v2"]
    if not_v2:
        problems.append(f"{not_v2} rows are not v2 yet; run `npm run migrate:data:v1-to-v2`")
    if malformed:
        problems.append(f"{malformed} v2 rows are not in the v2 format")
    if switches["integrity-failure"]:
        problems.append(
            "checksum mismatch in api_endpoints (injected by the sandbox switch integrity-failure;"
            " turn it off to pass)"
        )

    if problems:
        raise ScriptFailed("integrity check failed: " + "; ".join(problems))
    print(f"ok: all {counts['total']} rows are v2 and in the v2 format")


async def _require_version_column(connection: asyncpg.Connection) -> None:
    if not await connection.fetchval(_schema.HAS_VERSION_COLUMN):
        raise ScriptFailed("column api_endpoints.version is missing; run `npm run migrate:schema` first")


async def _count_versions(connection: asyncpg.Connection) -> dict[str, int]:
    row = await connection.fetchrow(
        """
        SELECT count(*) AS total,
               count(*) FILTER (WHERE version = 'v1') AS v1,
               count(*) FILTER (WHERE version = 'v2') AS v2,
               count(*) FILTER (WHERE version IS NULL) AS unversioned
        FROM api_endpoints
        """
    )
    return dict(row)


async def _expected_rows(connection: asyncpg.Connection) -> int:
    try:
        expected = await connection.fetchval(_schema.EXPECTED_ROWS)
    except asyncpg.UndefinedTableError:
        expected = None
    if expected is None:
        raise ScriptFailed("the expected row count is missing from sandbox_meta; reset the sandbox to restore it")
    return expected


def _count_problems(total: int, expected: int) -> list[str]:
    if total == expected:
        return []
    return [f"api_endpoints has {total} rows, expected {expected}"]


async def _duplicate_problems(connection: asyncpg.Connection) -> list[str]:
    duplicates = await connection.fetchval("SELECT count(*) - count(DISTINCT id) FROM api_endpoints")
    return [f"{duplicates} duplicate ids"] if duplicates else []
