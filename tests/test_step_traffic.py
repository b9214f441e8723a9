"""TrafficExecutor against the real sandbox nginx in front of the v1 and v2 services, with the load generator,
and against the Kubernetes API emulator."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bot.config import Environment, KubernetesSettings, NginxSettings, TrafficSettings
from bot.errors import StepError
from bot.plan import Step
from bot.sandbox.kube_api import KubeApiEmulator
from bot.sandbox.loadgen import LoadGenerator, check_local_url, create_control_app
from bot.sandbox.nginx import NginxInstance, nginx_available, start_nginx, stop_nginx, traffic_settings_for
from bot.sandbox.saas import SaasEmulator
from bot.sandbox.service import create_app
from steps.base import OutputBuffer, StepContext, StepResult
from steps.nginx import parse_config
from steps.traffic import (
    CANARY,
    CANARY_WEIGHT,
    TrafficExecutor,
    _NginxTarget,
    current_weight,
    send_all_to_green,
    upstream_weight,
)

needs_nginx = pytest.mark.skipif(
    not nginx_available(),
    reason="nginx is not installed (scripts/bootstrap installs the Debian package nginx)",
)

# Requests measured at each weight, and how far v2's share may be from it.
SAMPLE = 2000
TOLERANCE_POINTS = 3.0
# The test's load: enough to measure 2,000 requests in about two seconds.
RATE = 1200


class Services:
    """The sandbox's v1 and v2 services, in-process on 127.0.0.1."""

    def __init__(self) -> None:
        self.runners: dict[str, web.AppRunner] = {}
        self.ports: dict[str, int] = {}

    async def start(self) -> None:
        for version in ("v1", "v2"):
            runner = web.AppRunner(create_app(version), access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners[version] = runner
            self.ports[version] = runner.addresses[0][1]

    async def close(self) -> None:
        for runner in self.runners.values():
            await runner.cleanup()


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    running = Services()
    await running.start()
    yield running
    await running.close()


@pytest.fixture
async def nginx(tmp_path, services) -> AsyncIterator[NginxInstance]:
    instance = await start_nginx(tmp_path / "nginx", services.ports["v1"], services.ports["v2"])
    try:
        yield instance
    finally:
        await stop_nginx(instance.prefix)


@pytest.fixture
def environment(tmp_path, nginx) -> Environment:
    return Environment(name="sandbox", workdir=tmp_path, nginx=nginx.settings(), traffic=nginx.traffic_settings())


def traffic_step(weight: int | None, step_id: str = "p6.1") -> Step:
    return Step(id=step_id, title=f"{weight}% トラフィック → Blue (v2)", kind="traffic", source_line=142,
                weight=weight)


def make_context(environment: Environment, step: Step, tmp_path: Path, *, previous: dict | None = None,
                 timeout: float = 10.0, saved: list | None = None) -> StepContext:
    async def checkpoint(data: dict) -> None:
        if saved is not None:
            saved.append(json.loads(json.dumps(data)))

    return StepContext(run_id="run-1", step=step, environment=environment, artifacts_dir=tmp_path / "artifacts",
                       output=OutputBuffer(100_000), timeout_seconds=timeout, locale="en",
                       previous_data=previous or {}, checkpoint=checkpoint)


async def run_step(environment: Environment, weight: int, tmp_path: Path, **options) -> tuple[StepResult, str]:
    context = make_context(environment, traffic_step(weight), tmp_path, **options)
    result = await TrafficExecutor().execute(context)
    return result, context.output.text()


async def served_by(url: str, count: int) -> dict[str, int]:
    found: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(url) as response:
                await response.read()
                backend = response.headers.get("X-Served-By", "none")
                found[backend] = found.get(backend, 0) + 1
    return found


async def settled() -> None:
    # A reload takes effect when nginx's new worker starts; the old one only
    # finishes the requests it accepted.
    await asyncio.sleep(0.3)


def assert_clean(stats: dict) -> None:
    assert stats["failed"] == 0, stats["failures"]
    assert sum(stats["errors"].values()) == 0, stats["statuses"]
    assert stats["responses"]["unknown"] == 0, stats["statuses"]


# -- nginx: weights under load ---------------------------------------------------


@needs_nginx
async def test_nginx_weights_split_load(tmp_path, nginx, environment):
    assert await current_weight(environment) == 0
    async with SaasEmulator() as saas:
        async with LoadGenerator(f"{nginx.url}/api/users", rate=RATE, concurrency=32,
                                 datadog_control=f"{saas.base_url}/_emulator") as load:
            await load.wait_for_responses(200)
            before = load.reset()
            assert_clean(before)
            assert before["responses"]["v2"] == 0
            # Responses by backend, from the counts each reset returns.
            served = dict(before["responses"])

            previous = 0
            shares = {}
            for weight in (10, 50, 100):
                # The load keeps running while the step rewrites the upstream and reloads nginx.
                result, output = await run_step(environment, weight, tmp_path)
                assert result.data == {"provider": "nginx", "file": str(nginx.upstream_file),
                                       "upstream": "backend-api", "previous_weight": previous, "weight": weight}
                assert f"traffic to blue (v2): {previous}% -> {weight}% (nginx: backend-api in" in output
                assert "-s reload" in output
                assert await current_weight(environment) == weight
                await settled()
                # Every request sent during the reload got a response from v1 or v2.
                during = load.reset()
                assert_clean(during)
                stats = await load.wait_for_responses(SAMPLE, timeout=20)
                assert_clean(stats)
                for name in ("v1", "v2"):
                    served[name] += during["responses"][name]
                share = 100 * stats["responses"]["v2"] / (stats["responses"]["v1"] + stats["responses"]["v2"])
                shares[weight] = round(share, 2)
                assert abs(share - weight) <= TOLERANCE_POINTS, (weight, stats["responses"])
                previous = weight
            final = load.reset()
            assert_clean(final)
            for name in ("v1", "v2"):
                served[name] += final["responses"][name]
        # The versioned path stays on v1 whatever the weights.
        assert await served_by(f"{nginx.url}/api/v1/users", 5) == {"v1": 5}

        # The load generator posted one count per second and one duration per response of each backend,
        # including the requests still in flight at the last reset (at most the concurrency).
        series = saas.datadog.series
        for name in ("v1", "v2"):
            posted = sum(point.value for point in series[f"api.{name}.requests.count"])
            assert served[name] <= posted <= served[name] + 32, (name, posted, served)
            assert len(series[f"api.{name}.requests.duration"]) == posted
            assert all(point.value == 0 for point in series[f"api.{name}.errors.count"])
            assert {"service:api", f"version:{name}"} <= set(series[f"api.{name}.requests.count"][0].tags)
    print(f"v2 share by weight: {shares}")


@needs_nginx
async def test_nginx_zero_and_rollback(tmp_path, nginx, environment):
    await run_step(environment, 50, tmp_path)
    result, output = await run_step(environment, 0, tmp_path)
    assert result.data["previous_weight"] == 50
    assert result.data["weight"] == 0
    text = nginx.upstream_file.read_text()
    assert f"server 127.0.0.1:{environment.traffic.blue_server.rsplit(':', 1)[1]} down;" in text
    await settled()
    assert await served_by(f"{nginx.url}/api/users", 20) == {"v1": 20}

    forward, _ = await run_step(environment, 100, tmp_path)
    text = nginx.upstream_file.read_text()
    assert f"server {environment.traffic.green_server} down;" in text
    assert text.count(" down;") == 1
    await settled()
    assert await served_by(f"{nginx.url}/api/users", 20) == {"v2": 20}

    # Rollback means all traffic on green, not the weight before the step (50 here).
    step = traffic_step(100)
    context = make_context(environment, step, tmp_path, previous=forward.data)
    executor = TrafficExecutor()
    assert executor.has_inverse(step)
    assert executor.repeat_safe(step)
    undone = await executor.rollback(context)
    assert undone.data["previous_weight"] == 100
    assert undone.data["weight"] == 0
    assert "Sent all requests to green (v1)" in undone.summary
    assert "traffic to blue (v2): 100% -> 0%" in context.output.text()
    await settled()
    assert await served_by(f"{nginx.url}/api/users", 20) == {"v1": 20}

    # A repeated step changes nothing, and its output reports that.
    _, again = await run_step(environment, 0, tmp_path)
    assert "is already 0%" in again


@needs_nginx
async def test_nginx_failed_test_restores_file(tmp_path, nginx, environment):
    await run_step(environment, 10, tmp_path)
    await settled()
    original = nginx.upstream_file.read_bytes()
    # Someone left the site file broken: nginx -t fails, so the new weights must not stay.
    site = nginx.site_file.read_text()
    nginx.site_file.write_text(site.replace("proxy_pass http://backend-v1;", "bogus;"))
    with pytest.raises(StepError) as failure:
        await run_step(environment, 50, tmp_path)
    assert failure.value.key == "traffic.validate_failed"
    message = failure.value.render("en")
    assert 'unknown directive "bogus"' in message
    assert str(nginx.upstream_file) in message
    assert "was put back" in message
    assert nginx.upstream_file.read_bytes() == original
    assert await current_weight(environment) == 10
    # nginx still runs with the weights it had.
    nginx.site_file.write_text(site)
    found = await served_by(f"{nginx.url}/api/users", 50)
    assert found == {"v1": 45, "v2": 5}


@needs_nginx
async def test_nginx_reload_failure(tmp_path, nginx, environment):
    failing = environment.model_copy(update={"nginx": NginxSettings(
        files=nginx.files, test_command=nginx.test_command, reload_command="false")})
    with pytest.raises(StepError) as failure:
        await run_step(failing, 10, tmp_path)
    assert failure.value.key == "traffic.reload_failed"
    assert "false" in failure.value.render("en")
    # The file contains the new weight, so running the step again reloads it.
    result, _ = await run_step(environment, 10, tmp_path)
    assert result.data["previous_weight"] == 10


@needs_nginx
async def test_send_all_to_green_timing(tmp_path, nginx, environment):
    await run_step(environment, 100, tmp_path)
    await settled()
    assert await served_by(f"{nginx.url}/api/users", 5) == {"v2": 5}
    output = OutputBuffer(10_000)
    started = time.monotonic()
    seconds = await send_all_to_green(environment, output=output, locale="en")
    assert 0 < seconds <= time.monotonic() - started < 2.0
    assert "100% -> 0%" in output.text()
    assert await current_weight(environment) == 0
    await settled()
    assert await served_by(f"{nginx.url}/api/users", 10) == {"v1": 10}


@needs_nginx
async def test_sandbox_restart_keeps_weight(tmp_path, nginx, services, environment):
    await run_step(environment, 50, tmp_path)
    again = await start_nginx(nginx.prefix, services.ports["v1"], services.ports["v2"])
    assert again.pid == nginx.pid
    assert await current_weight(environment) == 50
    assert traffic_settings_for(nginx.prefix) == environment.traffic
    await start_nginx(nginx.prefix, services.ports["v1"], services.ports["v2"], reset=True)
    assert await current_weight(environment) == 0


# -- nginx: settings and files ---------------------------------------------------


async def test_invalid_settings_rejected(tmp_path):
    upstream = tmp_path / "upstream.conf"
    upstream.write_text("upstream backend-api {\n    server 127.0.0.1:1;\n    server 127.0.0.1:3;\n}\n")
    settings = TrafficSettings(provider="nginx", upstream_file=upstream, green_server="127.0.0.1:1",
                               blue_server="127.0.0.1:2")
    environment = Environment(name="sandbox", workdir=tmp_path, traffic=settings)
    cases = [
        (Environment(name="bare", workdir=tmp_path), 10, "traffic.not_configured"),
        (environment, 101, "traffic.invalid_weight"),
        (environment, None, "traffic.invalid_weight"),
        (environment.model_copy(update={"traffic": settings.model_copy(update={"green_server": None})}), 10,
         "traffic.missing_setting"),
        (environment.model_copy(update={"traffic": settings.model_copy(update={"blue_server": "x; include /y"})}),
         10, "traffic.bad_server"),
        (environment, 10, "traffic.upstream_other_servers"),
        (environment.model_copy(update={"traffic": settings.model_copy(update={"upstream_name": "other"})}), 10,
         "traffic.upstream_not_found"),
        (environment.model_copy(update={"traffic": settings.model_copy(update={"upstream_file": tmp_path / "no"})}),
         10, "traffic.upstream_file_missing"),
    ]
    for env, weight, key in cases:
        with pytest.raises(StepError) as failure:
            await run_step(env, weight, tmp_path)
        assert failure.value.key == key, (key, failure.value.render("en"))
        assert "run the step again" in failure.value.render("en") or key == "traffic.invalid_weight"
    assert upstream.read_text().count("server") == 2


def test_render_keeps_other_text(tmp_path):
    text = ("# upstreams\nhttp {\n\tupstream backend-api {\n\t\tkeepalive 8;\n\t\tserver 10.0.0.1:80 weight=3;"
            "  # green\n\t\tserver 10.0.0.2:80;\n\t}\n\tserver { listen 80; }\n}\n")
    target = _NginxTarget(tmp_path / "f", "backend-api", "10.0.0.1:80", "10.0.0.2:80")
    assert target.weight_of(text) == 25
    rendered = target.render(text, 10)
    assert rendered == ("# upstreams\nhttp {\n\tupstream backend-api {\n\t    keepalive 8;\n"
                        "\t    server 10.0.0.1:80 weight=90;\n\t    server 10.0.0.2:80 weight=10;\n\t}\n"
                        "\tserver { listen 80; }\n}\n")
    assert target.weight_of(rendered) == 10
    assert target.weight_of(target.render(rendered, 0)) == 0
    assert target.weight_of(target.render(rendered, 100)) == 100
    both_down = parse_config("upstream a { server g down; server b backup; }")[0]
    assert upstream_weight(both_down, "g", "b") is None


# -- load generator --------------------------------------------------------------


async def test_loadgen_only_localhost():
    for url in ("http://example.com/", "http://169.254.169.254/", "http://localhost:1/", "ftp://127.0.0.1/"):
        with pytest.raises(ValueError):
            check_local_url(url, "--url")
        with pytest.raises(ValueError):
            LoadGenerator(url)
    with pytest.raises(ValueError):
        LoadGenerator("http://127.0.0.1:1/", datadog_control="http://10.0.0.1/_emulator")


async def test_loadgen_refused_and_stats(unused_tcp_port):
    async with LoadGenerator(f"http://127.0.0.1:{unused_tcp_port}/", rate=200, concurrency=8) as load:
        stats = await load.wait_for_responses(20, timeout=5)
        runner = web.AppRunner(create_control_app(load), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/stats") as response:
                    served = await response.json()
                async with session.post(f"http://127.0.0.1:{port}/reset") as response:
                    assert (await response.json())["failed"] >= 20
                async with session.post(f"http://127.0.0.1:{port}/rate", json={"rate": 0}) as response:
                    assert response.status == 400
        finally:
            await runner.cleanup()
    assert stats["failures"].get("connect", 0) >= 20
    assert stats["responses"]["v2"] == 0
    assert served["failed"] >= 20
    assert served["v2_share"] is None


# -- kubernetes ------------------------------------------------------------------


INGRESS = "api-v2-canary"


@pytest.fixture
async def kube() -> AsyncIterator[KubeApiEmulator]:
    async with KubeApiEmulator(ready_delay=0.1) as emulator:
        yield emulator


async def create_ingress(kube: KubeApiEmulator, name: str = INGRESS, annotations: dict | None = None) -> None:
    body = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "annotations": annotations or {CANARY: "true"}},
            "spec": {"ingressClassName": "nginx", "rules": [{"host": "api.example.com", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "api-v2", "port": {"number": 80}}}}]}}]}}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {kube.token}"}) as session:
        async with session.post(f"{kube.url}/apis/networking.k8s.io/v1/namespaces/default/ingresses",
                                json=body) as response:
            assert response.status == 201, await response.text()


@pytest.fixture
def kube_environment(tmp_path, kube) -> Environment:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    return Environment(name="sandbox", workdir=tmp_path,
                       kubernetes=KubernetesSettings(kubeconfig=kubeconfig, context="postmerge-sandbox"),
                       traffic=TrafficSettings(provider="kubernetes", canary_ingress=INGRESS))


def annotations(kube: KubeApiEmulator) -> dict:
    return kube.get("ingresses.networking.k8s.io", "default", INGRESS)["metadata"]["annotations"]


async def test_kubernetes_canary_weight(tmp_path, kube, kube_environment):
    await create_ingress(kube, annotations={"kubernetes.io/description": "blue"})
    assert await current_weight(kube_environment) == 0
    saved: list[dict] = []
    for previous, weight in ((0, 10), (10, 50), (50, 100)):
        result, output = await run_step(kube_environment, weight, tmp_path, saved=saved)
        assert result.data == {"provider": "kubernetes", "ingress": INGRESS, "namespace": "default",
                               "previous_weight": previous, "weight": weight}
        assert annotations(kube)[CANARY_WEIGHT] == str(weight)
        assert annotations(kube)[CANARY] == "true"
        assert f"{previous}% -> {weight}% (kubernetes: Ingress default/{INGRESS})" in output
    assert annotations(kube)["kubernetes.io/description"] == "blue"
    assert saved[-1]["weight"] == 100
    assert await current_weight(kube_environment) == 100

    context = make_context(kube_environment, traffic_step(100), tmp_path, previous=result.data)
    undone = await TrafficExecutor().rollback(context)
    assert undone.data["weight"] == 0
    assert annotations(kube)[CANARY_WEIGHT] == "0"
    seconds = await send_all_to_green(kube_environment)
    assert seconds < 2.0
    assert await current_weight(kube_environment) == 0


async def test_kubernetes_missing_ingress(tmp_path, kube, kube_environment):
    with pytest.raises(StepError) as failure:
        await run_step(kube_environment, 10, tmp_path)
    assert failure.value.key == "traffic.canary_ingress_missing"
    message = failure.value.render("en")
    assert INGRESS in message
    assert "namespace default" in message
    assert "nginx.ingress.kubernetes.io/canary" in message
    assert "traffic.canary_ingress" in message
    assert INGRESS in failure.value.render("ja")


@pytest.mark.parametrize("status, key", [
    (401, "kubernetes.unauthorized"),
    (403, "kubernetes.forbidden"),
    (409, "kubernetes.conflict"),
    (500, "kubernetes.server_error"),
])
async def test_kubernetes_api_failures(tmp_path, kube, kube_environment, status, key):
    await create_ingress(kube)
    kube.fail(f"/ingresses/{INGRESS}", status=status, method="PATCH")
    with pytest.raises(StepError) as failure:
        await run_step(kube_environment, 10, tmp_path)
    assert failure.value.key == key
    assert INGRESS in failure.value.render("en")
    # Nothing was half done: the step runs again cleanly.
    result, _ = await run_step(kube_environment, 10, tmp_path)
    assert result.data["weight"] == 10
    assert annotations(kube)[CANARY_WEIGHT] == "10"


async def test_kubernetes_timeout_and_refused(tmp_path, kube, kube_environment):
    await create_ingress(kube)
    kube.fail(f"/ingresses/{INGRESS}", status=None, delay=2.0)
    with pytest.raises(StepError) as failure:
        await run_step(kube_environment, 10, tmp_path, timeout=0.5)
    assert failure.value.key == "kubernetes.timed_out"
    await kube.stop()
    with pytest.raises(StepError) as failure:
        await run_step(kube_environment, 10, tmp_path)
    assert failure.value.key == "kubernetes.connection_failed"
    await kube.start()
    result, _ = await run_step(kube_environment, 10, tmp_path)
    assert result.data["weight"] == 10
