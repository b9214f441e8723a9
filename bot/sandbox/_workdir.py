"""The sandbox working directory: the API service's package.json, config files and templates."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

TEMPLATE_ROOT = Path(__file__).parent / "files" / "work"

# Template files are stored without a leading dot, because package-data globs
# skip hidden files. Template path -> path in the working directory.
RENAMED_FILES = {
    "env.production": ".env.production",
    "npmrc": ".npmrc",
}

# The npm scripts the runbook names, plus the rollback and verify scripts.
# Each runs `python -m bot.sandbox.scripts <name with ':' replaced by '-'>`.
NPM_SCRIPTS = (
    "backup:api-data",
    "migrate:schema",
    "migrate:data:v1-to-v2",
    "migrate:rollback",
    "db:verify",
    "db:verify:v2-migration",
    "sentry:upload-sourcemaps",
    "docs:generate",
    "docs:deploy",
    "notify:v1-deprecation",
)

# Folders that the scripts write into. A reset removes them.
GENERATED_DIRS = ("backups", "docs", "site", "outbox", "sentry")


def script_command(python: str, subcommand: str) -> str:
    """Return the shell command that runs one sandbox script with the given interpreter."""
    return f"{shlex.quote(python)} -m bot.sandbox.scripts {subcommand}"


def render_package_json(python: str) -> str:
    package = {
        "name": "api-service",
        "version": "2.0.0",
        "private": True,
        "description": "postmerge sandbox stand-in for the API service; every script runs bot.sandbox.scripts",
        "scripts": {name: script_command(python, name.replace(":", "-")) for name in NPM_SCRIPTS},
    }
    return json.dumps(package, indent=2, ensure_ascii=False) + "\n"


def ensure_workdir(work: Path, python: str, *, reset: bool) -> list[str]:
    """Create the files of the working directory that are missing, or all of them with reset.

    package.json is rewritten whenever its interpreter path changed, because
    its scripts must run the Python that has postmerge installed. Returns the
    changes made: "workdir_created", "workdir_reset", "files_added".
    """
    changes: list[str] = []
    if not work.exists():
        changes.append("workdir_created")
    elif reset:
        changes.append("workdir_reset")
    work.mkdir(parents=True, exist_ok=True)

    if reset:
        for name in GENERATED_DIRS:
            shutil.rmtree(work / name, ignore_errors=True)

    added = 0
    for source in sorted(TEMPLATE_ROOT.rglob("*")):
        if not source.is_file():
            continue
        relative = source.relative_to(TEMPLATE_ROOT).as_posix()
        target = work / RENAMED_FILES.get(relative, relative)
        if reset or not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            added += 1

    package_json = work / "package.json"
    content = render_package_json(python)
    if reset or not package_json.exists() or package_json.read_text(encoding="utf-8") != content:
        package_json.write_text(content, encoding="utf-8")
        added += 1

    if added and not changes:
        changes.append("files_added")
    logger.info("sandbox working directory %s ready, %d files written", work, added)
    return changes
