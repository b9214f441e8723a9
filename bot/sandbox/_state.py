"""Paths, settings, the state file and the fault switches of one sandbox.

Everything here uses the standard library only, because the sandbox scripts
and every CLI start import it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from bot.errors import PostmergeError, UsageError

STATE_FORMAT = 1

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DATABASE = "postmerge_sandbox"
DEFAULT_ROWS = 80_000

# Switch name -> what turning it on does. The scripts read the switch file on every run.
KNOWN_SWITCHES: dict[str, str] = {
    "integrity-failure": "db:verify:v2-migration reports a checksum mismatch and fails",
    "v2-unhealthy": "the v2 service answers /v2/health with HTTP 503, so the phase 3 health check fails",
}


@dataclass(frozen=True)
class NumericSwitch:
    """A fault switch whose value is a number. The value 0 turns it off."""

    description: str
    minimum: float
    maximum: float


# Switch name -> what its value does. The v2 service reads the switch file at most
# every 0.5 seconds (bot/sandbox/service.py), so a new value takes effect within a second.
NUMERIC_SWITCHES: dict[str, NumericSwitch] = {
    "v2-error-percent": NumericSwitch("this percentage of v2 responses are HTTP 500", 0, 100),
    "v2-latency-ms": NumericSwitch("v2 responses are delayed so that their p95 latency is about this many ms",
                                   0, 60_000),
}

# Unquoted PostgreSQL identifiers only, so the name never needs escaping in
# shell commands or in messages. PostgreSQL truncates names at 63 bytes.
_DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class SandboxPaths:
    """The files of the sandbox under one postmerge home."""

    root: Path

    @classmethod
    def under(cls, home: Path) -> SandboxPaths:
        return cls(Path(home).expanduser().absolute() / "sandbox")

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def switches_file(self) -> Path:
        return self.root / "switches.json"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def service_log(self) -> Path:
        return self.root / "service.log"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def saas_credentials(self) -> Path:
        return self.root / "saas-credentials.json"

    @property
    def nginx(self) -> Path:
        return self.root / "nginx"

    @property
    def port_file(self) -> Path:
        return self.root / "service.port"


@dataclass(frozen=True)
class SandboxSettings:
    """Location of the sandbox database and the number of rows it is seeded with."""

    admin_url: str
    database: str
    rows: int

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> SandboxSettings:
        """Read POSTMERGE_SANDBOX_PG_URL, POSTMERGE_SANDBOX_DB and POSTMERGE_SANDBOX_ROWS."""
        environ = os.environ if environ is None else environ
        raw_rows = environ.get("POSTMERGE_SANDBOX_ROWS", str(DEFAULT_ROWS)).strip()
        try:
            rows = int(raw_rows)
        except ValueError:
            rows = 0
        if rows < 1:
            raise PostmergeError("sandbox.invalid_rows", value=raw_rows)

        settings = cls(
            admin_url=environ.get("POSTMERGE_SANDBOX_PG_URL", DEFAULT_ADMIN_URL).strip(),
            database=environ.get("POSTMERGE_SANDBOX_DB", DEFAULT_DATABASE).strip(),
            rows=rows,
        )
        settings.validate()
        return settings

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SandboxSettings:
        return cls(
            admin_url=state["admin_url"],
            database=state["database"],
            rows=int(state["rows"]),
        )

    def validate(self) -> None:
        """Raise PostmergeError unless the URL is a loopback PostgreSQL and the name is safe to drop.

        `down(purge=True)` drops the database, so it may be neither a system
        database nor the one the admin URL connects to.
        """
        parts = urlsplit(self.admin_url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise PostmergeError("sandbox.invalid_pg_url", url=mask_url(self.admin_url))
        # An empty host means the default Unix socket, which is local too.
        host = parts.hostname or ""
        if host and not host.startswith("/") and host not in _LOOPBACK_HOSTS:
            raise PostmergeError("sandbox.pg_url_not_local", url=mask_url(self.admin_url))

        admin_database = unquote(parts.path.lstrip("/"))
        if (
            not _DATABASE_NAME.match(self.database)
            or self.database in _RESERVED_DATABASES
            or self.database == admin_database
        ):
            raise PostmergeError("sandbox.invalid_database_name", name=self.database)

    @property
    def database_url(self) -> str:
        """Return the admin URL with its database replaced by the sandbox database."""
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + quote(self.database)))


def mask_url(url: str) -> str:
    """Return url with its password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = userinfo.split(":", 1)[0] + ":***@" + hostport
    return urlunsplit(parts._replace(netloc=netloc))


def read_state(paths: SandboxPaths) -> dict[str, Any] | None:
    """Return the saved state, None when there is none.

    Raises PostmergeError when the file exists but cannot be used.
    """
    try:
        text = paths.state_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise PostmergeError("sandbox.state_invalid", path=str(paths.state_file), error=str(error)) from None

    try:
        state = json.loads(text)
        SandboxSettings.from_state(state).validate()
        Path(state["workdir"])
        str(state["python"])
    except (ValueError, KeyError, TypeError, PostmergeError) as error:
        raise PostmergeError("sandbox.state_invalid", path=str(paths.state_file), error=str(error)) from None
    if state.get("format") != STATE_FORMAT:
        raise PostmergeError(
            "sandbox.state_invalid",
            path=str(paths.state_file),
            error=f"unsupported format {state.get('format')!r}, expected {STATE_FORMAT}",
        )
    return state


def write_state(paths: SandboxPaths, state: dict[str, Any]) -> None:
    write_json_atomic(paths.state_file, state)


def read_switch_file(root: Path) -> dict[str, bool | float]:
    """Return every boolean switch with its value, and each numeric switch the file sets to a non-zero value.

    Boolean switches are off unless the switch file turns them on. The file is
    a JSON object such as {"integrity-failure": true, "v2-error-percent": 2}.
    A numeric switch that is unset or 0 is left out, so a caller that writes
    the returned values back keeps the numeric switches that are set.
    """
    saved = _read_saved_switches(root / "switches.json")
    switches: dict[str, bool | float] = {name: False for name in KNOWN_SWITCHES}
    for name, value in saved.items():
        if name in switches:
            switches[name] = bool(value)
    for name, value in numeric_switch_values(saved).items():
        if value:
            switches[name] = value
    return switches


def read_numeric_switches(path: Path) -> dict[str, float]:
    """Return every numeric switch with its value in the switch file at path, 0 when unset.

    Raises PostmergeError when the file exists but is not valid JSON.
    """
    return numeric_switch_values(_read_saved_switches(path))


def read_service_switches(path: Path) -> tuple[dict[str, float], bool]:
    """Return the numeric switches and whether v2-unhealthy is on, from one read of the switch file at path."""
    saved = _read_saved_switches(path)
    return numeric_switch_values(saved), saved.get("v2-unhealthy") is True


def numeric_switch_values(saved: dict[str, Any]) -> dict[str, float]:
    """Return every numeric switch with its value in the parsed switch file, 0 when unset or invalid.

    A value outside the switch's range is clamped to it. `true` is not a number
    and reads as 0, like `false`, so `switch v2-error-percent on` does nothing.
    """
    values = {name: 0.0 for name in NUMERIC_SWITCHES}
    for name, switch in NUMERIC_SWITCHES.items():
        value = saved.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            continue
        values[name] = float(min(max(value, switch.minimum), switch.maximum))
    return values


def _read_saved_switches(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise PostmergeError("sandbox.switches_invalid", path=str(path), error=str(error)) from None
    return saved if isinstance(saved, dict) else {}


def check_switch_name(name: str) -> None:
    if name not in KNOWN_SWITCHES and name not in NUMERIC_SWITCHES:
        known = ", ".join(sorted([*KNOWN_SWITCHES, *NUMERIC_SWITCHES]))
        raise UsageError("sandbox.unknown_switch", name=name, known=known)


def parse_switch_value(name: str, text: str) -> bool | float:
    """Return the value that the command line text sets a switch to.

    A boolean switch takes on or off. A numeric switch takes a number in its
    range, or off for 0. Raises UsageError for an unknown name or an invalid value.
    """
    check_switch_name(name)
    word = text.strip().lower()
    if name in KNOWN_SWITCHES:
        if word not in ("on", "off"):
            raise UsageError("fault_switch.invalid_boolean", name=name, value=text)
        return word == "on"

    switch = NUMERIC_SWITCHES[name]
    if word == "off":
        return 0.0
    try:
        value = float(word)
    except ValueError:
        value = float("nan")
    if not switch.minimum <= value <= switch.maximum:
        raise UsageError("fault_switch.invalid_number", name=name, value=text,
                         minimum=f"{switch.minimum:g}", maximum=f"{switch.maximum:g}")
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write data as JSON so that readers see the old or the new file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False
    )
    try:
        with handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
