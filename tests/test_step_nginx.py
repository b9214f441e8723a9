"""NginxExecutor against a real nginx (bot.sandbox.nginx) proxying to two aiohttp services on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bot.config import Environment, NginxSettings
from bot.errors import StepError
from bot.plan import Step
from bot.sandbox.nginx import (
    RUNBOOK_SITE_FILE,
    NginxInstance,
    nginx_available,
    running_pid,
    settings_for,
    start_nginx,
    stop_nginx,
)
from steps.base import OutputBuffer, StepContext
from steps.nginx import (
    NginxExecutor,
    find_server,
    insert_block,
    parse_location_block,
    reload_argv,
    remove_location,
    validate_argv,
)

pytestmark = pytest.mark.skipif(
    not nginx_available(),
    reason="nginx is not installed (scripts/bootstrap installs the Debian package nginx)",
)

# The block and commands exactly as the runbook's Nginx設定更新 task writes them.
RUNBOOK_BLOCK = """location /api/v2 {
    proxy_pass http://backend-v2;
    proxy_set_header X-API-Version "2";
}"""
RUNBOOK_VALIDATE = "sudo nginx -t"
RUNBOOK_RELOAD = "sudo systemctl reload nginx"
UNKNOWN_DIRECTIVE_BLOCK = """location /api/v2 {
    proxy_pass http://backend-v2;
    proxy_set_headr X-API-Version "2";
}"""
MISSING_SEMICOLON_BLOCK = """location /api/v2 {
    proxy_pass http://backend-v2
    proxy_set_header X-API-Version "2";
}"""


class Backend:
    """A service on 127.0.0.1 that returns its name on any path and records request headers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.headers: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.Response(text=self.name)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Backend, Backend]]:
    v1, v2 = Backend("v1"), Backend("v2")
    await v1.start()
    await v2.start()
    yield v1, v2
    await v1.runner.cleanup()
    await v2.runner.cleanup()


@pytest.fixture
async def nginx(tmp_path, backends) -> AsyncIterator[NginxInstance]:
    v1, v2 = backends
    instance = await start_nginx(tmp_path / "nginx", v1.port, v2.port)
    try:
        yield instance
    finally:
        await stop_nginx(instance.prefix)


@pytest.fixture
def environment(tmp_path, nginx) -> Environment:
    return Environment(name="sandbox", workdir=tmp_path, nginx=nginx.settings())


def nginx_step(**params) -> Step:
    defaults = {"file": RUNBOOK_SITE_FILE, "block": RUNBOOK_BLOCK, "validate": RUNBOOK_VALIDATE,
                "reload": RUNBOOK_RELOAD}
    return Step(id="p4.2", title="Nginx設定更新", kind="nginx", source_line=58,
                params={**defaults, **params})


def make_context(environment: Environment, step: Step, artifacts: Path, *, previous: dict | None = None,
                 timeout: float = 30, saved: list | None = None) -> StepContext:
    async def checkpoint(data: dict) -> None:
        if saved is not None:
            saved.append(dict(data))

    return StepContext(
        run_id="run-1",
        step=step,
        environment=environment,
        artifacts_dir=artifacts,
        output=OutputBuffer(100_000),
        timeout_seconds=timeout,
        locale="en",
        previous_data=previous or {},
        checkpoint=checkpoint,
    )


async def get_body(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
            return await response.text()


async def wait_for_body(url: str, expected: str, seconds: float = 5.0) -> str:
    """Return the body once it is expected; a reload takes effect when the new workers start."""
    deadline = time.monotonic() + seconds
    body = ""
    while time.monotonic() < deadline:
        body = await get_body(url)
        if body == expected:
            return body
        await asyncio.sleep(0.05)
    return body


async def config_test_passes(instance: NginxInstance) -> bool:
    process = await asyncio.create_subprocess_exec(*shlex.split(instance.test_command),
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    return await process.wait() == 0


# -- insert ------------------------------------------------------------------


async def test_insert_routes_api_v2(tmp_path, nginx, environment, backends):
    v1, v2 = backends
    original = nginx.site_file.read_text()
    assert await get_body(f"{nginx.url}/api/v2/x") == "v1"
    saved: list[dict] = []
    context = make_context(environment, nginx_step(), tmp_path / "artifacts", saved=saved)

    result = await NginxExecutor().execute(context)

    text = nginx.site_file.read_text()
    assert text.count("location /api/v2 {") == 1
    assert '        proxy_set_header X-API-Version "2";\n' in text
    assert text.index("location /api/v2") < text.rindex("}")
    assert await config_test_passes(nginx)
    assert await wait_for_body(f"{nginx.url}/api/v2/x", "v2") == "v2"
    assert v2.headers[-1]["X-API-Version"] == "2"
    assert await get_body(f"{nginx.url}/") == "v1"

    assert result.data["changed"] is True
    assert result.data["path"] == str(nginx.site_file)
    assert result.data["location"] == "/api/v2"
    assert Path(result.data["backup"]).read_text() == original
    assert Path(result.data["backup"]).is_relative_to(tmp_path / "artifacts")
    # The change is recorded before the file is written.
    assert saved and saved[0]["changed"] is True
    output = context.output.text()
    assert f"added location /api/v2 to {nginx.site_file}" in output
    assert "-s reload" in output
    assert NginxExecutor().repeat_safe(context.step)
    assert NginxExecutor().has_inverse(context.step)


async def test_insert_twice_leaves_one_block(tmp_path, nginx, environment):
    artifacts = tmp_path / "artifacts"
    first = await NginxExecutor().execute(make_context(environment, nginx_step(), artifacts))
    after_first = nginx.site_file.read_text()

    # A repeat of the same step, as after a crash: the earlier data is passed back.
    context = make_context(environment, nginx_step(), artifacts, previous=first.data)
    second = await NginxExecutor().execute(context)

    assert nginx.site_file.read_text() == after_first
    assert after_first.count("location /api/v2") == 1
    assert "already has location /api/v2" in context.output.text()
    assert second.data["changed"] is True
    assert second.data["backup"] == first.data["backup"]
    assert await wait_for_body(f"{nginx.url}/api/v2/x", "v2") == "v2"

    # A fresh step on the file that already has the block changes nothing either.
    third = await NginxExecutor().execute(make_context(environment, nginx_step(), tmp_path / "other"))
    assert third.data["changed"] is False
    assert nginx.site_file.read_text() == after_first


@pytest.mark.parametrize(
    ("block", "nginx_error"),
    [
        (UNKNOWN_DIRECTIVE_BLOCK, 'unknown directive "proxy_set_headr"'),
        (MISSING_SEMICOLON_BLOCK, 'invalid number of arguments in "proxy_pass"'),
    ],
)
async def test_insert_broken_block_restores_file(tmp_path, nginx, environment, block, nginx_error):
    original = nginx.site_file.read_text()
    context = make_context(environment, nginx_step(block=block), tmp_path / "artifacts")

    with pytest.raises(StepError) as failure:
        await NginxExecutor().execute(context)

    assert failure.value.key == "nginx.insert_rejected"
    message = failure.value.render("en")
    assert nginx_error in message
    assert str(nginx.site_file) in message
    assert "Correct the block" in message
    assert failure.value.exit_code == 1
    assert nginx.site_file.read_text() == original
    assert "put back the previous" in context.output.text()
    assert await config_test_passes(nginx)
    assert await get_body(f"{nginx.url}/api/v2/x") == "v1"
    assert await get_body(f"{nginx.url}/") == "v1"
    assert running_pid(nginx.prefix) == nginx.pid


async def test_insert_non_location_block_rejected(tmp_path, nginx, environment):
    original = nginx.site_file.read_text()
    for block, key in (("proxy_pass http://backend-v2;", "nginx.block_not_location"),
                       ("location /api/v2 {\n    proxy_pass http://backend-v2;\n", "nginx.invalid_block")):
        with pytest.raises(StepError) as failure:
            await NginxExecutor().execute(make_context(environment, nginx_step(block=block), tmp_path / "a"))
        assert failure.value.key == key
        assert RUNBOOK_SITE_FILE in failure.value.render("en")
    assert nginx.site_file.read_text() == original


# -- rollback, restore and reload --------------------------------------------


async def test_rollback_removes_the_block(tmp_path, nginx, environment):
    original = nginx.site_file.read_text()
    artifacts = tmp_path / "artifacts"
    forward = await NginxExecutor().execute(make_context(environment, nginx_step(), artifacts))
    assert await wait_for_body(f"{nginx.url}/api/v2/x", "v2") == "v2"

    context = make_context(environment, nginx_step(), artifacts, previous=forward.data)
    result = await NginxExecutor().rollback(context)

    assert nginx.site_file.read_text() == original
    assert result.data["restored"] is True
    assert await wait_for_body(f"{nginx.url}/api/v2/x", "v1") == "v1"
    assert await config_test_passes(nginx)


async def test_rollback_after_edit_removes_block(tmp_path, nginx, environment):
    original = nginx.site_file.read_text()
    artifacts = tmp_path / "artifacts"
    forward = await NginxExecutor().execute(make_context(environment, nginx_step(), artifacts))
    edited = nginx.site_file.read_text().replace("server_name api.example.com;",
                                                 "server_name api.example.com;\n    # edited by hand")
    nginx.site_file.write_text(edited)

    context = make_context(environment, nginx_step(), artifacts, previous=forward.data)
    await NginxExecutor().rollback(context)

    text = nginx.site_file.read_text()
    assert "location /api/v2" not in text
    assert "# edited by hand" in text
    assert text.replace("\n    # edited by hand", "") == original
    assert "only the location /api/v2" in context.output.text()
    assert await wait_for_body(f"{nginx.url}/api/v2/x", "v1") == "v1"


async def test_restore_then_reload(tmp_path, nginx, environment):
    original = nginx.site_file.read_text()
    artifacts = tmp_path / "artifacts"
    await NginxExecutor().execute(make_context(environment, nginx_step(), artifacts))
    assert await wait_for_body(f"{nginx.url}/api/v2/x", "v2") == "v2"

    # `git checkout nginx.conf.backup`: the planner may leave the file out.
    restore = Step(id="rb.1", title="Nginx設定ロールバック", kind="nginx", source_line=180,
                   params={"action": "restore", "validate": RUNBOOK_VALIDATE})
    restore_context = make_context(environment, restore, artifacts)
    result = await NginxExecutor().execute(restore_context)
    assert result.data["restored"] is True
    assert "-s reload" not in restore_context.output.text()
    assert nginx.site_file.read_text() == original
    assert not NginxExecutor().has_inverse(restore)
    # Restoring does not reload: the runbook's next line does.

    # `sudo systemctl reload nginx`
    reload = Step(id="rb.2", title="再起動", kind="nginx", source_line=181,
                  params={"action": "reload", "validate": RUNBOOK_VALIDATE, "reload": RUNBOOK_RELOAD})
    await NginxExecutor().execute(make_context(environment, reload, artifacts))
    assert await wait_for_body(f"{nginx.url}/api/v2/x", "v1") == "v1"

    # A repeat of the restore finds the file already restored.
    context = make_context(environment, restore, artifacts)
    again = await NginxExecutor().execute(context)
    assert again.data["restored"] is False
    assert "already matches the kept copy" in context.output.text()


async def test_restore_without_copy(tmp_path, nginx, environment):
    original = nginx.site_file.read_text()
    for params in ({"action": "restore"}, {"action": "restore", "file": RUNBOOK_SITE_FILE}):
        step = Step(id="rb.1", title="Nginx設定ロールバック", kind="nginx", source_line=180, params=params)
        result = await NginxExecutor().execute(make_context(environment, step, tmp_path / "artifacts"))
        assert result.data["restored"] is False
    assert nginx.site_file.read_text() == original


async def test_reload_invalid_config(tmp_path, nginx, environment):
    nginx.site_file.write_text(nginx.site_file.read_text().replace("proxy_pass http://backend-v1;", "bogus;"))
    reload = Step(id="rb.2", title="再起動", kind="nginx", source_line=181, params={"action": "reload"})
    with pytest.raises(StepError) as failure:
        await NginxExecutor().execute(make_context(environment, reload, tmp_path / "artifacts"))
    assert failure.value.key == "nginx.validate_failed"
    assert 'unknown directive "bogus"' in failure.value.render("en")
    assert await get_body(f"{nginx.url}/") == "v1"


# -- files and commands that fail --------------------------------------------


async def test_insert_missing_file(tmp_path, nginx):
    environment = Environment(name="staging", workdir=tmp_path,
                              nginx=NginxSettings(test_command=nginx.test_command,
                                                  reload_command=nginx.reload_command))
    step = nginx_step(file=str(tmp_path / "missing" / "api.conf"))
    with pytest.raises(StepError) as failure:
        await NginxExecutor().execute(make_context(environment, step, tmp_path / "artifacts"))
    assert failure.value.key == "nginx.file_not_found"
    message = failure.value.render("en")
    assert str(tmp_path / "missing" / "api.conf") in message
    assert "[environments.staging.nginx] files" in message
    assert "environments.staging.nginx" in failure.value.render("ja")

    mapped = Environment(name="staging", workdir=tmp_path,
                         nginx=NginxSettings(files={RUNBOOK_SITE_FILE: tmp_path / "nope.conf"}))
    with pytest.raises(StepError) as failure:
        await NginxExecutor().execute(make_context(mapped, nginx_step(), tmp_path / "artifacts"))
    assert failure.value.key == "nginx.mapped_file_not_found"
    assert str(tmp_path / "nope.conf") in failure.value.render("en")
    assert RUNBOOK_SITE_FILE in failure.value.render("en")


async def test_insert_missing_nginx_binary(tmp_path, nginx, environment):
    original = nginx.site_file.read_text()
    broken = environment.model_copy(update={"nginx": nginx.settings().model_copy(
        update={"test_command": f"{tmp_path}/no-such-nginx -t"})})
    with pytest.raises(StepError) as failure:
        await NginxExecutor().execute(make_context(broken, nginx_step(), tmp_path / "artifacts"))
    assert failure.value.key == "nginx.command_not_found"
    assert "no-such-nginx" in failure.value.render("en")
    assert nginx.site_file.read_text() == original


async def test_insert_test_command_timeout(tmp_path, nginx, environment):
    original = nginx.site_file.read_text()
    slow = environment.model_copy(update={"nginx": nginx.settings().model_copy(
        update={"test_command": "sleep 30"})})
    started = time.monotonic()
    with pytest.raises(StepError) as failure:
        await NginxExecutor().execute(make_context(slow, nginx_step(), tmp_path / "artifacts", timeout=0.5))
    assert time.monotonic() - started < 5
    assert failure.value.key == "nginx.command_timed_out"
    assert nginx.site_file.read_text() == original


async def test_insert_cancelled_restores_file(tmp_path, nginx, environment):
    original = nginx.site_file.read_text()
    marker = tmp_path / "started"
    slow = environment.model_copy(update={"nginx": nginx.settings().model_copy(
        update={"test_command": f"sh -c 'echo $$ > {marker}; exec sleep 30'"})})
    task = asyncio.create_task(NginxExecutor().execute(make_context(slow, nginx_step(), tmp_path / "artifacts")))
    for _ in range(100):
        if marker.exists() and marker.read_text().strip():
            break
        await asyncio.sleep(0.02)
    pid = int(marker.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert nginx.site_file.read_text() == original
    await asyncio.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


async def test_insert_reload_failure_then_retry(tmp_path, backends, environment, nginx):
    artifacts = tmp_path / "artifacts"
    await stop_nginx(nginx.prefix)
    with pytest.raises(StepError) as failure:
        await NginxExecutor().execute(make_context(environment, nginx_step(), artifacts))
    assert failure.value.key == "nginx.reload_failed"
    assert "nginx.pid" in failure.value.render("en")
    assert nginx.site_file.read_text().count("location /api/v2") == 1

    v1, v2 = backends
    restarted = await start_nginx(nginx.prefix, v1.port, v2.port)
    assert restarted.port == nginx.port
    result = await NginxExecutor().execute(make_context(environment, nginx_step(), artifacts))
    assert result.data["backup"]
    assert await wait_for_body(f"{nginx.url}/api/v2/x", "v2") == "v2"


async def test_command_shell_operators_rejected(tmp_path, nginx):
    environment = Environment(name="x", workdir=tmp_path, nginx=NginxSettings(files=nginx.files))
    step = nginx_step(validate="sudo nginx -t && sudo systemctl reload nginx")
    with pytest.raises(StepError) as failure:
        await NginxExecutor().execute(make_context(environment, step, tmp_path / "artifacts"))
    assert failure.value.key == "nginx.bad_command"


# -- commands and config text ------------------------------------------------


def test_commands_without_sudo(tmp_path):
    environment = Environment(name="production", workdir=tmp_path)
    context = make_context(environment, nginx_step(), tmp_path)
    argv, written = validate_argv(context)
    assert argv[1:] == ["-t"]
    assert argv[0].endswith("nginx")
    assert written == RUNBOOK_VALIDATE
    argv, _ = reload_argv(context)
    assert argv[1:] == ["-s", "reload"]
    assert argv[0].endswith("nginx")

    configured = Environment(name="production", workdir=tmp_path,
                             nginx=NginxSettings(test_command="/opt/nginx -t -c /x.conf",
                                                 reload_command="/opt/nginx -s reload -c /x.conf"))
    context = make_context(configured, nginx_step(), tmp_path)
    assert validate_argv(context)[0] == ["/opt/nginx", "-t", "-c", "/x.conf"]
    assert reload_argv(context)[0] == ["/opt/nginx", "-s", "reload", "-c", "/x.conf"]


def test_insert_block_keeps_other_text(tmp_path):
    text = """# comment with a brace {
server {
    listen 80;
    server_name other.example.com;
}

server {
\tlisten 8080;
\tserver_name api.example.com;
\tadd_header X-Note "a } in quotes";
\tlocation / { proxy_pass http://backend-v1; }
}
"""
    path = tmp_path / "api.conf"
    block = parse_location_block("    " + RUNBOOK_BLOCK.replace("\n", "\n    "), "api.conf")
    assert block.args == ["/api/v2"]
    server = find_server(text, path, "api.conf", "api.example.com")
    new, line = insert_block(text, server, "    " + RUNBOOK_BLOCK.replace("\n", "\n    "))
    assert new.splitlines()[line - 1] == "\tlocation /api/v2 {"
    assert '\t    proxy_set_header X-API-Version "2";' in new
    assert new.endswith("\tlocation /api/v2 {\n\t    proxy_pass http://backend-v2;\n"
                        '\t    proxy_set_header X-API-Version "2";\n\t}\n}\n')
    assert remove_location(new, path, "api.conf", ["/api/v2"]) == text

    with pytest.raises(StepError) as failure:
        find_server(text, path, "api.conf", "www.example.com")
    assert failure.value.key == "nginx.server_not_found"

    first = find_server(text, path, "api.conf", None)
    new_first, _ = insert_block(text, first, RUNBOOK_BLOCK)
    assert new_first.index("location /api/v2") < new_first.index("server {\n\tlisten 8080")


async def test_sandbox_nginx_start_stop(tmp_path, backends):
    v1, v2 = backends
    prefix = tmp_path / "nginx"
    first = await start_nginx(prefix, v1.port, v2.port)
    try:
        assert os.stat(first.conf).st_uid == os.getuid()
        again = await start_nginx(prefix, v1.port, v2.port)
        assert (again.pid, again.port) == (first.pid, first.port)
        assert await get_body(f"{first.url}/anything") == "v1"
        assert first.settings().files == {RUNBOOK_SITE_FILE: prefix.absolute() / "sites-available" / "api.conf"}
        assert settings_for(prefix) == first.settings()
    finally:
        assert await stop_nginx(prefix) is True
    assert running_pid(prefix) is None
    assert await stop_nginx(prefix) is False
