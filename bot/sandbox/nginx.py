"""A real nginx for the sandbox and the tests, run by the current user under its own prefix.

`start_nginx(prefix, v1_port, v2_port)` writes two files under prefix and
starts Debian's /usr/sbin/nginx (or the first nginx on PATH) with
`-p PREFIX -c PREFIX/nginx.conf`:

    PREFIX/nginx.conf                  daemon on; pid, error log, access log and
                                       all five temp paths under PREFIX;
                                       upstream backend-v1 -> 127.0.0.1:v1_port,
                                       upstream backend-v2 -> 127.0.0.1:v2_port;
                                       include PREFIX/upstream-api.conf;
                                       include PREFIX/sites-available/api.conf
    PREFIX/upstream-api.conf           upstream backend-api: v1 and v2 with the
                                       weights traffic steps set (100% v1 at first)
    PREFIX/sites-available/api.conf    server { listen 127.0.0.1:PORT;
                                                location / -> backend-api;
                                                location /api/v1 -> backend-v1 }
    PREFIX/nginx.pid, PREFIX/logs/, PREFIX/temp/

Requests to any path (such as /api/users) go through the weighted upstream
backend-api, so traffic steps split them between v1 and v2; /api/v1 stays
on backend-v1, and the location /api/v2 the runbook adds goes to backend-v2
alone. upstream-api.conf is
`TrafficSettings.upstream_file` (see `NginxInstance.traffic_settings`). On a
start it is rewritten with the current ports and keeps the share of v2 it
had, unless `reset` is set, which puts all traffic on v1 again.

api.conf is the file the runbook's nginx task edits: map the runbook's
"/etc/nginx/sites-available/api.conf" to `NginxInstance.site_file` in
`NginxSettings.files` (see `NginxInstance.settings`). An existing api.conf is
kept (it may hold the runbook's change) unless `reset` is set; its listen
port is then reused.

nginx runs as a daemon (`daemon on;`): the start command returns once the
master process has bound the port and forked, and the master keeps running
after this process exits, as the sandbox's other services do. Its pid is in
PREFIX/nginx.pid, and `stop_nginx(prefix)` ends it. No root is needed. When
started by root, nginx runs its worker processes as its default user, the
user nobody. They only proxy, so they read no file under the prefix.

The generated config is checked with `nginx -t` before nginx starts.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.errors import PostmergeError

if TYPE_CHECKING:
    from bot.config import NginxSettings, TrafficSettings

HOST = "127.0.0.1"
# The path the runbook names for the file its nginx task edits.
RUNBOOK_SITE_FILE = "/etc/nginx/sites-available/api.conf"
# The weighted upstream that traffic steps change, and its file under the prefix.
UPSTREAM_NAME = "backend-api"
UPSTREAM_FILE = "upstream-api.conf"
# A site file written before the weighted upstream existed proxies `location /` to v1.
OLD_DEFAULT_LOCATION = re.compile(r"(location\s+/\s*\{\s*proxy_pass\s+http://)backend-v1(\s*;)")
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
START_TIMEOUT_SECONDS = 10.0
STOP_GRACE_SECONDS = 5.0
COMMAND_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.05
# Tries with a new free port when another process took the chosen one first.
PORT_ATTEMPTS = 3
LISTEN_PATTERN = re.compile(r"^\s*listen\s+127\.0\.0\.1:(\d+)\s*;", re.MULTILINE)


class NginxSandboxError(PostmergeError):
    """The sandbox nginx could not be configured, started or stopped."""


@dataclass(frozen=True)
class NginxInstance:
    """A running sandbox nginx and the commands that test and reload its config."""

    binary: str
    prefix: Path
    port: int
    pid: int

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def site_file(self) -> Path:
        return self.prefix / "sites-available" / "api.conf"

    @property
    def upstream_file(self) -> Path:
        return self.prefix / UPSTREAM_FILE

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        return self.prefix / "logs" / "access.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def test_command(self) -> str:
        return shlex.join(_base_argv(self.binary, self.prefix) + ["-t"])

    @property
    def reload_command(self) -> str:
        return shlex.join(_base_argv(self.binary, self.prefix) + ["-s", "reload"])

    @property
    def files(self) -> dict[str, Path]:
        return {RUNBOOK_SITE_FILE: self.site_file}

    def settings(self) -> NginxSettings:
        """Return the environment's nginx section that points nginx steps at this instance."""
        from bot.config import NginxSettings

        return NginxSettings(files=self.files, test_command=self.test_command, reload_command=self.reload_command)

    def traffic_settings(self) -> TrafficSettings:
        """Return the environment's traffic section that points traffic steps at this instance's upstream."""
        return traffic_settings_for(self.prefix)


def settings_for(prefix: Path) -> NginxSettings:
    """Return the environment's nginx section for the sandbox nginx under prefix, running or not."""
    binary = find_nginx() or "nginx"
    return NginxInstance(binary=binary, prefix=Path(prefix).absolute(), port=0, pid=0).settings()


def traffic_settings_for(prefix: Path, v1_port: int | None = None, v2_port: int | None = None) -> TrafficSettings:
    """Return the environment's traffic section for the sandbox nginx under prefix.

    Without the ports, they are read from the upstreams backend-v1 and
    backend-v2 of PREFIX/nginx.conf, as the last start wrote it. When that
    file does not exist, the servers are left unset.
    """
    from bot.config import TrafficSettings

    prefix = Path(prefix).absolute()
    if v1_port is None or v2_port is None:
        ports = backend_ports(prefix)
        v1_port = v1_port if v1_port is not None else ports.get("backend-v1")
        v2_port = v2_port if v2_port is not None else ports.get("backend-v2")
    return TrafficSettings(
        provider="nginx",
        upstream_file=prefix / UPSTREAM_FILE,
        upstream_name=UPSTREAM_NAME,
        green_server=f"{HOST}:{v1_port}" if v1_port else None,
        blue_server=f"{HOST}:{v2_port}" if v2_port else None,
    )


def backend_ports(prefix: Path) -> dict[str, int]:
    """Return the ports of the upstreams backend-v1 and backend-v2 in PREFIX/nginx.conf."""
    text = _read_tail(Path(prefix) / "nginx.conf")
    ports = {}
    for name in ("backend-v1", "backend-v2"):
        match = re.search(rf"upstream\s+{name}\s*\{{\s*server\s+127\.0\.0\.1:(\d+)\s*;", text)
        if match:
            ports[name] = int(match.group(1))
    return ports


def find_nginx() -> str | None:
    """Return the nginx binary's path: Debian's /usr/sbin/nginx, else the first on PATH."""
    for candidate in NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nginx")


def nginx_available() -> bool:
    return find_nginx() is not None


def running_pid(prefix: Path) -> int | None:
    """Return the pid of the nginx master running with this prefix's config, else None."""
    prefix = Path(prefix).absolute()
    try:
        pid = int((prefix / "nginx.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _is_master_of(pid, prefix) else None


async def start_nginx(prefix: Path, v1_port: int, v2_port: int, *, port: int | None = None,
                      reset: bool = False) -> NginxInstance:
    """Write the config under prefix and start nginx, or reload it if it is already running.

    port is the listen port; without one, the port of an existing api.conf
    is reused, else a free port is chosen. With reset, api.conf is rewritten.
    """
    binary = find_nginx()
    if binary is None:
        raise NginxSandboxError("nginx.sandbox_not_installed")
    prefix = Path(prefix).absolute()
    _check_path(prefix)
    for directory in (prefix / "logs", prefix / "sites-available", *(prefix / "temp" / name for name in TEMP_PATHS)):
        directory.mkdir(parents=True, exist_ok=True)
    instance = NginxInstance(binary=binary, prefix=prefix, port=0, pid=0)

    _write_upstream(prefix, v1_port, v2_port, reset)
    (prefix / "nginx.conf").write_text(render_main_config(prefix, v1_port, v2_port), encoding="utf-8")
    existing_port = _site_port(instance.site_file) if instance.site_file.exists() and not reset else None
    if existing_port is not None:
        _route_default_through_upstream(instance.site_file)
    if existing_port is not None and port not in (None, existing_port):
        existing_port = None
    pid = running_pid(prefix)

    output = ""
    for _ in range(PORT_ATTEMPTS):
        chosen = port or existing_port or free_port()
        if existing_port is None:
            instance.site_file.write_text(render_site_config(chosen), encoding="utf-8")
        instance = NginxInstance(binary=binary, prefix=prefix, port=chosen, pid=pid or 0)
        await _check_config(instance)
        if pid is not None:
            await _run(shlex.split(instance.reload_command), prefix)
            return instance
        code, output = await _run(_base_argv(binary, prefix), prefix, check=False)
        if code == 0:
            return await _wait_started(instance)
        # Only a port chosen here may be replaced by another free one.
        if "Address already in use" not in output or port or existing_port:
            break
    raise NginxSandboxError("nginx.sandbox_start_failed", prefix=str(prefix), error=_last_lines(output))


async def stop_nginx(prefix: Path) -> bool:
    """Stop the nginx running with this prefix's config; return whether one was running.

    Sends SIGQUIT (finish open requests), then SIGTERM and SIGKILL after
    STOP_GRACE_SECONDS each.
    """
    prefix = Path(prefix).absolute()
    pid = running_pid(prefix)
    if pid is None:
        return False
    for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline:
            if not _is_master_of(pid, prefix):
                (prefix / "nginx.pid").unlink(missing_ok=True)
                return True
            await asyncio.sleep(POLL_SECONDS)
    raise NginxSandboxError("nginx.sandbox_stop_failed", pid=pid, prefix=str(prefix))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def render_main_config(prefix: Path, v1_port: int, v2_port: int) -> str:
    def quoted(path: Path) -> str:
        return f'"{path}"'

    temp = "\n".join(
        f"    {name}_temp_path {quoted(prefix / 'temp' / name)};" for name in TEMP_PATHS
    )
    return f"""# Written by postmerge's sandbox; rewritten on every start.
daemon on;
worker_processes 1;
pid {quoted(prefix / 'nginx.pid')};
error_log {quoted(prefix / 'logs' / 'error.log')} notice;

events {{
    worker_connections 128;
}}

http {{
    access_log {quoted(prefix / 'logs' / 'access.log')};
    default_type application/octet-stream;
{temp}

    upstream backend-v1 {{
        server {HOST}:{v1_port};
    }}

    upstream backend-v2 {{
        server {HOST}:{v2_port};
    }}

    include {quoted(prefix / UPSTREAM_FILE)};
    include {quoted(prefix / 'sites-available' / 'api.conf')};
}}
"""


def render_upstream_config(v1_port: int, v2_port: int, weight: int = 0) -> str:
    """Return upstream-api.conf: backend-api with v2 getting `weight` percent of requests."""
    from steps.traffic import render_upstream

    block = render_upstream(UPSTREAM_NAME, f"{HOST}:{v1_port}", f"{HOST}:{v2_port}", weight)
    return f"# Written by postmerge's sandbox; traffic steps set the weights of v1 (green) and v2 (blue).\n{block}"


def _write_upstream(prefix: Path, v1_port: int, v2_port: int, reset: bool) -> None:
    """Write upstream-api.conf with the current ports, keeping v2's share unless reset."""
    path = prefix / UPSTREAM_FILE
    weight = 0
    if path.exists() and not reset:
        weight = _upstream_weight(path) or 0
    path.write_text(render_upstream_config(v1_port, v2_port, weight), encoding="utf-8")


def _upstream_weight(path: Path) -> int | None:
    from steps.nginx import ConfigSyntaxError, parse_config
    from steps.traffic import upstream_weight

    try:
        directives = parse_config(_read_tail(path))
    except ConfigSyntaxError:
        return None
    for directive in directives:
        if directive.name == "upstream" and directive.args == [UPSTREAM_NAME] and directive.children is not None:
            servers = [child.args[0] for child in directive.children if child.name == "server" and child.args]
            if len(servers) == 2:
                return upstream_weight(directive, servers[0], servers[1])
    return None


def _route_default_through_upstream(site_file: Path) -> None:
    """Point `location /` of a site file from an earlier sandbox at backend-api instead of backend-v1."""
    text = site_file.read_text(encoding="utf-8", errors="surrogateescape")
    updated = OLD_DEFAULT_LOCATION.sub(rf"\1{UPSTREAM_NAME}\2", text, count=1)
    if updated != text:
        site_file.write_text(updated, encoding="utf-8", errors="surrogateescape")


def render_site_config(port: int) -> str:
    return f"""# The sandbox's stand-in for {RUNBOOK_SITE_FILE}.
server {{
    listen {HOST}:{port};
    server_name api.example.com;

    location / {{
        proxy_pass http://{UPSTREAM_NAME};
    }}

    location /api/v1 {{
        proxy_pass http://backend-v1;
    }}
}}
"""


def _base_argv(binary: str, prefix: Path) -> list[str]:
    return [binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")]


def _check_path(prefix: Path) -> None:
    # Paths are written inside double quotes in nginx.conf.
    if any(character in str(prefix) for character in '"\\\n'):
        raise NginxSandboxError("nginx.sandbox_bad_prefix", prefix=str(prefix))


def _site_port(site_file: Path) -> int | None:
    match = LISTEN_PATTERN.search(site_file.read_text(encoding="utf-8", errors="replace"))
    return int(match.group(1)) if match else None


async def _check_config(instance: NginxInstance) -> None:
    code, output = await _run(shlex.split(instance.test_command), instance.prefix, check=False)
    if code != 0:
        raise NginxSandboxError("nginx.sandbox_config_invalid", conf=str(instance.conf), error=_last_lines(output))


async def _run(argv: list[str], prefix: Path, check: bool = True) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=prefix,
    )
    try:
        raw, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_SECONDS)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    output = raw.decode("utf-8", "replace")
    if check and process.returncode != 0:
        raise NginxSandboxError("nginx.sandbox_start_failed", prefix=str(prefix), error=_last_lines(output))
    return process.returncode or 0, output


async def _wait_started(instance: NginxInstance) -> NginxInstance:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        pid = running_pid(instance.prefix)
        if pid is not None and _accepts(instance.port):
            return NginxInstance(binary=instance.binary, prefix=instance.prefix, port=instance.port, pid=pid)
        await asyncio.sleep(POLL_SECONDS)
    raise NginxSandboxError("nginx.sandbox_start_failed", prefix=str(instance.prefix),
                            error=_last_lines(_read_tail(instance.error_log)))


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _is_master_of(pid: int, prefix: Path) -> bool:
    """Return whether pid is a live nginx master started with this prefix's nginx.conf."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # The master rewrites its command line to "nginx: master process <argv>".
    text = raw.decode("utf-8", "replace").replace("\0", " ")
    return "nginx" in text and str(prefix / "nginx.conf") in text and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return bool(fields) and fields[0] == "Z"


def _read_tail(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _last_lines(output: str, count: int = 5) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "(no output)"
