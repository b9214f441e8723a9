"""Tests of the local sandbox against the PostgreSQL at 127.0.0.1:5432, npm and the real v2 service.

Each test has its own home under tmp_path and its own database, which the
fixture drops afterwards.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from bot.config import Environment
from bot.errors import PostmergeError
from bot.sandbox import (
    down,
    read_switches,
    sandbox_environment,
    sandbox_status,
    set_switch,
    up,
)
from bot.sandbox._process import is_service_process
from bot.sandbox._state import SandboxPaths

ADMIN_URL = os.environ.get("POSTMERGE_SANDBOX_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ROWS = 80_000
SCRIPT_TIMEOUT_SECONDS = 60

requires_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")


@pytest.fixture
async def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Return a postmerge home with a unique sandbox database name, and purge both afterwards."""
    database = f"postmerge_sandbox_test_{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("POSTMERGE_SANDBOX_DB", database)
    monkeypatch.setenv("POSTMERGE_SANDBOX_PG_URL", ADMIN_URL)
    monkeypatch.delenv("POSTMERGE_SANDBOX_ROWS", raising=False)
    path = tmp_path / "home"

    yield path

    await down(path, purge=True)
    # up may fail before it writes the state file that down reads.
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await connection.close()


async def run_npm(
    environment: Environment, script: str, **variables: str
) -> tuple[int, str, str]:
    """Run `npm run <script>` in the sandbox working directory with the environment's variables."""
    process = await asyncio.create_subprocess_exec(
        "npm",
        "run",
        script,
        cwd=environment.workdir,
        env=_script_environment(environment, variables),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT_SECONDS)
    return process.returncode, stdout.decode(), stderr.decode()


async def run_command(environment: Environment, command: str, **variables: str) -> tuple[int, str, str]:
    """Run a shell command of the environment, such as its stand-in for pg_restore."""
    process = await asyncio.create_subprocess_exec(
        *shlex.split(command),
        cwd=environment.workdir,
        env=_script_environment(environment, variables),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT_SECONDS)
    return process.returncode, stdout.decode(), stderr.decode()


def _script_environment(environment: Environment, variables: dict[str, str]) -> dict[str, str]:
    merged = {**os.environ, **environment.variables, "POSTMERGE_SANDBOX_BATCH_DELAY": "0"}
    merged.update(variables)
    return merged


async def version_counts(environment: Environment) -> dict[str | None, int]:
    connection = await asyncpg.connect(environment.database_url)
    try:
        has_version = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
            " WHERE table_name = 'api_endpoints' AND column_name = 'version')"
        )
        if not has_version:
            total = await connection.fetchval("SELECT count(*) FROM api_endpoints")
            return {None: total}
        rows = await connection.fetch("SELECT version, count(*) AS n FROM api_endpoints GROUP BY version")
    finally:
        await connection.close()
    return {row["version"]: row["n"] for row in rows}


async def fetch_value(environment: Environment, sql: str):
    connection = await asyncpg.connect(environment.database_url)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


async def up_environment(home: Path) -> Environment:
    await up(home)
    environment = sandbox_environment(home)
    assert environment is not None
    return environment


# --- up, down and the service ------------------------------------------------


async def test_up_idempotent_and_serves_health(home: Path):
    first = await up(home)
    second = await up(home)

    assert "seeded" in first["changes"]
    assert "service_started" in first["changes"]
    assert second["changes"] == []
    assert second["service"]["pid"] == first["service"]["pid"]
    assert second["service"]["port"] == first["service"]["port"]

    base_url = f"http://127.0.0.1:{second['service']['port']}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/v2/health") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok", "version": "2.0.0"}
        async with session.get(f"{base_url}/v2/version") as response:
            assert await response.json() == {"version": "2.0.0"}
        async with session.post(f"{base_url}/v2/users", json={"name": "Test User"}) as response:
            assert response.status == 201
            body = await response.json()
        async with session.post(f"{base_url}/v2/users", json={}) as response:
            assert response.status == 422

    assert body["data"]["name"] == "Test User"
    assert body["meta"] == {"version": "2"}

    environment = sandbox_environment(home)
    assert environment is not None
    assert await version_counts(environment) == {None: ROWS}


async def test_up_environment_points_at_sandbox(home: Path):
    state = await up(home)
    environment = sandbox_environment(home)
    workdir = SandboxPaths.under(home).work

    assert environment is not None
    assert environment.name == "sandbox"
    assert environment.protected is False
    assert environment.writeback is True
    assert environment.workdir == workdir
    assert environment.url_rewrites == {"https://api.example.com": f"http://127.0.0.1:{state['service']['port']}"}
    assert environment.database_url == state["database_url"]
    assert environment.database_url.startswith("postgresql://")
    assert environment.database_url.endswith("/" + os.environ["POSTMERGE_SANDBOX_DB"])
    assert environment.variables["SANDBOX_DATABASE_URL"] == environment.database_url
    assert environment.env_files == [".env.production"]
    assert environment.commands == {"pg_restore": f"{sys.executable} -m bot.sandbox.scripts restore"}

    package = json.loads((workdir / "package.json").read_text())
    assert package["scripts"]["migrate:schema"] == f"{sys.executable} -m bot.sandbox.scripts migrate-schema"
    assert "API_VERSION=v1" in (workdir / ".env.production").read_text().splitlines()
    assert (workdir / "k8s" / "v2" / "deployment.yaml").is_file()
    assert (workdir / "templates" / "email" / "v1-deprecation.html").is_file()


async def test_down_stops_service(home: Path):
    state = await up(home)
    pid = state["service"]["pid"]
    paths = SandboxPaths.under(home)

    await down(home)

    assert not is_service_process(pid, paths)
    assert sandbox_status(home)["service"]["running"] is False
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{state['service']['port']}/v2/health")

    await down(home)

    assert sandbox_environment(home) is not None


async def test_up_runs_emulators_and_nginx(home: Path):
    await up(home)
    status = sandbox_status(home)
    assert {name: service["running"] for name, service in status["services"].items()} == {
        "v1": True, "kubernetes": True, "saas": True, "loadgen": True}
    assert status["nginx"]["running"] is True
    environment = sandbox_environment(home)
    assert environment.kubernetes.green_deployment == "api"
    assert environment.cloudflare.api_url.startswith("http://127.0.0.1:")
    # Credentials are secrets: never given to shell steps as variables.
    assert "CLOUDFLARE_API_TOKEN" not in environment.variables
    assert environment.secret("CLOUDFLARE_API_TOKEN")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{status['nginx']['url']}/api/v2/users") as response:
            # Until the runbook adds the /api/v2 location, nginx sends everything to v1.
            assert response.headers["X-Served-By"] == "v1"
        # The load generator's traffic goes through nginx, all of it to green until a traffic step.
        loadgen = status["services"]["loadgen"]["url"]
        async with session.get(f"{loadgen}/stats") as response:
            stats = await response.json()
        assert stats["failed"] == 0

    await down(home)
    status = sandbox_status(home)
    assert not any(service["running"] for service in status["services"].values())
    assert status["nginx"]["running"] is False


async def test_up_after_down_restarts_service_only(home: Path):
    await up(home)
    await down(home)

    state = await up(home)

    # Only the services start again; the database and the working directory stay as they are.
    assert state["changes"][0] == "service_started"
    assert "v1_started" in state["changes"]
    assert all(change.endswith("_started") for change in state["changes"]), state["changes"]
    assert sandbox_status(home)["service"]["running"] is True


async def test_down_purge_drops_database_and_folder(home: Path):
    await up(home)
    database = os.environ["POSTMERGE_SANDBOX_DB"]

    await down(home, purge=True)

    connection = await asyncpg.connect(ADMIN_URL)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
    finally:
        await connection.close()
    assert exists is None
    assert not SandboxPaths.under(home).root.exists()
    assert sandbox_environment(home) is None
    assert sandbox_status(home)["set_up"] is False


@requires_npm
async def test_up_reset_reseeds_database_and_files(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("POSTMERGE_SANDBOX_ROWS", "1000")
    first = await up(home)
    environment = sandbox_environment(home)
    env_file = environment.workdir / ".env.production"
    code, _, stderr = await run_npm(environment, "migrate:schema")
    assert code == 0, stderr
    env_file.write_text(env_file.read_text().replace("API_VERSION=v1", "API_VERSION=v2"))

    state = await up(home, reset=True)

    assert "seeded" in state["changes"]
    assert state["service"]["pid"] == first["service"]["pid"]
    assert await version_counts(environment) == {None: 1000}
    assert "API_VERSION=v1" in env_file.read_text().splitlines()


async def test_up_keeps_recorded_settings(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("POSTMERGE_SANDBOX_ROWS", "500")
    await up(home)
    monkeypatch.setenv("POSTMERGE_SANDBOX_ROWS", "700")

    state = await up(home)

    assert state["rows"] == 500
    assert "seeded" not in state["changes"]
    assert await version_counts(sandbox_environment(home)) == {None: 500}


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("POSTMERGE_SANDBOX_ROWS", "many", "sandbox.invalid_rows"),
        ("POSTMERGE_SANDBOX_ROWS", "0", "sandbox.invalid_rows"),
        ("POSTMERGE_SANDBOX_DB", "Sandbox-DB", "sandbox.invalid_database_name"),
        ("POSTMERGE_SANDBOX_DB", "postgres", "sandbox.invalid_database_name"),
        ("POSTMERGE_SANDBOX_PG_URL", "mysql://root@127.0.0.1/postgres", "sandbox.invalid_pg_url"),
        ("POSTMERGE_SANDBOX_PG_URL", "postgresql://postgres@db.example.com/postgres", "sandbox.pg_url_not_local"),
    ],
)
async def test_up_rejects_invalid_settings(home: Path, monkeypatch: pytest.MonkeyPatch, variable, value, key):
    monkeypatch.setenv(variable, value)

    with pytest.raises(PostmergeError) as raised:
        await up(home)

    assert raised.value.key == key
    assert sandbox_environment(home) is None


async def test_up_reports_invalid_state_file(home: Path):
    paths = SandboxPaths.under(home)
    paths.root.mkdir(parents=True)
    paths.state_file.write_text("{not json")

    with pytest.raises(PostmergeError) as raised:
        await up(home)

    assert raised.value.key == "sandbox.state_invalid"
    assert sandbox_environment(home) is None


def test_import_leaves_asyncpg_and_aiohttp_unloaded():
    code = "import sys, bot.sandbox; print(sorted({'asyncpg', 'aiohttp'} & set(sys.modules)))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert completed.stdout.strip() == "[]"


# --- the scripts ------------------------------------------------------------


@requires_npm
async def test_scripts_run_in_runbook_order(home: Path, tmp_path: Path):
    environment = await up_environment(home)
    artifacts = tmp_path / "artifacts"
    variables = {"POSTMERGE_ARTIFACTS_DIR": str(artifacts), "API_V1_DEPRECATION_DATE": "2025-03-31"}

    for script in (
        "backup:api-data",
        "migrate:schema",
        "migrate:data:v1-to-v2",
        "db:verify:v2-migration",
        "sentry:upload-sourcemaps",
        "docs:generate",
        "docs:deploy",
        "notify:v1-deprecation",
    ):
        code, stdout, stderr = await run_npm(environment, script, **variables)
        assert code == 0, f"{script} failed:\n{stdout}\n{stderr}"

    work = environment.workdir
    assert await version_counts(environment) == {"v2": ROWS}
    assert (artifacts / "api-data.dump").stat().st_size > 0
    assert (work / "sentry" / "releases" / "api_2.0.0.json").is_file()
    assert (work / "docs" / "api" / "v2" / "index.html").is_file()
    assert (work / "site" / "api" / "v2" / "index.html").is_file()
    messages = sorted((work / "outbox").glob("*.eml"))
    assert len(messages) == 5
    first = email.message_from_bytes(messages[0].read_bytes(), policy=email.policy.default)
    assert first["To"] == "Acme Corporation <api-admin@acme.example.com>"
    assert "2025-03-31" in first.get_body(("html",)).get_content()


@requires_npm
async def test_migration_killed_midway_then_rerun(home: Path):
    environment = await up_environment(home)
    code, _, stderr = await run_npm(environment, "migrate:schema")
    assert code == 0, stderr

    process = await asyncio.create_subprocess_exec(
        "npm",
        "run",
        "migrate:data:v1-to-v2",
        cwd=environment.workdir,
        env=_script_environment(environment, {"POSTMERGE_SANDBOX_BATCH_DELAY": "0.1"}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    migrated = 0
    while migrated < 10_000:
        line = (await asyncio.wait_for(process.stdout.readline(), SCRIPT_TIMEOUT_SECONDS)).decode()
        assert line, "migration ended before it could be killed"
        if line.startswith("migrated "):
            migrated = int(line.split()[1].split("/")[0])
    os.killpg(process.pid, signal.SIGKILL)
    await process.wait()

    partial = await version_counts(environment)
    assert 10_000 <= partial["v2"] < ROWS
    assert partial["v1"] + partial["v2"] == ROWS

    code, stdout, stderr = await run_npm(environment, "migrate:data:v1-to-v2")

    assert code == 0, stderr
    assert f"({partial['v2']}/{ROWS} rows already v2)" in stdout
    assert await version_counts(environment) == {"v2": ROWS}
    assert await fetch_value(environment, "SELECT count(DISTINCT id) FROM api_endpoints") == ROWS
    assert await fetch_value(
        environment,
        "SELECT count(*) FROM api_endpoints WHERE response->'meta'->>'version' = '2' AND response ? 'data'",
    ) == ROWS
    code, _, stderr = await run_npm(environment, "db:verify:v2-migration")
    assert code == 0, stderr


@requires_npm
async def test_backup_rollback_restore_gives_v1_rows(home: Path, tmp_path: Path):
    environment = await up_environment(home)
    artifacts = {"POSTMERGE_ARTIFACTS_DIR": str(tmp_path / "artifacts")}

    for script in ("migrate:schema", "backup:api-data", "migrate:data:v1-to-v2", "migrate:rollback"):
        code, stdout, stderr = await run_npm(environment, script, **artifacts)
        assert code == 0, f"{script} failed:\n{stdout}\n{stderr}"
    assert await version_counts(environment) == {"v1": ROWS}

    code, stdout, stderr = await run_command(environment, environment.commands["pg_restore"], **artifacts)
    assert code == 0, stderr
    assert f"restored api_endpoints: {ROWS} rows" in stdout

    assert await version_counts(environment) == {"v1": ROWS}
    assert await fetch_value(
        environment, "SELECT count(*) FROM api_endpoints WHERE response->>'status' = 'success'"
    ) == ROWS
    code, stdout, stderr = await run_npm(environment, "db:verify")
    assert code == 0, stderr


@requires_npm
async def test_migrate_data_requires_version_column(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("POSTMERGE_SANDBOX_ROWS", "100")
    environment = await up_environment(home)

    code, _, stderr = await run_npm(environment, "migrate:data:v1-to-v2")

    assert code == 1
    assert "column api_endpoints.version is missing; run `npm run migrate:schema` first" in stderr
    assert await version_counts(environment) == {None: 100}


async def test_restore_without_backup_fails(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("POSTMERGE_SANDBOX_ROWS", "100")
    environment = await up_environment(home)

    code, _, stderr = await run_command(
        environment, environment.commands["pg_restore"], POSTMERGE_ARTIFACTS_DIR=str(tmp_path / "empty")
    )

    assert code == 1
    assert "api-data.dump not found; run `npm run backup:api-data` first" in stderr


@requires_npm
async def test_integrity_switch_fails_verify(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("POSTMERGE_SANDBOX_ROWS", "2000")
    environment = await up_environment(home)
    for script in ("migrate:schema", "migrate:data:v1-to-v2"):
        code, _, stderr = await run_npm(environment, script)
        assert code == 0, stderr

    set_switch(home, "integrity-failure", True)
    failed_code, _, failed_stderr = await run_npm(environment, "db:verify:v2-migration")
    set_switch(home, "integrity-failure", False)
    passed_code, _, passed_stderr = await run_npm(environment, "db:verify:v2-migration")

    assert failed_code == 1
    assert "injected by the sandbox switch integrity-failure" in failed_stderr
    assert passed_code == 0, passed_stderr
    assert read_switches(home) == {"integrity-failure": False, "v2-unhealthy": False}


async def test_set_switch_rejects_unknown_name(home: Path):
    await up(home)

    with pytest.raises(PostmergeError) as raised:
        set_switch(home, "disk-full", True)

    assert raised.value.key == "sandbox.unknown_switch"
    assert "integrity-failure" in raised.value.render("en")


def test_set_switch_requires_sandbox(tmp_path: Path):
    with pytest.raises(PostmergeError) as raised:
        set_switch(tmp_path, "integrity-failure", True)

    assert raised.value.key == "sandbox.not_set_up"


def test_unknown_switch_exits_2(tmp_path: Path):
    from conftest import run_cli

    result = run_cli("sandbox", "switch", "disk-full", "on", home=tmp_path)
    assert result.returncode == 2
    assert "disk-full" in result.stderr


async def test_reset_restores_emulators_and_keeps_nginx_url(home: Path):
    from kubernetes_asyncio import client, config

    first = await up(home)

    async def replicas_of_api(scale_to: int | None = None) -> int:
        api_client = await config.new_client_from_config(config_file=str(home / "sandbox" / "kubeconfig"),
                                                         context="postmerge-sandbox")
        async with api_client:
            apps = client.AppsV1Api(api_client)
            if scale_to is not None:
                await apps.patch_namespaced_deployment_scale("api", "default", {"spec": {"replicas": scale_to}})
            return (await apps.read_namespaced_deployment("api", "default")).spec.replicas

    assert await replicas_of_api(scale_to=0) == 0
    second = await up(home, reset=True)

    assert "emulators_reset" in second["changes"]
    assert await replicas_of_api() == 2
    assert second["nginx"]["url"] == first["nginx"]["url"]


async def test_load_rate_change_restarts_generator(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("POSTMERGE_SANDBOX_LOAD_RATE", "20")
    await up(home)
    assert sandbox_status(home)["services"]["loadgen"]["rate"] == "20"

    monkeypatch.setenv("POSTMERGE_SANDBOX_LOAD_RATE", "30")
    state = await up(home)
    assert "loadgen_started" in state["changes"]
    assert sandbox_status(home)["services"]["loadgen"]["rate"] == "30"

    # A run without the variable judges the rate the generator was started with.
    monkeypatch.delenv("POSTMERGE_SANDBOX_LOAD_RATE")
    assert sandbox_environment(home).monitor.thresholds["throughput_rps"] == 15


async def test_unhealthy_switch_fails_health_not_reset(home: Path):
    import aiohttp

    await up(home)
    set_switch(home, "v2-unhealthy", True)
    # The sandbox checks readiness on a path no switch affects, so a reset still works with the switch on.
    second = await up(home, reset=True)
    url = second["service"]["url"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v2/health") as response:
            assert response.status == 503
            assert (await response.json())["detail"] == "injected by the sandbox switch v2-unhealthy"
        async with session.get(f"{url}/_sandbox/ready") as response:
            assert response.status == 200
    set_switch(home, "v2-unhealthy", False)
    # The service reads the switch file at most every 0.5 s.
    await asyncio.sleep(0.6)
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v2/health") as response:
        assert response.status == 200
