"""The sandbox's stand-ins for the API service's npm scripts.

The sandbox package.json runs `python -m bot.sandbox.scripts <command>`,
where the command is the npm script name with ':' replaced by '-'. `restore`
is no npm script: the sandbox environment runs it in place of the runbook's
bare `pg_restore`.

Every command reads SANDBOX_DATABASE_URL, prints its progress, and on
failure prints one line starting with "error:" to stderr and exits with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from collections.abc import Callable

import asyncpg

from bot.sandbox import _backups, _migrations, _publishing
from bot.sandbox._script_support import ScriptFailed

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], object], str]] = {
    "migrate-schema": (_migrations.migrate_schema, "add the version column and mark existing rows v1"),
    "migrate-data-v1-to-v2": (_migrations.migrate_data_v1_to_v2, "convert v1 rows to the v2 format in batches"),
    "migrate-rollback": (_migrations.migrate_rollback, "convert v2 rows back to v1"),
    "db-verify": (_migrations.verify, "check the row count and that each row matches its version"),
    "db-verify-v2-migration": (_migrations.verify_v2_migration, "check that every row is migrated to v2"),
    "backup-api-data": (_backups.backup_api_data, "pg_dump api_endpoints to the artifacts folder"),
    "restore": (_backups.restore, "pg_restore api_endpoints from the last backup"),
    "sentry-upload-sourcemaps": (_publishing.sentry_upload_sourcemaps, "record the source maps of the release"),
    "docs-generate": (_publishing.docs_generate, "write the v2 API docs to docs/api/v2/"),
    "docs-deploy": (_publishing.docs_deploy, "copy the v2 API docs to site/api/v2/"),
    "notify-v1-deprecation": (_publishing.notify_v1_deprecation, "write the deprecation e-mails to outbox/"),
}

EXIT_FAILED = 1
# The shell's convention for a process ended by SIGINT.
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot.sandbox.scripts", description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        subcommand = subcommands.add_parser(name, help=summary, description=summary)
        if name == "restore":
            subcommand.add_argument("--file", help="dump to restore instead of the last backup")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress lines must reach a reader that streams the output while the script runs.
    sys.stdout.reconfigure(line_buffering=True)

    function, _ = COMMANDS[args.command]
    try:
        if inspect.iscoroutinefunction(function):
            asyncio.run(function(args))
        else:
            function(args)
    except ScriptFailed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except asyncpg.PostgresError as error:
        print(f"error: database error {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"error: {args.command} interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away. Point stdout at /dev/null so that
        # the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
