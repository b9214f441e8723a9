"""The local sandbox, a stand-in for production that runs the api-v2-migration runbook for real.

`up` creates a PostgreSQL database whose api_endpoints table contains v1 rows,
a working directory with the npm scripts the runbook names, and a v2 API
service on 127.0.0.1. `sandbox_environment` returns the environment that
points a run at them.

bot.config imports this module on every CLI start, so asyncpg and aiohttp
are imported only inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import PostmergeError
from bot.sandbox._state import (
    KNOWN_SWITCHES,
    STATE_FORMAT,
    SandboxPaths,
    SandboxSettings,
    check_switch_name,
    mask_url,
    read_state,
    read_switch_file,
    write_json_atomic,
    write_state,
)

if TYPE_CHECKING:
    from bot.config import Environment

__all__ = [
    "KNOWN_SWITCHES",
    "down",
    "read_switches",
    "sandbox_environment",
    "sandbox_status",
    "set_switch",
    "up",
]

logger = logging.getLogger(__name__)

# The production API base URL that the runbook's curl lines use.
PRODUCTION_API_URL = "https://api.example.com"
# Requests per second the load generator sends through nginx (POSTMERGE_SANDBOX_LOAD_RATE).
DEFAULT_LOAD_RATE = 100
# Monitor windows and poll intervals take this share of the runbook's time (POSTMERGE_SANDBOX_TIME_SCALE).
DEFAULT_TIME_SCALE = 0.03


def sandbox_environment(home: Path) -> Environment | None:
    """Return the sandbox environment if a sandbox was set up under home, else None.

    A state file that cannot be read is logged and treated as no sandbox, so
    that every other CLI command still works. `up` and `sandbox_status`
    report it as an error.
    """
    paths = SandboxPaths.under(home)
    try:
        state = read_state(paths)
    except PostmergeError as error:
        logger.warning("ignoring the sandbox under %s: %s", paths.root, error)
        return None
    if state is None:
        return None
    return _environment_from_state(paths, state)


async def up(home: Path, *, reset: bool = False) -> dict[str, Any]:
    """Create whatever the sandbox is missing and start the v2 service if it is not running.

    Repeating `up` changes nothing that exists. With reset, the database is
    re-seeded and the working directory files are rewritten. Returns the
    saved state plus "changes", the list of what this call did.
    """
    from bot.sandbox import _database, _process, _workdir

    paths = SandboxPaths.under(home)
    previous = read_state(paths)
    if previous is None:
        settings = SandboxSettings.from_environment()
    else:
        settings = SandboxSettings.from_state(previous)
        _warn_if_environment_differs(settings)
    python = sys.executable

    changes = await _database.ensure_database(settings, reset=reset)
    changes += _workdir.ensure_workdir(paths.work, python, reset=reset)

    now = _now()
    previous = previous or {}
    last_service = previous.get("service") or {}
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "admin_url": settings.admin_url,
        "database": settings.database,
        "database_url": settings.database_url,
        "rows": settings.rows,
        "workdir": str(paths.work),
        "python": python,
        "created_at": previous.get("created_at", now),
        "seeded_at": now if "seeded" in changes else previous.get("seeded_at", now),
        "service": last_service,
        # Kept from the start, so a failure below still leaves every running service recorded for `down`.
        "services": dict(previous.get("services") or {}),
        "nginx": previous.get("nginx"),
    }
    # From here on the sandbox counts as set up, even if the service fails to start.
    write_state(paths, state)

    async def ensure(spec: _process.ServiceSpec, entry: dict[str, Any], store) -> None:
        """Start the service unless it runs and responds; store(entry) records it in the state."""
        pid, port = entry.get("pid"), entry.get("port")
        running = bool(pid) and _process.is_service_process(pid, spec)
        if running and not await _process.check_health(port, path=spec.health_path):
            logger.warning("sandbox %s service pid %d does not respond, restarting it", spec.name, pid)
            await _process.stop_service(pid, spec)
            running = False
        if running:
            return
        store({"pid": None, "port": port, "log": str(spec.log)})
        write_state(paths, state)
        service = await _process.start_service(spec, python, port)
        store({"pid": service.pid, "port": service.port, "url": service.url, "started_at": _now(),
               "log": str(spec.log)})
        write_state(paths, state)
        changes.append(f"{spec.name}_started" if spec.name != "v2" else "service_started")

    await ensure(_process.ServiceSpec.v2(paths), last_service, lambda entry: state.__setitem__("service", entry))
    if reset:
        # The emulators start again from their seed: Green `api` at 2 replicas, no rules, dashboards or releases.
        for spec in _extra_services(paths):
            entry = state["services"].get(spec.name) or {}
            if entry.get("pid"):
                await _process.stop_service(entry["pid"], spec)
            state["services"][spec.name] = {"port": entry.get("port")}
        for name in ("kube-state.json", "saas-state.json"):
            (paths.root / name).unlink(missing_ok=True)
        changes.append("emulators_reset")
    for spec in _extra_services(paths):
        await ensure(spec, state["services"].get(spec.name) or {},
                     lambda entry, name=spec.name: state["services"].__setitem__(name, entry))

    from bot.sandbox import nginx

    if nginx.nginx_available():
        # nginx fronts both API versions: / goes to v1 until the runbook adds the /api/v2 location.
        was_running = nginx.running_pid(paths.nginx) is not None
        # A running nginx keeps its port across a reset, so its URL stays the same.
        keep_port = (previous.get("nginx") or {}).get("port") if was_running else None
        instance = await nginx.start_nginx(paths.nginx, state["services"]["v1"]["port"], state["service"]["port"],
                                           port=keep_port, reset=reset)
        state["nginx"] = {"pid": instance.pid, "port": instance.port, "url": instance.url,
                          "prefix": str(paths.nginx)}
        write_state(paths, state)
        if not was_running:
            changes.append("nginx_started")
        # Steady traffic through nginx, whose per-request readings feed the Datadog emulator.
        saas_port = state["services"]["saas"]["port"]
        loadgen = _loadgen_spec(paths, instance.url, saas_port)
        entry = state["services"].get("loadgen") or {}
        if entry.get("pid") and str(entry.get("rate")) != load_rate():
            # The rate changed: the generator starts again with it, so what runs is what `up` reports.
            await _process.stop_service(entry["pid"], loadgen)
        await ensure(loadgen, entry, lambda started: state["services"].__setitem__("loadgen", started))
        state["services"]["loadgen"]["rate"] = load_rate()
        write_state(paths, state)
    else:
        logger.warning("nginx is not installed, so the sandbox runs without it and nginx steps stay manual")

    logger.info("sandbox under %s is up, changes: %s", paths.root, ", ".join(changes) or "none")
    return {**state, "changes": changes}


async def down(home: Path, *, purge: bool = False) -> None:
    """Stop the v2 service. With purge, also drop the database and remove the sandbox folder.

    Safe to call when nothing runs or nothing was ever set up. A purge with an
    unreadable state file drops the database named by the process
    environment (POSTMERGE_SANDBOX_DB), which is the one `up` would have created.
    """
    from bot.sandbox import _database, _process

    paths = SandboxPaths.under(home)
    try:
        state = read_state(paths)
    except PostmergeError:
        if not purge:
            raise
        state = None

    if state is not None:
        service = state.get("service") or {}
        pid = service.get("pid")
        if pid:
            await _process.stop_service(pid, paths)
        paths.port_file.unlink(missing_ok=True)
        state["service"] = {**service, "pid": None, "stopped_at": _now()}
        services = state.get("services") or {}
        for spec in [_loadgen_spec(paths), *_extra_services(paths)]:
            entry = services.get(spec.name) or {}
            if entry.get("pid"):
                await _process.stop_service(entry["pid"], spec)
            spec.port_file.unlink(missing_ok=True)
            services[spec.name] = {**entry, "pid": None, "stopped_at": _now()}
        state["services"] = services
        if state.get("nginx"):
            from bot.sandbox.nginx import stop_nginx

            await stop_nginx(paths.nginx)
            state["nginx"] = {**state["nginx"], "pid": None}
        if not purge:
            write_state(paths, state)

    if not purge:
        return

    if state is not None:
        await _database.drop_database(SandboxSettings.from_state(state))
    elif paths.root.exists():
        await _database.drop_database(SandboxSettings.from_environment())
    shutil.rmtree(paths.root, ignore_errors=True)
    logger.info("purged the sandbox under %s", paths.root)


def set_switch(home: Path, name: str, enabled: bool | float) -> None:
    """Turn a fault switch on or off, or set a numeric one. The scripts and the v2 service read the switches."""
    check_switch_name(name)
    paths = SandboxPaths.under(home)
    if read_state(paths) is None:
        raise PostmergeError("sandbox.not_set_up", path=str(paths.root))

    switches = read_switch_file(paths.root)
    switches[name] = enabled
    write_json_atomic(paths.switches_file, switches)
    logger.info("sandbox switch %s set to %s", name, enabled)


def read_switches(home: Path) -> dict[str, bool]:
    """Return every known fault switch with its value; all are off in a new sandbox."""
    return read_switch_file(SandboxPaths.under(home).root)


def sandbox_status(home: Path) -> dict[str, Any]:
    """Return what is set up and whether the service runs, without touching the database.

    URLs have their password masked, because the result is meant for display.
    """
    from bot.sandbox import _process

    paths = SandboxPaths.under(home)
    state = read_state(paths)
    if state is None:
        return {"set_up": False, "path": str(paths.root)}

    service = state.get("service") or {}
    pid = service.get("pid")
    running = bool(pid) and _process.is_service_process(pid, paths)
    port = service.get("port")
    return {
        "set_up": True,
        "path": str(paths.root),
        "database": state["database"],
        "database_url": mask_url(state["database_url"]),
        "rows": state["rows"],
        "workdir": state["workdir"],
        "created_at": state.get("created_at"),
        "seeded_at": state.get("seeded_at"),
        "service": {
            "running": running,
            "pid": pid if running else None,
            "port": port,
            "url": f"http://127.0.0.1:{port}" if port else None,
            "log": service.get("log"),
        },
        "services": {
            spec.name: _service_status((state.get("services") or {}).get(spec.name) or {}, spec)
            for spec in [*_extra_services(paths), _loadgen_spec(paths)]
        },
        "nginx": _nginx_status(paths, state),
        "switches": read_switch_file(paths.root),
    }


def _service_status(entry: dict[str, Any], spec) -> dict[str, Any]:
    from bot.sandbox import _process

    pid, port = entry.get("pid"), entry.get("port")
    running = bool(pid) and _process.is_service_process(pid, spec)
    status = {"running": running, "pid": pid if running else None, "port": port,
              "url": f"http://127.0.0.1:{port}" if port else None, "log": entry.get("log")}
    if "rate" in entry:
        status["rate"] = entry["rate"]
    return status


def _nginx_status(paths: SandboxPaths, state: dict[str, Any]) -> dict[str, Any] | None:
    if not state.get("nginx"):
        return None
    from bot.sandbox.nginx import running_pid

    pid = running_pid(paths.nginx)
    return {"running": pid is not None, "pid": pid, "url": state["nginx"].get("url"),
            "config": str(paths.nginx / "nginx.conf")}


def load_rate() -> str:
    """Return the load generator's requests per second, from POSTMERGE_SANDBOX_LOAD_RATE or the default."""
    return os.environ.get("POSTMERGE_SANDBOX_LOAD_RATE", str(DEFAULT_LOAD_RATE))


def _loadgen_spec(paths: SandboxPaths, nginx_url: str = "", saas_port: int = 0):
    """Return the load generator's service; without the URLs it serves only to find and stop the process."""
    from bot.sandbox._process import ServiceSpec

    arguments: tuple[str, ...] = ()
    if nginx_url:
        arguments = ("--url", f"{nginx_url}/api/users", "--rate", load_rate(),
                     "--datadog-control", f"http://127.0.0.1:{saas_port}/_emulator", "--tag", "env:sandbox")
    return ServiceSpec(name="loadgen", module="bot.sandbox.loadgen", port_file=paths.root / "loadgen.port",
                       log=paths.root / "loadgen.log", arguments=arguments, health_path="/health")


def _extra_services(paths: SandboxPaths) -> list:
    """Return the services the sandbox runs besides the v2 API: the v1 API and the emulators."""
    from bot.sandbox._process import ServiceSpec

    return [
        ServiceSpec(name="v1", module="bot.sandbox.service", port_file=paths.root / "v1.port",
                    log=paths.root / "v1.log", arguments=("--api-version", "v1"), health_path="/v1/health"),
        # Any HTTP response counts as ready, because the API returns 401 without the token.
        ServiceSpec(name="kubernetes", module="bot.sandbox.kube_api", port_file=paths.root / "kube.port",
                    log=paths.root / "kube.log", health_path=None,
                    arguments=("--state", str(paths.root / "kube-state.json"),
                               "--token-file", str(paths.root / "kube-token"),
                               "--kubeconfig", str(paths.kubeconfig))),
        ServiceSpec(name="saas", module="bot.sandbox.saas", port_file=paths.root / "saas.port",
                    log=paths.root / "saas.log", health_path=None,
                    arguments=("--state", str(paths.root / "saas-state.json"),
                               "--credentials", str(paths.saas_credentials))),
    ]


def _environment_from_state(paths: SandboxPaths, state: dict[str, Any]) -> Environment:
    from bot.config import SANDBOX, Environment
    from bot.sandbox._workdir import script_command

    port = (state.get("service") or {}).get("port")
    url_rewrites = {PRODUCTION_API_URL: f"http://127.0.0.1:{port}"} if port else {}
    from bot.config import KubernetesSettings

    kubernetes_settings = None
    if (state.get("services") or {}).get("kubernetes"):
        kubernetes_settings = KubernetesSettings(kubeconfig=paths.kubeconfig, context="postmerge-sandbox",
                                                 green_deployment="api", wait_timeout_seconds=60)
    saas_settings: dict[str, Any] = {}
    secrets: dict[str, str] = {}
    saas_port = ((state.get("services") or {}).get("saas") or {}).get("port")
    if saas_port and paths.saas_credentials.is_file():
        saas_settings, secrets = _saas_settings(saas_port, paths.saas_credentials)
    nginx_settings = None
    traffic_settings = None
    if state.get("nginx"):
        from bot.sandbox.nginx import settings_for, traffic_settings_for

        nginx_settings = settings_for(paths.nginx)
        traffic_settings = traffic_settings_for(paths.nginx)
    return Environment(
        name=SANDBOX,
        protected=False,
        nginx=nginx_settings,
        traffic=traffic_settings,
        monitor=_sandbox_monitor(((state.get("services") or {}).get("loadgen") or {}).get("rate")),
        kubernetes=kubernetes_settings,
        **saas_settings,
        workdir=Path(state["workdir"]),
        url_rewrites=url_rewrites,
        database_url=state["database_url"],
        variables={
            "SANDBOX_DATABASE_URL": state["database_url"],
            "SANDBOX_DIR": str(paths.root),
            # npm checks the registry for a newer npm version unless update-notifier is false.
            "NPM_CONFIG_UPDATE_NOTIFIER": "false",
        },
        secrets=secrets,
        env_files=[".env.production"],
        commands={"pg_restore": script_command(state["python"], "restore")},
        writeback=True,
    )


def _sandbox_monitor(rate: str | None = None):
    """Return monitor settings sized to the load generator, with windows shortened by the time scale.

    The runbook's 5-minute windows and 30-second polls take 0.03 of their time
    (9 s and 0.9 s); POSTMERGE_SANDBOX_TIME_SCALE changes that. Thresholds
    that assume production traffic are lowered to what the generator sends.
    """
    from bot.config import MonitorSettings

    # The rate the running generator was started with, so a run judges the traffic that is really sent.
    rate = float(rate or load_rate())
    return MonitorSettings(
        time_scale=float(os.environ.get("POSTMERGE_SANDBOX_TIME_SCALE", str(DEFAULT_TIME_SCALE))),
        # The generator posts each second's points about 1 to 2 s late.
        evaluation_delay_seconds=2,
        min_requests=20,
        # Half the generator's rate, scaled by blue's share like the runbook's 1000 req/s.
        thresholds={"throughput_rps": rate / 2},
    )


def _saas_settings(port: int, credentials_file: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Return the cloudflare, datadog and sentry settings and the credentials for the sandbox's emulator."""
    import json

    from bot.config import CloudflareSettings, DatadogSettings, SentrySettings

    credentials = json.loads(credentials_file.read_text(encoding="utf-8"))
    base = f"http://127.0.0.1:{port}"
    settings = {
        "cloudflare": CloudflareSettings(api_url=f"{base}/cloudflare/client/v4",
                                         zone_id=credentials["cloudflare"]["zone_id"]),
        "datadog": DatadogSettings(api_url=f"{base}/datadog"),
        "sentry": SentrySettings(api_url=f"{base}/sentry/api/0",
                                 organization=credentials["sentry"]["organization"],
                                 project=credentials["sentry"]["project"]),
    }
    secrets = {
        "CLOUDFLARE_API_TOKEN": credentials["cloudflare"]["token"],
        "DD_API_KEY": credentials["datadog"]["api_key"],
        "DD_APP_KEY": credentials["datadog"]["app_key"],
        "SENTRY_AUTH_TOKEN": credentials["sentry"]["token"],
    }
    return settings, secrets


def _warn_if_environment_differs(saved: SandboxSettings) -> None:
    for variable, value in (
        ("POSTMERGE_SANDBOX_PG_URL", saved.admin_url),
        ("POSTMERGE_SANDBOX_DB", saved.database),
        ("POSTMERGE_SANDBOX_ROWS", str(saved.rows)),
    ):
        current = os.environ.get(variable)
        if current is not None and current.strip() != value:
            logger.warning(
                "%s differs from the existing sandbox, which keeps %s; purge the sandbox to change it",
                variable,
                mask_url(value) if variable.endswith("_URL") else value,
            )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
