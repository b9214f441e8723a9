"""The scripts that publish the release: source maps, API docs and the v1 deprecation e-mails.

None of them sends anything over the network. Each writes what it would
have sent into the working directory, where a test or a person can read it.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate, make_msgid
from pathlib import Path

from bot.sandbox._script_support import ScriptFailed, workdir

DEFAULT_SENTRY_RELEASE = "api@2.0.0"
SENDER = ("API Team", "api-team@example.com")
EMAIL_SUBJECT = "【重要】API v1 提供終了のお知らせ / API v1 deprecation notice"

# (method, path, description, example response) for the generated API docs.
V2_ENDPOINTS = (
    ("GET", "/v2/health", "Service health.", {"status": "ok", "version": "2.0.0"}),
    ("GET", "/v2/version", "Deployed API version.", {"version": "2.0.0"}),
    (
        "POST",
        "/v2/users",
        "Create a user from a JSON body with a name. Returns 201.",
        {"data": {"id": 1, "name": "Test User", "created_at": "2025-02-15T12:00:00+00:00"}, "meta": {"version": "2"}},
    ),
)

_CUSTOMER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def sentry_upload_sourcemaps(args: argparse.Namespace) -> None:
    """Record the source maps under dist/ as uploaded for the release, in sentry/releases/."""
    release = os.environ.get("SENTRY_RELEASE", "").strip() or DEFAULT_SENTRY_RELEASE
    root = workdir()
    maps = sorted((root / "dist").glob("*.map"))
    if not maps:
        raise ScriptFailed(f"no source maps found in {root / 'dist'}; build the app first")

    files = []
    for path in maps:
        content = path.read_bytes()
        files.append({"name": f"~/{path.name}", "bytes": len(content), "sha1": hashlib.sha1(content).hexdigest()})
        print(f"source map {path.relative_to(root)}: {len(content)} bytes, sha1 {files[-1]['sha1']}")

    record = root / "sentry" / "releases" / f"{_safe_file_name(release)}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    uploaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record.write_text(
        json.dumps({"release": release, "uploaded_at": uploaded_at, "files": files}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(f"recorded the source maps of release {release} in {record}; nothing was sent to Sentry")


def docs_generate(args: argparse.Namespace) -> None:
    """Write the v2 API reference to docs/api/v2/index.html."""
    target = workdir() / "docs" / "api" / "v2" / "index.html"
    target.parent.mkdir(parents=True, exist_ok=True)

    sections = []
    for method, path, description, example in V2_ENDPOINTS:
        sections.append(
            f"  <section>\n"
            f"    <h2><code>{method} {html.escape(path)}</code></h2>\n"
            f"    <p>{html.escape(description)}</p>\n"
            f"    <pre>{html.escape(json.dumps(example, indent=2, ensure_ascii=False))}</pre>\n"
            f"  </section>\n"
        )
    generated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    target.write_text(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n  <meta charset=\"utf-8\">\n"
        "  <title>API v2 reference</title>\n</head>\n<body>\n  <h1>API v2 reference</h1>\n"
        f"  <p>Base URL: https://api.example.com. Generated {generated_at}.</p>\n"
        + "".join(sections)
        + "</body>\n</html>\n",
        encoding="utf-8",
    )
    print(f"generated docs for {len(V2_ENDPOINTS)} endpoints in {target}")


def docs_deploy(args: argparse.Namespace) -> None:
    """Copy docs/api/v2/ to site/api/v2/, the sandbox's stand-in for https://docs.example.com/api/v2."""
    root = workdir()
    source = root / "docs" / "api" / "v2"
    if not (source / "index.html").is_file():
        raise ScriptFailed(f"{source / 'index.html'} not found; run `npm run docs:generate` first")

    target = root / "site" / "api" / "v2"
    shutil.copytree(source, target, dirs_exist_ok=True)
    count = sum(1 for path in target.rglob("*") if path.is_file())
    print(f"deployed the docs to {target} ({count} files in total)")


def notify_v1_deprecation(args: argparse.Namespace) -> None:
    """Write one deprecation e-mail per customer in data/customers.json to outbox/ as an .eml file."""
    root = workdir()
    template = _read_text(root / "templates" / "email" / "v1-deprecation.html")
    customers = _read_customers(root / "data" / "customers.json")
    deprecation_date = _deprecation_date(root / ".env.production")

    outbox = root / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    for customer in customers:
        message = _deprecation_message(template, customer, deprecation_date)
        path = outbox / f"{customer['id']}.eml"
        path.write_bytes(message.as_bytes(policy=SMTP))
        print(f"wrote {path.name} for {customer['email']}")

    print(f"wrote {len(customers)} messages to {outbox}; the sandbox never sends mail")


def _deprecation_message(template: str, customer: dict[str, str], deprecation_date: str) -> EmailMessage:
    body = template.replace("{{customer_name}}", html.escape(customer["name"]))
    body = body.replace("{{deprecation_date}}", html.escape(deprecation_date))

    message = EmailMessage()
    message["From"] = formataddr(SENDER)
    message["To"] = formataddr((customer["name"], customer["email"]))
    message["Subject"] = EMAIL_SUBJECT
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain="example.com")
    message.set_content(
        f"{customer['name']} 様\n\n"
        f"API v1 は {deprecation_date} をもって非推奨となります。API v2 への移行をお願いいたします。\n\n"
        f"API v1 is deprecated as of {deprecation_date}. Please move to API v2.\n"
        "https://docs.example.com/api/v2\n"
    )
    message.add_alternative(body, subtype="html")
    return message


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptFailed(f"{path} not found") from None


def _read_customers(path: Path) -> list[dict[str, str]]:
    try:
        customers = json.loads(_read_text(path))
    except ValueError as error:
        raise ScriptFailed(f"{path} is not valid JSON: {error}") from None

    if not isinstance(customers, list):
        raise ScriptFailed(f"{path} must contain a JSON list of customers")
    for index, customer in enumerate(customers):
        if not isinstance(customer, dict) or not all(isinstance(customer.get(key), str) for key in ("id", "name", "email")):
            raise ScriptFailed(f"customer {index} in {path} needs the string fields id, name and email")
        if not _CUSTOMER_ID.match(customer["id"]):
            raise ScriptFailed(f"customer id {customer['id']!r} in {path} may contain only letters, digits, - and _")
    return customers


def _deprecation_date(env_file: Path) -> str:
    """Return API_V1_DEPRECATION_DATE from the process environment, else from .env.production."""
    value = os.environ.get("API_V1_DEPRECATION_DATE", "").strip()
    if value:
        return value
    try:
        lines = env_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        name, separator, raw = line.partition("=")
        if separator and name.strip().removeprefix("export ").strip() == "API_V1_DEPRECATION_DATE":
            value = raw.strip().strip("'\"")
    if not value:
        raise ScriptFailed(f"API_V1_DEPRECATION_DATE is set neither in the environment nor in {env_file}")
    return value


def _safe_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
