"""The `postmerge` command line.

Exit codes: 0 completed (or a sound runbook), 1 failed (or an unsound
runbook), 2 aborted or bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from bot.errors import ConfigError, PostmergeError, RunbookError, RunConflict, RunNotFound, UsageError
from bot.i18n import LOCALES, current_locale, translate

# Width of tables when the output is a pipe or a file and COLUMNS is not set.
PIPE_COLUMNS = 160

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser(locale: str) -> argparse.ArgumentParser:
    # argparse formats help with %, so a literal % in a message is doubled.
    t = lambda key: translate(key, locale).replace("%", "%%")  # noqa: E731 - local shorthand
    # The common options are accepted before and after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS, help=t("cli.help_help"))
    common.add_argument("--db", default=argparse.SUPPRESS, help=t("cli.help_db"))
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=t("cli.help_config"))
    common.add_argument("--locale", choices=("ja", "en"), default=argparse.SUPPRESS, help=t("cli.help_locale"))
    # The actions are shared with every subcommand, so their default stays
    # SUPPRESS (set_defaults would change it for all) and parse_arguments fills in None.
    parser = argparse.ArgumentParser(prog="postmerge", description=t("cli.description"), parents=[common],
                                     add_help=False)
    commands = _Subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)

    lint = commands.add_parser("lint", help=t("cli.help_lint"))
    lint.add_argument("file", type=Path, help=t("cli.help_file"))

    plan = commands.add_parser("plan", help=t("cli.help_plan"))
    plan.add_argument("file", type=Path, help=t("cli.help_file"))
    plan.add_argument("--env", help=t("cli.help_env"))
    plan.add_argument("--json", action="store_true", help=t("cli.help_json"))

    run = commands.add_parser("run", help=t("cli.help_run"))
    run.add_argument("file", type=Path, help=t("cli.help_file"))
    run.add_argument("--env", help=t("cli.help_env"))
    run.add_argument("--yes", action="store_true", help=t("cli.help_yes"))
    run.add_argument("--dry-run", action="store_true", help=t("cli.help_dry_run"))

    status = commands.add_parser("status", help=t("cli.help_status"))
    status.add_argument("--json", action="store_true", help=t("cli.help_json"))
    status.add_argument("--all", action="store_true", help=t("cli.help_all"))

    resume = commands.add_parser("resume", help=t("cli.help_resume"))
    resume.add_argument("run_id", help=t("cli.help_run_id"))
    resume.add_argument("--yes", action="store_true", help=t("cli.help_yes"))
    resume.add_argument("--on-interrupted", choices=("retry", "done", "skipped", "abort"),
                        help=t("cli.help_on_interrupted"))
    resume.add_argument("--phase", type=int, help=t("cli.help_phase"))

    abort = commands.add_parser("abort", help=t("cli.help_abort"))
    abort.add_argument("run_id", help=t("cli.help_run_id"))

    rollback = commands.add_parser("rollback", help=t("cli.help_rollback"))
    rollback.add_argument("run_id", help=t("cli.help_run_id"))
    rollback.add_argument("--yes", action="store_true", help=t("cli.help_yes"))

    emergency = commands.add_parser("emergency", help=t("cli.help_emergency"))
    emergency.add_argument("run_id", help=t("cli.help_run_id"))
    emergency.add_argument("number", type=int, help=t("cli.help_emergency_number"))
    emergency.add_argument("--yes", action="store_true", help=t("cli.help_yes"))

    serve = commands.add_parser("serve", help=t("cli.help_serve"))
    serve.add_argument("--port", type=int, default=3000, help=t("cli.help_port"))

    sandbox = commands.add_parser("sandbox", help=t("cli.help_sandbox"))
    sandbox_commands = _Subcommands(
        sandbox.add_subparsers(dest="sandbox_command", required=True, metavar="ACTION"), common
    )
    up = sandbox_commands.add_parser("up", help=t("cli.help_sandbox_up"))
    up.add_argument("--reset", action="store_true", help=t("cli.help_sandbox_reset"))
    down = sandbox_commands.add_parser("down", help=t("cli.help_sandbox_down"))
    down.add_argument("--purge", action="store_true", help=t("cli.help_sandbox_purge"))
    switch = sandbox_commands.add_parser("switch", help=t("cli.help_sandbox_switch"))
    switch.add_argument("name")
    switch.add_argument("value", help=t("cli.help_switch_value"))
    sandbox_commands.add_parser("status", help=t("cli.help_sandbox_status"))
    return parser


class _Subcommands:
    """Add subcommands that all take the common options."""

    def __init__(self, action, common: argparse.ArgumentParser) -> None:
        self.action = action
        self.common = common

    def add_parser(self, name: str, **options) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], add_help=False, **options)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    for name in ("db", "config", "locale"):
        if not hasattr(args, name):
            setattr(args, name, None)
    return args


def exit_code_for(error: PostmergeError) -> int:
    """Return 1 for a failure of the work itself, 2 for a request that cannot be carried out."""
    if isinstance(error, RunbookError):
        return EXIT_FAILED if error.key == "runbook.unsound" else EXIT_USAGE
    if isinstance(error, (UsageError, ConfigError, RunNotFound, RunConflict)):
        return EXIT_USAGE
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configured = os.environ.get("POSTMERGE_LOCALE")
    if configured is not None and configured not in LOCALES:
        print(f"postmerge: POSTMERGE_LOCALE must be ja or en, not {configured!r}", file=sys.stderr)
        return EXIT_USAGE
    locale = current_locale(_early_locale(argv))
    args = parse_arguments(build_parser(locale), argv)
    locale = current_locale(args.locale)
    # Messages built deep in the engine read the locale from the environment.
    os.environ["POSTMERGE_LOCALE"] = locale
    # Logs go to stderr, apart from the progress on stdout: INFO adds a line per step.
    level = os.environ.get("POSTMERGE_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rich.console import Console

    # soft_wrap keeps messages on one line when the output is not a terminal. Rich
    # assumes 80 columns there, which cuts table cells in pipes and logs, so a
    # wider table is used unless COLUMNS sets the width.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPE_COLUMNS
    console = Console(stderr=False, highlight=False, soft_wrap=True, width=width)
    console.on_broken_pipe = _reader_went_away
    error_console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.command == "lint":
            from bot.commands import lint_command

            return lint_command(args, console, locale)
        if args.command == "plan":
            from bot.commands import plan_command

            return plan_command(args, console, locale)
        from bot.commands import run_async_command

        return asyncio.run(run_async_command(args, console, locale))
    except PostmergeError as error:
        # markup=False: an error may quote text in brackets, such as a TOML table name.
        error_console.print(translate("cli.error_prefix", locale) + error.render(locale), style="red",
                            highlight=False, soft_wrap=True, markup=False)
        return exit_code_for(error)
    except KeyboardInterrupt:
        error_console.print(translate("cli.interrupted", locale), style="red")
        return EXIT_USAGE
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK


def _quiet_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _reader_went_away() -> None:
    # The reader closed the pipe (`postmerge plan | head`): not a failure of postmerge.
    _quiet_stdout()
    raise SystemExit(EXIT_OK)


def _early_locale(argv: list[str]) -> str | None:
    for index, value in enumerate(argv):
        if value == "--locale" and index + 1 < len(argv):
            return argv[index + 1]
        if value.startswith("--locale="):
            return value.partition("=")[2]
    return None


if __name__ == "__main__":
    sys.exit(main())

