"""The backup script (pg_dump of api_endpoints) and the restore command that replaces pg_restore in the sandbox."""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from pathlib import Path

from bot.sandbox import _schema
from bot.sandbox._script_support import ScriptFailed, connect, database_url, run_postgres_tool, workdir

DUMP_NAME = "api-data.dump"


def dump_path() -> Path:
    """Return where the backup goes: the run's artifacts folder, else backups/ in the working directory."""
    artifacts = os.environ.get("POSTMERGE_ARTIFACTS_DIR", "").strip()
    folder = Path(artifacts) if artifacts else workdir() / "backups"
    return folder / DUMP_NAME


def latest_pointer() -> Path:
    """Return the file that records the path of the last backup, wherever it was written."""
    return workdir() / "backups" / "LATEST"


async def backup_api_data(args: argparse.Namespace) -> None:
    """Dump the api_endpoints table in pg_dump's custom format."""
    connection = await connect()
    try:
        rows = await connection.fetchval(f"SELECT count(*) FROM {_schema.TABLE}")
    finally:
        await connection.close()

    target = dump_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Dump to a side file first, so a failed dump never replaces a good backup.
    partial = target.with_name(target.name + ".partial")
    run_postgres_tool("pg_dump", ["--format=custom", f"--table={_schema.TABLE}", f"--file={partial}"], database_url())
    os.replace(partial, target)

    pointer = latest_pointer()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(f"{target.absolute()}\n", encoding="utf-8")
    print(f"backed up {rows} rows of {_schema.TABLE} to {target} ({target.stat().st_size} bytes)")


async def restore(args: argparse.Namespace) -> None:
    """Replace api_endpoints with the backup, in one transaction."""
    source = Path(args.file) if args.file else _find_backup()
    if not source.is_file():
        raise ScriptFailed(f"backup {source} not found; run `npm run backup:api-data` first")

    taken_at = datetime.fromtimestamp(source.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    print(f"restoring {_schema.TABLE} from {source} (taken {taken_at})")
    run_postgres_tool(
        "pg_restore",
        ["--clean", "--if-exists", "--no-owner", "--single-transaction", str(source)],
        database_url(),
    )

    connection = await connect()
    try:
        rows = await connection.fetchval(f"SELECT count(*) FROM {_schema.TABLE}")
    finally:
        await connection.close()
    print(f"restored {_schema.TABLE}: {rows} rows")


def _find_backup() -> Path:
    """Return this run's backup, else the last backup of any run, which the rollback of a run may need."""
    expected = dump_path()
    if expected.is_file():
        return expected

    try:
        latest = Path(latest_pointer().read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        latest = None
    if latest is not None and latest.is_file():
        print(f"{expected} not found; using the last backup, {latest}")
        return latest
    raise ScriptFailed(f"backup {expected} not found; run `npm run backup:api-data` first")
