"""Create, seed and drop the sandbox database."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from bot.errors import PostmergeError
from bot.sandbox import _schema
from bot.sandbox._state import SandboxSettings, mask_url

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10
# A migration script holding row locks makes a re-seed wait, so give up
# with a clear error instead of hanging.
LOCK_TIMEOUT = "10s"


async def ensure_database(settings: SandboxSettings, *, reset: bool) -> list[str]:
    """Create the database and seed its tables where missing, or always with reset.

    Returns the changes made: "database_created", "seeded", "meta_created".
    """
    changes: list[str] = []
    if await _create_database_if_missing(settings):
        changes.append("database_created")

    connection = await _connect(settings.database_url)
    try:
        await connection.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        has_table = await connection.fetchval(_schema.TABLE_EXISTS, _schema.TABLE)
        has_meta = await connection.fetchval(_schema.TABLE_EXISTS, _schema.META_TABLE)

        if reset or not has_table:
            await _seed(connection, settings.rows)
            changes.append("seeded")
        elif not has_meta:
            async with connection.transaction():
                await connection.execute(_schema.CREATE_META_TABLE)
                await connection.execute(_schema.INSERT_META, settings.rows)
            changes.append("meta_created")
    except asyncpg.LockNotAvailableError:
        raise PostmergeError("sandbox.database_busy", database=settings.database) from None
    except asyncpg.PostgresError as error:
        raise PostmergeError("sandbox.database_failed", database=settings.database, error=str(error)) from None
    finally:
        await connection.close()

    return changes


async def drop_database(settings: SandboxSettings) -> bool:
    """Drop the sandbox database, closing its open connections. Returns whether it existed."""
    connection = await _connect(settings.admin_url)
    try:
        existed = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", settings.database)
        # The name matched SandboxSettings.validate's identifier pattern, so quoting is enough.
        await connection.execute(f'DROP DATABASE IF EXISTS "{settings.database}" WITH (FORCE)')
    except asyncpg.PostgresError as error:
        raise PostmergeError("sandbox.database_failed", database=settings.database, error=str(error)) from None
    finally:
        await connection.close()

    if existed:
        logger.info("dropped sandbox database %s", settings.database)
    return bool(existed)


async def _create_database_if_missing(settings: SandboxSettings) -> bool:
    connection = await _connect(settings.admin_url)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", settings.database)
        if exists:
            return False
        await connection.execute(f'CREATE DATABASE "{settings.database}"')
    except asyncpg.DuplicateDatabaseError:
        # Another `up` created it between the check and the CREATE.
        return False
    except asyncpg.PostgresError as error:
        raise PostmergeError("sandbox.database_failed", database=settings.database, error=str(error)) from None
    finally:
        await connection.close()

    logger.info("created sandbox database %s", settings.database)
    return True


async def _seed(connection: asyncpg.Connection, rows: int) -> None:
    async with connection.transaction():
        await connection.execute(_schema.DROP_TABLES)
        await connection.execute(_schema.CREATE_ENDPOINTS_TABLE)
        await connection.execute(_schema.CREATE_META_TABLE)
        await connection.execute(_schema.SEED_ROWS, rows)
        await connection.execute(_schema.INSERT_META, rows)
    await connection.execute(f"ANALYZE {_schema.TABLE}")
    logger.info("seeded %s with %d v1 rows", _schema.TABLE, rows)


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as error:
        raise PostmergeError(
            "sandbox.pg_unreachable", url=mask_url(url), error=str(error) or type(error).__name__
        ) from None
