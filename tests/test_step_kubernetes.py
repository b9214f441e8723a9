"""KubernetesExecutor with the real kubernetes_asyncio client against the Kubernetes API emulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from bot.config import Environment, KubernetesSettings
from bot.errors import StepError
from bot.plan import Step
from bot.sandbox.kube_api import KubeApiEmulator
from steps.base import OutputBuffer, StepContext, StepResult
from steps.kubernetes import KubectlCommand, KubernetesExecutor, parse_kubectl

REPO = Path(__file__).resolve().parent.parent
SANDBOX_K8S = REPO / "bot" / "sandbox" / "files" / "work" / "k8s"
APPLY_V2 = "kubectl apply -f k8s/v2/deployment.yaml"


@pytest.fixture
async def kube() -> AsyncIterator[KubeApiEmulator]:
    async with KubeApiEmulator(ready_delay=0.2) as emulator:
        yield emulator


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(SANDBOX_K8S, work / "k8s")
    return work


class Runner:
    """Runs kubectl lines as kubernetes steps in one environment."""

    def __init__(self, kube: KubeApiEmulator, workdir: Path, **settings: object) -> None:
        self.kube = kube
        self.workdir = workdir
        self.kubeconfig = kube.write_kubeconfig(workdir.parent / "kubeconfig")
        options = {"kubeconfig": self.kubeconfig, "context": "postmerge-sandbox", "wait_timeout_seconds": 5.0}
        options.update(settings)
        self.environment = Environment(name="test", workdir=workdir, kubernetes=KubernetesSettings(**options))
        self.outputs: list[OutputBuffer] = []

    def context(self, command: str, timeout: float = 10.0, previous: dict | None = None,
                locale: str = "en") -> StepContext:
        parsed = parse_kubectl(command)
        assert parsed is not None, command
        step = Step(id="s1", title=command, kind="kubernetes", source_line=1, commands=[command],
                    params=parsed.to_params())
        output = OutputBuffer(limit_bytes=1_000_000)
        self.outputs.append(output)
        self.saved: list[dict] = []

        async def checkpoint(data: dict) -> None:
            self.saved.append(json.loads(json.dumps(data)))

        return StepContext(run_id="run-1", step=step, environment=self.environment, artifacts_dir=self.workdir,
                           output=output, timeout_seconds=timeout, locale=locale, previous_data=previous or {},
                           checkpoint=checkpoint)

    async def run(self, command: str, **options: object) -> StepResult:
        return await KubernetesExecutor().execute(self.context(command, **options))

    async def undo(self, command: str, result: StepResult, **options: object) -> StepResult:
        return await KubernetesExecutor().rollback(self.context(command, previous=result.data, **options))

    async def fails(self, command: str, **options: object) -> StepError:
        with pytest.raises(StepError) as caught:
            await self.run(command, **options)
        return caught.value

    @property
    def output(self) -> str:
        return self.outputs[-1].text()


async def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def images(kube: KubeApiEmulator, deployment: str) -> set[str]:
    return {pod["spec"]["containers"][0]["image"] for pod in kube.pods_of(deployment)}


def all_ready(kube: KubeApiEmulator, deployment: str, count: int) -> bool:
    pods = kube.pods_of(deployment)
    return len(pods) == count and all(pod["status"]["phase"] == "Running" for pod in pods)


# apply and get pods -l ----------------------------------------------------------


async def test_apply_then_pods_ready(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)

    applied = await runner.run(APPLY_V2)
    assert "deployment.apps/api-v2 created (namespace default)" in runner.output
    assert applied.data["objects"][0]["previous"] is None
    assert runner.saved[0]["objects"][0]["name"] == "api-v2"

    started = time.monotonic()
    waited = await runner.run("kubectl get pods -l app=api,version=v2")
    assert time.monotonic() - started < 3
    pods = kube.pods_of("api-v2")
    assert len(pods) == 3
    assert sorted(waited.data["pods"]) == sorted(pod["metadata"]["name"] for pod in pods)
    for pod in pods:
        assert pod["metadata"]["name"].startswith("api-v2-")
        assert pod["metadata"]["labels"]["version"] == "v2"
        assert f"{pod['metadata']['name']} 1/1 Running Ready" in runner.output
    assert "ContainerCreating" in runner.output
    deployment = kube.get("deployments.apps", "default", "api-v2")
    assert deployment["status"]["readyReplicas"] == 3
    assert deployment["status"]["observedGeneration"] == deployment["metadata"]["generation"]
    applies = [r for r in kube.requests if r["content_type"].startswith("application/apply-patch+yaml")]
    assert applies
    assert {r["query"]["fieldManager"] for r in applies} == {"postmerge"}
    assert any(r["query"].get("watch") for r in kube.requests)


async def test_apply_twice_idempotent(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    first = await runner.run(APPLY_V2)
    generation = kube.get("deployments.apps", "default", "api-v2")["metadata"]["generation"]

    # A repeat after an interruption gets the first attempt's data.
    second = await runner.run(APPLY_V2, previous=first.data)

    assert "deployment.apps/api-v2 unchanged" in runner.output
    assert kube.get("deployments.apps", "default", "api-v2")["metadata"]["generation"] == generation
    assert second.data["objects"][0]["previous"] is None
    await runner.run("kubectl get pods -l version=v2")
    assert len(kube.pods_of("api-v2")) == 3


async def test_apply_rollback_restores_previous(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    folder = workdir / "k8s" / "bundle"
    folder.mkdir()
    green = kube.get("deployments.apps", "default", "api")
    changed_green = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "labels": {"app": "api", "version": "v1"}},
        "spec": {**{key: green["spec"][key] for key in ("selector", "template")}, "replicas": 4},
    }
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "api-v2-config"},
                  "data": {"API_VERSION": "v2"}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api-v2"},
               "spec": {"selector": {"app": "api", "version": "v2"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "api-v2"},
               "spec": {"rules": [{"host": "api.example.com", "http": {"paths": [{
                   "path": "/api/v2", "pathType": "Prefix",
                   "backend": {"service": {"name": "api-v2", "port": {"number": 80}}}}]}}]}}
    (folder / "a-green.yaml").write_text(yaml.safe_dump(changed_green), encoding="utf-8")
    (folder / "b-rest.yaml").write_text(yaml.safe_dump_all([config_map, service, ingress]), encoding="utf-8")
    (folder / "README.md").write_text("not a manifest", encoding="utf-8")

    result = await runner.run("kubectl apply -f k8s/bundle/")

    assert [record["kind"] for record in result.data["objects"]] == ["Deployment", "ConfigMap", "Service", "Ingress"]
    assert kube.get("deployments.apps", "default", "api")["spec"]["replicas"] == 4
    assert kube.get("configmaps", "default", "api-v2-config")["data"] == {"API_VERSION": "v2"}
    assert kube.get("ingresses.networking.k8s.io", "default", "api-v2") is not None
    assert "deployment.apps/api configured" in runner.output

    await runner.undo("kubectl apply -f k8s/bundle/", result)

    assert kube.get("configmaps", "default", "api-v2-config") is None
    assert kube.get("services", "default", "api-v2") is None
    assert kube.get("ingresses.networking.k8s.io", "default", "api-v2") is None
    restored = kube.get("deployments.apps", "default", "api")
    assert restored["spec"]["replicas"] == 2
    assert restored["metadata"]["uid"] == green["metadata"]["uid"]
    await wait_for(lambda: all_ready(kube, "api", 2))


# set image, scale, delete ---------------------------------------------------------


async def test_set_image_and_rollback(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    await wait_for(lambda: all_ready(kube, "api", 2))

    result = await runner.run("kubectl set image deployment/api api=api:v2-hotfix")

    assert result.data["previous_images"] == {"api": "api:v1"}
    assert "container api image set to api:v2-hotfix (was api:v1" in runner.output
    await wait_for(lambda: images(kube, "api") == {"api:v2-hotfix"} and all_ready(kube, "api", 2))

    await runner.undo("kubectl set image deployment/api api=api:v2-hotfix", result)

    deployment = kube.get("deployments.apps", "default", "api")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "api:v1"
    await runner.run("kubectl get pods -l app=api,version=v1")
    assert images(kube, "api") == {"api:v1"}


async def test_set_image_repeat_keeps_previous(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    first = await runner.run("kubectl set image deployment/api api=api:v1")
    await runner.run("kubectl set image deployment/api api=api:v3")
    repeat = await runner.run("kubectl set image deployment/api api=api:v3",
                              previous={**first.data, "previous_images": {"api": "api:v0"}})
    assert repeat.data["previous_images"] == {"api": "api:v0"}


async def test_scale_green_down_rollback(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    await wait_for(lambda: all_ready(kube, "api", 2))

    result = await runner.run("kubectl scale deployment/api --replicas=0")

    assert result.data["previous_replicas"] == 2
    assert "deployment.apps/api scaled to 0 replicas (was 2" in runner.output
    await wait_for(lambda: kube.pods_of("api") == [])
    # Scaled down, not deleted.
    assert kube.get("deployments.apps", "default", "api")["spec"]["replicas"] == 0

    await runner.undo("kubectl scale deployment/api --replicas=0", result)
    await runner.run("kubectl get pods -l version=v1")
    assert all_ready(kube, "api", 2)


async def test_delete_and_rollback(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    await runner.run(APPLY_V2)
    await runner.run("kubectl get pods -l version=v2")
    uid = kube.get("deployments.apps", "default", "api-v2")["metadata"]["uid"]

    deleted = await runner.run("kubectl delete -f k8s/v2/")

    assert kube.get("deployments.apps", "default", "api-v2") is None
    assert kube.pods_of("api-v2") == []
    assert "deployment.apps/api-v2 deleted" in runner.output
    previous = deleted.data["objects"][0]["previous"]
    assert previous["spec"]["replicas"] == 3
    assert "status" not in previous
    assert "uid" not in previous["metadata"]

    # Deleting again is harmless and keeps the object for the rollback.
    again = await runner.run("kubectl delete -f k8s/v2/", previous=deleted.data)
    assert "was already absent" in runner.output
    assert again.data["objects"][0]["previous"] == previous

    await runner.undo("kubectl delete -f k8s/v2/", again)
    restored = kube.get("deployments.apps", "default", "api-v2")
    assert restored["metadata"]["uid"] != uid
    assert restored["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/api:2.0.0"
    await runner.run("kubectl get pods -l version=v2")
    # Green was never touched.
    assert kube.get("deployments.apps", "default", "api")["spec"]["replicas"] == 2


async def test_logs_head_tail_no_pods(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    await runner.run(APPLY_V2)
    await runner.run("kubectl get pods -l version=v2")

    result = await runner.run("kubectl logs -l app=api,version=v2 | head -n 5")
    lines = [line for line in runner.output.splitlines() if " | " in line]
    assert len(lines) == 5
    assert result.data["lines"] == 5
    assert lines[0].startswith("api-v2-")
    assert "Stopped after the first 5 log lines" in runner.output

    result = await runner.run("kubectl logs -l version=v2 --tail=2")
    assert result.data["lines"] == 6
    assert len(result.data["pods"]) == 3

    await runner.run("kubectl delete -f k8s/v2/")
    result = await runner.run("kubectl logs -l version=v2")
    assert result.data["pods"] == []
    assert "No pods match version=v2 in namespace default." in runner.output


# Waiting ------------------------------------------------------------------------


async def test_wait_timeout_names_pods(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir, wait_timeout_seconds=0.8)
    kube.unready_images.add("registry.example.com/api:2.0.0")
    await runner.run(APPLY_V2)

    started = time.monotonic()
    error = await runner.fails("kubectl get pods -l version=v2")

    assert time.monotonic() - started < 2
    assert error.key == "kubernetes.wait_timed_out"
    message = error.render("en")
    assert "ImagePullBackOff" in message
    assert "api-v2-" in message
    assert "version=v2" in message
    assert "Running かつ Ready" in error.render("ja")

    # The image is fixed: the pulls are retried and the same step succeeds.
    kube.unready_images.clear()
    await runner.run("kubectl get pods -l version=v2")


async def test_wait_without_pods_fails(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir, wait_timeout_seconds=0.5)
    error = await runner.fails("kubectl get pods -l version=v9")
    assert error.key == "kubernetes.wait_no_pods"
    assert "version=v9" in error.render("en")


async def test_wait_is_cancellable(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    task = asyncio.create_task(runner.run("kubectl get pods -l version=v9"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# Failures -----------------------------------------------------------------------


async def test_unauthorized_then_succeeds(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    real_token = kube.token
    kube.token = "another-token"

    error = await runner.fails(APPLY_V2)

    assert error.key == "kubernetes.unauthorized"
    message = error.render("en")
    assert "Deployment default/api-v2" in message
    assert str(runner.kubeconfig) in message
    assert "HTTP 401" in message
    assert real_token not in message
    assert real_token not in runner.output
    kube.token = real_token
    await runner.run(APPLY_V2)


async def test_forbidden_then_succeeds(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    kube.fail("/deployments/api-v2", status=403, method="PATCH")

    error = await runner.fails(APPLY_V2)

    assert error.key == "kubernetes.forbidden"
    message = error.render("en")
    assert "patch permission on deployments.apps in namespace default" in message
    assert 'cannot patch resource "deployments"' in message
    assert "deployment.apps/api-v2" not in runner.output
    await runner.run(APPLY_V2)
    await runner.run("kubectl get pods -l version=v2")


async def test_not_found_then_succeeds(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)

    error = await runner.fails("kubectl set image deployment/api-v2 api=api:v3")

    assert error.key == "kubernetes.not_found"
    message = error.render("en")
    assert "Deployment default/api-v2 was not found" in message
    assert 'deployments.apps "api-v2" not found' in message
    await runner.run(APPLY_V2)
    await runner.run("kubectl set image deployment/api-v2 api=api:v3")


async def test_conflict_then_succeeds(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    kube.fail("/deployments/api/scale", status=409, method="PATCH")

    error = await runner.fails("kubectl scale deployment/api --replicas=0")

    assert error.key == "kubernetes.conflict"
    assert "Deployment default/api" in error.render("en")
    assert "object has been modified" in error.render("en")
    result = await runner.run("kubectl scale deployment/api --replicas=0", previous=runner.saved[-1])
    assert result.data["previous_replicas"] == 2


async def test_server_error_then_succeeds(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    kube.fail("/deployments/api-v2", status=503, method="GET")

    error = await runner.fails(APPLY_V2)

    assert error.key == "kubernetes.server_error"
    message = error.render("en")
    assert "HTTP 503" in message
    assert "Deployment default/api-v2" in message
    assert "run the step again" in message
    await runner.run(APPLY_V2)


async def test_invalid_manifest_names_field(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    bad = yaml.safe_load((workdir / "k8s" / "v2" / "deployment.yaml").read_text())
    bad["spec"]["selector"]["matchLabels"]["version"] = "v3"
    (workdir / "bad.yaml").write_text(yaml.safe_dump(bad), encoding="utf-8")

    error = await runner.fails("kubectl apply -f bad.yaml")

    assert error.key == "kubernetes.invalid"
    assert "HTTP 422" in error.render("en")
    assert "selector` does not match template `labels`" in error.render("en")


async def test_timeout_then_succeeds(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    kube.fail("/deployments/api-v2", status=None, delay=3.0, method="PATCH")

    started = time.monotonic()
    error = await runner.fails(APPLY_V2, timeout=1.0)

    assert time.monotonic() - started < 1.5
    assert error.key == "kubernetes.timed_out"
    assert "Deployment default/api-v2" in error.render("en")
    assert "1.0 s" in error.render("en")
    await runner.run(APPLY_V2, previous=runner.saved[-1])


async def test_refused_connection_then_succeeds(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    await kube.stop()

    error = await runner.fails("kubectl scale deployment/api --replicas=0")

    assert error.key == "kubernetes.connection_failed"
    message = error.render("en")
    assert kube.url in message
    assert "Deployment default/api" in message
    assert str(runner.kubeconfig) in message
    await kube.start()
    await runner.run("kubectl scale deployment/api --replicas=0")
    assert kube.get("deployments.apps", "default", "api")["spec"]["replicas"] == 0


async def test_configuration_errors(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    runner.environment.kubernetes = None
    assert (await runner.fails(APPLY_V2)).key == "kubernetes.not_configured"

    runner = Runner(kube, workdir, context="no-such-context")
    error = await runner.fails(APPLY_V2)
    assert error.key == "kubernetes.config_failed"
    assert "no-such-context" in error.render("en")

    runner = Runner(kube, workdir)
    error = await runner.fails("kubectl apply -f k8s/v3/")
    assert error.key == "kubernetes.file_not_found"
    (workdir / "secret.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n", encoding="utf-8")
    error = await runner.fails("kubectl apply -f secret.yaml")
    assert error.key == "kubernetes.unsupported_kind"
    assert "Secret s" in error.render("en")
    error = await runner.fails("kubectl -n staging apply -f k8s/v2/deployment.yaml")
    assert error.key == "kubernetes.namespace_mismatch"
    error = await runner.fails("kubectl set image deployment/api web=api:v3")
    assert error.key == "kubernetes.container_not_found"
    assert "api" in error.render("en")


# parse_kubectl and step metadata --------------------------------------------------


@pytest.mark.parametrize(
    ("command", "params"),
    [
        (APPLY_V2, {"action": "apply", "paths": ["k8s/v2/deployment.yaml"]}),
        ("kubectl apply --server-side -f k8s/v2/ -f extra.yaml",
         {"action": "apply", "paths": ["k8s/v2/", "extra.yaml"]}),
        ("kubectl get pods -l version=v2", {"action": "wait_pods", "selector": "version=v2"}),
        ("kubectl get pods -l app=api,version=v2", {"action": "wait_pods", "selector": "app=api,version=v2"}),
        ("kubectl -n prod get po --selector=app=api", {"action": "wait_pods", "selector": "app=api",
                                                       "namespace": "prod"}),
        ("kubectl set image deployment/api api=api:v1",
         {"action": "set_image", "resource": "deployment", "name": "api", "images": {"api": "api:v1"}}),
        ("kubectl scale deployment/api --replicas=0",
         {"action": "scale", "resource": "deployment", "name": "api", "replicas": 0}),
        ("kubectl scale deploy api --replicas 3 --namespace=blue",
         {"action": "scale", "resource": "deployment", "name": "api", "replicas": 3, "namespace": "blue"}),
        ("kubectl delete -f k8s/v2/", {"action": "delete", "paths": ["k8s/v2/"]}),
        ("kubectl logs -l version=v2", {"action": "logs", "selector": "version=v2"}),
        ("kubectl logs -l app=api,version=v2 | head -n 50",
         {"action": "logs", "selector": "app=api,version=v2", "head": 50}),
        ("kubectl logs -l version=v2 --tail=100 -c api",
         {"action": "logs", "selector": "version=v2", "tail": 100, "container": "api"}),
        ("sudo kubectl get pods -l version=v2", {"action": "wait_pods", "selector": "version=v2"}),
    ],
)
def test_parse_kubectl_known_forms(command: str, params: dict) -> None:
    parsed = parse_kubectl(command)
    assert parsed is not None
    assert parsed.to_params() == params
    assert KubectlCommand.from_params(parsed.to_params()) == parsed


@pytest.mark.parametrize(
    "command",
    [
        "kubectl rollout restart deployment/api",
        "kubectl rollout status deployment/api-v2",
        "kubectl get pods",
        "kubectl get deployments -l version=v2",
        "kubectl get pods -l version=v2 -w",
        "kubectl apply -f -",
        "kubectl apply -k overlays/prod",
        "kubectl delete deployment api-v2",
        "kubectl set image deployment/api *=api:v1",
        "kubectl scale deployment/api",
        "kubectl logs api-v2-abc",
        "kubectl logs -f -l version=v2",
        "kubectl get pods -l version=v2 | grep Running",
        "kubectl apply -f k8s/v2/ && kubectl get pods",
        "kubectl --context prod apply -f k8s/v2/",
        "helm upgrade api ./chart",
        "kubectl apply -f 'unterminated",
    ],
)
def test_parse_kubectl_unknown_forms(command: str) -> None:
    assert parse_kubectl(command) is None


def test_repeat_safe_and_inverse() -> None:
    executor = KubernetesExecutor()

    def step(command: str) -> Step:
        return Step(id="s", title=command, kind="kubernetes", source_line=1,
                    params=parse_kubectl(command).to_params())

    assert executor.repeat_safe(step("kubectl get pods -l version=v2"))
    assert executor.repeat_safe(step("kubectl logs -l version=v2"))
    assert not executor.has_inverse(step("kubectl get pods -l version=v2"))
    assert not executor.has_inverse(step("kubectl logs -l version=v2"))
    for command in (APPLY_V2, "kubectl delete -f k8s/v2/", "kubectl set image deployment/api api=api:v1",
                    "kubectl scale deployment/api --replicas=0"):
        assert executor.has_inverse(step(command))
    unparsed = Step(id="s", title="t", kind="kubernetes", source_line=1, commands=["kubectl get pods -l a=b"])
    assert executor.repeat_safe(unparsed)


async def test_step_without_params_parses_command(kube: KubeApiEmulator, workdir: Path) -> None:
    runner = Runner(kube, workdir)
    context = runner.context("kubectl scale deployment/api --replicas=1")
    context.step = Step(id="s2", title="scale", kind="kubernetes", source_line=1,
                        commands=["kubectl scale deployment/api --replicas=1"])
    result = await KubernetesExecutor().execute(context)
    assert result.data["replicas"] == 1
    context.step = Step(id="s3", title="restart", kind="kubernetes", source_line=1,
                        commands=["kubectl rollout restart deployment/api"])
    with pytest.raises(StepError) as caught:
        await KubernetesExecutor().execute(context)
    assert caught.value.key == "kubernetes.unsupported_command"


# The emulator itself ----------------------------------------------------------------


async def test_emulator_state_survives_restart(tmp_path: Path, workdir: Path) -> None:
    state = tmp_path / "kube-state.json"
    async with KubeApiEmulator(state_file=state, ready_delay=0.1) as kube:
        runner = Runner(kube, workdir)
        await runner.run(APPLY_V2)
        await runner.run("kubectl get pods -l version=v2")
        token, pods = kube.token, sorted(pod["metadata"]["name"] for pod in kube.pods_of("api-v2"))

    async with KubeApiEmulator(state_file=state, token=token, ready_delay=0.1) as kube:
        assert sorted(pod["metadata"]["name"] for pod in kube.pods_of("api-v2")) == pods
        runner = Runner(kube, workdir)
        await runner.run(APPLY_V2)
        assert "unchanged" in runner.output
        await runner.run("kubectl get pods -l version=v2")


async def test_emulator_command_line(tmp_path: Path, workdir: Path) -> None:
    port_file, kubeconfig = tmp_path / "port", tmp_path / "kubeconfig"
    process = subprocess.Popen(
        [sys.executable, "-m", "bot.sandbox.kube_api", "--port", "0", "--state", str(tmp_path / "state.json"),
         "--token-file", str(tmp_path / "token"), "--kubeconfig", str(kubeconfig), "--port-file", str(port_file),
         "--ready-delay", "0.1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert oct((tmp_path / "token").stat().st_mode & 0o777) == "0o600"
        assert oct(kubeconfig.stat().st_mode & 0o777) == "0o600"
        config = yaml.safe_load(kubeconfig.read_text())
        assert config["current-context"] == "postmerge-sandbox"
        assert config["clusters"][0]["cluster"]["server"] == f"http://127.0.0.1:{port_file.read_text().strip()}"
        environment = Environment(name="sandbox", workdir=workdir, kubernetes=KubernetesSettings(
            kubeconfig=kubeconfig, context="postmerge-sandbox", wait_timeout_seconds=5))
        step = Step(id="s", title="t", kind="kubernetes", source_line=1,
                    params=parse_kubectl("kubectl get pods -l app=api,version=v1").to_params())
        context = StepContext(run_id="r", step=step, environment=environment, artifacts_dir=tmp_path,
                              output=OutputBuffer(100_000), timeout_seconds=10)
        result = await KubernetesExecutor().execute(context)
        assert len(result.data["pods"]) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    state = json.loads((tmp_path / "state.json").read_text())
    assert [d["metadata"]["name"] for d in state["objects"]["deployments.apps"]] == ["api"]
