"""Start, find and stop the sandbox's detached service processes.

Each service is a Python module run in its own session, which writes its
bound port to a port file once it accepts connections: the v1 and v2 API
services, and the emulators of Kubernetes and the SaaS APIs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bot.errors import PostmergeError
from bot.sandbox._state import SandboxPaths

logger = logging.getLogger(__name__)

SERVICE_MODULE = "bot.sandbox.service"
HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 20.0
STOP_GRACE_SECONDS = 5.0
POLL_SECONDS = 0.05

# Pids this process spawned. Only these are reaped with waitpid, so that the
# exit status of another child (an engine subprocess that got a recycled pid)
# is never taken from its owner.
_spawned_pids: set[int] = set()


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one sandbox service and tell that it is ready."""

    name: str
    module: str
    port_file: Path
    log: Path
    arguments: tuple[str, ...] = ()
    # A GET of this path must return 200 with {"status": "ok"}; None accepts any HTTP response.
    # The v2 service's readiness path, which no fault switch affects (v2-unhealthy fails /v2/health).
    health_path: str | None = "/_sandbox/ready"

    @classmethod
    def v2(cls, paths: SandboxPaths) -> ServiceSpec:
        return cls(name="v2", module=SERVICE_MODULE, port_file=paths.port_file, log=paths.service_log)


@dataclass(frozen=True)
class ServiceProcess:
    pid: int
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def is_service_process(pid: int, spec: ServiceSpec | SandboxPaths) -> bool:
    """Return whether pid is a live service started for this sandbox (the v2 service when given paths).

    The command line must name the service module and this sandbox's port
    file, so a recycled pid is never mistaken for the service.
    """
    spec = _spec(spec)
    if not _is_alive(pid):
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        # NOTE: without a readable /proc (macOS, for example) the command
        # line cannot be checked, so any live process with this pid counts.
        return True
    arguments = raw.decode("utf-8", "replace").split("\0")
    return spec.module in arguments and str(spec.port_file) in arguments


def _spec(spec: ServiceSpec | SandboxPaths) -> ServiceSpec:
    return spec if isinstance(spec, ServiceSpec) else ServiceSpec.v2(spec)


async def start_service(spec: ServiceSpec | SandboxPaths, python: str, preferred_port: int | None) -> ServiceProcess:
    """Start the service in its own session and wait until it responds.

    Tries preferred_port first, so the URL stays the same across restarts,
    and falls back to a free port when that one is taken.
    """
    spec = _spec(spec)
    ports = [preferred_port, 0] if preferred_port else [0]
    for port in ports:
        pid = _spawn(spec, python, port)
        try:
            bound_port = await _wait_until_healthy(spec, pid)
        except _ExitedEarly:
            if port != 0:
                logger.info("sandbox %s service could not use port %d, retrying on a free port", spec.name, port)
                continue
            raise PostmergeError("sandbox.service_start_failed", name=spec.name, log=str(spec.log)) from None
        except BaseException:
            await stop_service(pid, spec)
            raise
        logger.info("started sandbox %s service pid %d on port %d", spec.name, pid, bound_port)
        return ServiceProcess(pid=pid, port=bound_port)

    raise PostmergeError("sandbox.service_start_failed", name=spec.name, log=str(spec.log))


async def stop_service(pid: int, spec: ServiceSpec | SandboxPaths) -> bool:
    """Stop the service with SIGTERM, then SIGKILL after a grace period. Returns whether it was running."""
    spec = _spec(spec)
    if not is_service_process(pid, spec):
        return False

    for signum, wait_seconds in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, STOP_GRACE_SECONDS)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if not _is_alive(pid):
                logger.info("stopped sandbox %s service pid %d with %s", spec.name, pid, signum.name)
                return True
            await asyncio.sleep(POLL_SECONDS)
        logger.warning("sandbox %s service pid %d still running %.0f s after %s", spec.name, pid, wait_seconds,
                       signum.name)

    return True


async def check_health(port: int, timeout_seconds: float = 2.0, path: str | None = "/_sandbox/ready") -> bool:
    """Return whether GET path on the port returns 200 with status ok; without a path, any HTTP response counts."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"http://{HOST}:{port}{path or '/'}") as response:
                if path is None:
                    return True
                if response.status != 200:
                    return False
                body = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return False
    return isinstance(body, dict) and body.get("status") == "ok"


class _ExitedEarly(Exception):
    pass


def _spawn(spec: ServiceSpec, python: str, port: int) -> int:
    spec.port_file.unlink(missing_ok=True)
    argv = [python, "-m", spec.module, "--port", str(port), "--port-file", str(spec.port_file), *spec.arguments]
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    # posix_spawn returns a bare pid: unlike subprocess.Popen it leaves no
    # object behind that warns when the caller exits before the service.
    pid = os.posix_spawn(
        python,
        argv,
        environment,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(spec.log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    _spawned_pids.add(pid)
    logger.debug("spawned %s", " ".join(argv))
    return pid


async def _wait_until_healthy(spec: ServiceSpec, pid: int) -> int:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            raise _ExitedEarly()
        port = _read_port(spec.port_file)
        if port is not None and await check_health(port, timeout_seconds=1.0, path=spec.health_path):
            return port
        await asyncio.sleep(POLL_SECONDS * 2)

    raise PostmergeError(
        "sandbox.service_start_timeout", name=spec.name, seconds=int(START_TIMEOUT_SECONDS), log=str(spec.log)
    )


def _read_port(port_file: Path) -> int | None:
    try:
        return int(port_file.read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_alive(pid: int) -> bool:
    """Return whether pid runs, reaping it first when this process spawned it and it exited."""
    if pid in _spawned_pids:
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            reaped = pid
        if reaped == pid:
            _spawned_pids.discard(pid)
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
