"""The kubernetes step: a runbook's kubectl line carried out through the Kubernetes API.

The step talks to the cluster with kubernetes-asyncio (no kubectl binary),
configured by the environment's `kubernetes` section: a kubeconfig file and
context, in-cluster settings, or the default kubeconfig.

`parse_kubectl(command)` maps a kubectl line to a `KubectlCommand`, or returns
None for a form it does not map; the planner stores `KubectlCommand.to_params()`
in `Step.params`. When `params` has no `action`, the executor parses
`step.run_command` (else `step.commands[0]`) itself.

Step.params keys (all optional except `action`):

    action: str        "apply", "wait_pods", "set_image", "scale", "delete" or "logs"
    namespace: str     from -n/--namespace; else `environment.kubernetes.namespace`
    paths: list[str]   apply and delete: the -f files or folders, relative to
                       `environment.workdir` (a folder means its *.yaml, *.yml
                       and *.json files, not recursive)
    selector: str      wait_pods and logs: the -l label selector, "app=api,version=v2"
    resource: str      set_image and scale: "deployment"
    name: str          set_image and scale: the Deployment's name
    images: dict[str, str]  set_image: container name -> image
    replicas: int      scale: --replicas
    tail: int          logs: --tail, lines per pod (kubectl's default with -l is 10; -1 means all)
    head: int          logs: `| head -n N`, the number of log lines written in all
    container: str     logs: -c/--container

Runbook lines and what they become:

    kubectl apply -f k8s/v2/deployment.yaml   {"action": "apply", "paths": ["k8s/v2/deployment.yaml"]}
    kubectl get pods -l version=v2            {"action": "wait_pods", "selector": "version=v2"}
    kubectl set image deployment/api api=api:v1
        {"action": "set_image", "resource": "deployment", "name": "api", "images": {"api": "api:v1"}}
    kubectl scale deployment/api --replicas=0 {"action": "scale", "resource": "deployment", "name": "api", "replicas": 0}
    kubectl delete -f k8s/v2/                 {"action": "delete", "paths": ["k8s/v2/"]}
    kubectl logs -l app=api,version=v2 | head -n 50
        {"action": "logs", "selector": "app=api,version=v2", "head": 50}

apply is a server-side apply (field manager "postmerge", force) of every
document. Its rollback applies each object's previous state again and deletes
the objects the step created. set image and scale keep the previous images and
replica count for their rollback; delete keeps the deleted objects and its
rollback applies them again. wait_pods waits, with a watch, until every
selected pod is Running and Ready and at least one exists. Every changing
action records what its rollback needs before the first change and keeps what
an earlier attempt recorded, so running it again after an interruption is
harmless.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult

if TYPE_CHECKING:
    from bot.config import KubernetesSettings

FIELD_MANAGER = "postmerge"
ACTIONS = ("apply", "wait_pods", "set_image", "scale", "delete", "logs")
INVERTIBLE = frozenset({"apply", "set_image", "scale", "delete"})
# kubectl logs shows this many lines per pod when a selector picks the pods.
SELECTOR_DEFAULT_TAIL = 10
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# The executor stops this much before the step's timeout (at most 10% of it)
# so that it raises its own error naming the object whose request timed out.
FINISH_MARGIN_SECONDS = 0.25
# One watch request lasts at most this long before the pods are listed again.
WATCH_SECONDS = 60

# Kinds apply and delete support: kind -> (apiVersion, API class, method suffix, resource name).
KINDS: dict[str, tuple[str, str, str, str]] = {
    "Deployment": ("apps/v1", "AppsV1Api", "namespaced_deployment", "deployments.apps"),
    "Service": ("v1", "CoreV1Api", "namespaced_service", "services"),
    "ConfigMap": ("v1", "CoreV1Api", "namespaced_config_map", "configmaps"),
    "Ingress": ("networking.k8s.io/v1", "NetworkingV1Api", "namespaced_ingress", "ingresses.networking.k8s.io"),
}
# Metadata a previous object keeps when it is applied again on rollback.
KEPT_METADATA = ("name", "namespace", "labels", "annotations")


# Parsing ------------------------------------------------------------------------


@dataclass
class KubectlCommand:
    """A kubectl line's request, in the terms of Step.params (see the module docstring)."""

    action: str
    namespace: str | None = None
    paths: list[str] = field(default_factory=list)
    selector: str | None = None
    resource: str | None = None
    name: str | None = None
    images: dict[str, str] = field(default_factory=dict)
    replicas: int | None = None
    tail: int | None = None
    head: int | None = None
    container: str | None = None

    def to_params(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value not in (None, [], {})}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> KubectlCommand:
        known = {key: value for key, value in params.items() if key in cls.__dataclass_fields__}
        return cls(**known)


_DEPLOYMENT_WORDS = {"deployment", "deployments", "deploy", "deployment.apps", "deployments.apps"}
_POD_WORDS = {"pods", "pod", "po"}


def parse_kubectl(command: str) -> KubectlCommand | None:
    """Parse a kubectl line into a KubectlCommand, or return None for a form the executor does not carry out."""
    joined = re.sub(r"\\\r?\n", " ", command.strip())
    try:
        lexer = shlex.shlex(joined, posix=True, punctuation_chars="|;&<>")
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return None
    if words[:1] == ["sudo"]:
        words = words[1:]
    if words[:1] != ["kubectl"]:
        return None

    head: int | None = None
    if "|" in words:
        position = words.index("|")
        head = _parse_head(words[position + 1 :])
        if head is None:
            return None
        words = words[:position]
    if any(word and word[0] in "|;&<>" for word in words):
        return None

    words, namespace = _take_namespace(words[1:])
    if words is None or not words:
        return None
    verb, rest = words[0], words[1:]
    parsed: KubectlCommand | None
    if verb in ("apply", "delete"):
        parsed = _parse_files(verb, rest)
    elif verb == "get":
        parsed = _parse_get(rest)
    elif verb == "set":
        parsed = _parse_set_image(rest)
    elif verb == "scale":
        parsed = _parse_scale(rest)
    elif verb == "logs":
        parsed = _parse_logs(rest)
    else:
        parsed = None
    if parsed is None:
        return None
    if head is not None and parsed.action != "logs":
        return None
    parsed.head = head
    parsed.namespace = namespace
    return parsed


def _parse_head(words: list[str]) -> int | None:
    if words == ["head"]:
        return 10
    if len(words) == 3 and words[:2] == ["head", "-n"] and words[2].isdigit():
        return int(words[2])
    if len(words) == 2 and words[0] == "head" and re.fullmatch(r"-n?\d+", words[1]):
        return int(words[1].lstrip("-n"))
    return None


def _take_namespace(words: list[str]) -> tuple[list[str] | None, str | None]:
    """Remove -n/--namespace anywhere in the words and return the rest and the namespace."""
    rest: list[str] = []
    namespace: str | None = None
    index = 0
    while index < len(words):
        word = words[index]
        if word in ("-n", "--namespace"):
            if index + 1 >= len(words):
                return None, None
            namespace = words[index + 1]
            index += 2
            continue
        if word.startswith("--namespace="):
            namespace = word.split("=", 1)[1]
        elif word.startswith("-n") and len(word) > 2 and not word.startswith("--"):
            namespace = word[2:]
        else:
            rest.append(word)
        index += 1
    if namespace is not None and not namespace:
        return None, None
    return rest, namespace


def _option_values(words: list[str], names: dict[str, str], flags: set[str]) -> tuple[dict[str, list[str]], list[str]] | None:
    """Split words into option values (by canonical name) and positional words, or return None for an unknown option."""
    values: dict[str, list[str]] = {}
    positional: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word in flags:
            values.setdefault(word, []).append("")
            index += 1
            continue
        if word.startswith("-"):
            name, separator, value = word.partition("=")
            if name in names:
                if not separator:
                    if index + 1 >= len(words):
                        return None
                    value = words[index + 1]
                    index += 1
                values.setdefault(names[name], []).append(value)
                index += 1
                continue
            short = word[:2]
            if not word.startswith("--") and short in names and len(word) > 2:
                values.setdefault(names[short], []).append(word[2:])
                index += 1
                continue
            return None
        positional.append(word)
        index += 1
    return values, positional


def _parse_files(verb: str, words: list[str]) -> KubectlCommand | None:
    flags = {"--server-side", "--force-conflicts"} if verb == "apply" else {"--ignore-not-found", "--wait"}
    split = _option_values(words, {"-f": "file", "--filename": "file"}, flags)
    if split is None:
        return None
    values, positional = split
    if positional or not values.get("file") or any(not path or path == "-" for path in values["file"]):
        return None
    return KubectlCommand(action=verb, paths=values["file"])


def _parse_get(words: list[str]) -> KubectlCommand | None:
    split = _option_values(words, {"-l": "selector", "--selector": "selector"}, set())
    if split is None:
        return None
    values, positional = split
    if positional not in ([word] for word in _POD_WORDS) or len(values.get("selector", [])) != 1:
        return None
    selector = values["selector"][0].strip()
    return KubectlCommand(action="wait_pods", selector=selector) if selector else None


def _deployment_name(positional: list[str]) -> tuple[str, list[str]] | None:
    if not positional:
        return None
    kind, slash, name = positional[0].partition("/")
    if slash and kind in _DEPLOYMENT_WORDS and name:
        return name, positional[1:]
    if not slash and kind in _DEPLOYMENT_WORDS and len(positional) > 1:
        return positional[1], positional[2:]
    return None


def _parse_set_image(words: list[str]) -> KubectlCommand | None:
    if words[:1] != ["image"]:
        return None
    split = _option_values(words[1:], {}, set())
    if split is None:
        return None
    target = _deployment_name(split[1])
    if target is None:
        return None
    name, pairs = target
    images: dict[str, str] = {}
    for pair in pairs:
        container, separator, image = pair.partition("=")
        if not separator or not container or not image or container == "*":
            return None
        images[container] = image
    if not images:
        return None
    return KubectlCommand(action="set_image", resource="deployment", name=name, images=images)


def _parse_scale(words: list[str]) -> KubectlCommand | None:
    split = _option_values(words, {"--replicas": "replicas"}, set())
    if split is None:
        return None
    values, positional = split
    target = _deployment_name(positional)
    replicas = values.get("replicas", [])
    if target is None or target[1] or len(replicas) != 1 or not replicas[0].isdigit():
        return None
    return KubectlCommand(action="scale", resource="deployment", name=target[0], replicas=int(replicas[0]))


def _parse_logs(words: list[str]) -> KubectlCommand | None:
    split = _option_values(
        words,
        {"-l": "selector", "--selector": "selector", "--tail": "tail", "-c": "container", "--container": "container"},
        {"--prefix", "--timestamps"},
    )
    if split is None:
        return None
    values, positional = split
    if positional or len(values.get("selector", [])) != 1:
        return None
    tail: int | None = None
    if values.get("tail"):
        text = values["tail"][-1]
        if not re.fullmatch(r"-?\d+", text):
            return None
        tail = int(text)
    container = values["container"][-1] if values.get("container") else None
    selector = values["selector"][0].strip()
    if not selector:
        return None
    return KubectlCommand(action="logs", selector=selector, tail=tail, container=container)


def command_of(step: Step) -> KubectlCommand:
    """Return the step's command from its params, or parsed from its command line."""
    if step.params.get("action"):
        if step.params["action"] not in ACTIONS:
            raise StepError("kubernetes.unsupported_command", step=step.id, command=str(step.params["action"]))
        return KubectlCommand.from_params(step.params)
    line = step.run_command or (step.commands[0] if step.commands else "")
    parsed = parse_kubectl(line) if line else None
    if parsed is None:
        raise StepError("kubernetes.unsupported_command", step=step.id, command=line or step.title)
    return parsed


# Manifests ----------------------------------------------------------------------


@dataclass
class Manifest:
    """One object of a manifest file, in the namespace it goes to."""

    file: str
    body: dict[str, Any]
    kind: str
    name: str
    namespace: str

    @property
    def label(self) -> str:
        return object_label(self.kind, self.namespace, self.name)


def object_label(kind: str, namespace: str, name: str) -> str:
    """Name an object the way the step's messages do: `Deployment default/api-v2`."""
    return f"{kind} {namespace}/{name}"


def load_manifests(context: StepContext, paths: list[str], flag_namespace: str | None, default: str) -> list[Manifest]:
    """Read every document of the files (folders: their manifest files) and check each is supported."""
    import yaml

    manifests: list[Manifest] = []
    for given in paths:
        path = context.environment.resolve(given)
        if path.is_dir():
            files = sorted(child for child in path.iterdir() if child.is_file() and child.suffix in MANIFEST_SUFFIXES)
            if not files:
                raise StepError("kubernetes.no_manifests", path=str(path))
        elif path.is_file():
            files = [path]
        else:
            raise StepError("kubernetes.file_not_found", path=str(path), workdir=str(context.environment.workdir))
        for file in files:
            try:
                documents = list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
            except OSError as error:
                raise StepError("kubernetes.file_unreadable", path=str(file), error=error.strerror or str(error)) from None
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                raise StepError("kubernetes.invalid_yaml", path=str(file), error=_one_line(str(error))) from None
            for document in _flatten_lists(documents):
                manifests.append(_manifest(file, document, flag_namespace, default))
    return manifests


def _flatten_lists(documents: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for document in documents:
        if document is None:
            continue
        if isinstance(document, dict) and document.get("kind") == "List" and isinstance(document.get("items"), list):
            flat.extend(item for item in document["items"] if item is not None)
        else:
            flat.append(document)
    return flat


def _manifest(file: Path, document: Any, flag_namespace: str | None, default: str) -> Manifest:
    if not isinstance(document, dict):
        raise StepError("kubernetes.manifest_incomplete", path=str(file), field="apiVersion, kind, metadata.name")
    kind = document.get("kind")
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    name = metadata.get("name")
    missing = [label for label, value in (("apiVersion", document.get("apiVersion")), ("kind", kind),
                                          ("metadata.name", name)) if not value]
    if missing:
        raise StepError("kubernetes.manifest_incomplete", path=str(file), field=", ".join(missing))
    if kind not in KINDS:
        raise StepError("kubernetes.unsupported_kind", path=str(file), kind=kind, name=name,
                        supported=", ".join(KINDS))
    if document["apiVersion"] != KINDS[kind][0]:
        raise StepError("kubernetes.unsupported_kind", path=str(file), kind=f"{kind} ({document['apiVersion']})",
                        name=name, supported=", ".join(f"{k} ({v[0]})" for k, v in KINDS.items()))
    own = metadata.get("namespace")
    if own and flag_namespace and own != flag_namespace:
        raise StepError("kubernetes.namespace_mismatch", path=str(file), object=object_label(kind, own, name),
                        namespace=flag_namespace)
    namespace = own or flag_namespace or default
    body = json.loads(json.dumps(document, default=str))
    body["metadata"]["namespace"] = namespace
    return Manifest(file=str(file), body=body, kind=kind, name=str(name), namespace=namespace)


# The executor -------------------------------------------------------------------


class Session:
    """One step's connection to the cluster: API client, deadline and error translation."""

    def __init__(self, context: StepContext, api_client: Any, server: str, source: str) -> None:
        self.context = context
        self.api_client = api_client
        self.server = server
        self.source = source
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        margin = min(FINISH_MARGIN_SECONDS, context.timeout_seconds * 0.1)
        self.deadline = self.started + context.timeout_seconds - margin

    def remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def elapsed(self) -> float:
        return round(asyncio.get_running_loop().time() - self.started, 1)

    def api(self, class_name: str) -> Any:
        from kubernetes_asyncio import client

        return getattr(client, class_name)(self.api_client)

    def write(self, key: str, **params: Any) -> None:
        self.context.output.write(translate(key, self.context.locale, **params))

    async def call(self, verb: str, target: str, resource: str, namespace: str, method: Any, *args: Any,
                   not_found_ok: bool = False, **kwargs: Any) -> Any:
        """Call one API method and turn every failure into a StepError naming the object and the fix.

        `verb` is the RBAC verb (get, list, watch, create, patch, delete) and
        `resource` the resource name (deployments.apps) a 403 fix names.
        """
        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        remaining = self.remaining()
        if remaining <= 0:
            raise self.timed_out(verb, target)
        try:
            return await method(*args, _request_timeout=remaining, **kwargs)
        except ApiException as error:
            if not_found_ok and error.status == 404:
                return None
            raise self.api_error(error, verb, target, resource, namespace) from None
        except asyncio.TimeoutError:
            raise self.timed_out(verb, target) from None
        except aiohttp.ClientConnectorError as error:
            raise StepError("kubernetes.connection_failed", verb=verb, object=target, server=self.server,
                            source=self.source, error=_describe(error)) from None
        except aiohttp.ClientError as error:
            raise StepError("kubernetes.request_failed", verb=verb, object=target, server=self.server,
                            error=_describe(error)) from None

    def timed_out(self, verb: str, target: str) -> StepError:
        return StepError("kubernetes.timed_out", verb=verb, object=target, server=self.server,
                         seconds=self.elapsed(), timeout=self.context.timeout_seconds)

    def api_error(self, error: Any, verb: str, target: str, resource: str, namespace: str) -> StepError:
        status = int(error.status or 0)
        message = _status_message(error)
        common = {"verb": verb, "object": target, "status": status, "message": message, "server": self.server}
        if status == 401:
            return StepError("kubernetes.unauthorized", source=self.source, **common)
        if status == 403:
            return StepError("kubernetes.forbidden", resource=resource, namespace=namespace, **common)
        if status == 404:
            return StepError("kubernetes.not_found", namespace=namespace, **common)
        if status == 409:
            return StepError("kubernetes.conflict", **common)
        if status in (400, 422):
            return StepError("kubernetes.invalid", **common)
        if status == 429 or status >= 500:
            return StepError("kubernetes.server_error", **common)
        return StepError("kubernetes.api_error", **common)


class KubernetesExecutor(BaseExecutor):
    kind = "kubernetes"

    def repeat_safe(self, step: Step) -> bool:
        # Every action is idempotent (server-side apply, patches to a set
        # value, delete of what may be gone) and keeps the rollback data of an
        # earlier attempt.
        return _action(step) in ACTIONS

    def has_inverse(self, step: Step) -> bool:
        return _action(step) in INVERTIBLE

    async def execute(self, context: StepContext) -> StepResult:
        command = command_of(context.step)
        async with self._session(context) as session:
            namespace = command.namespace or _settings(context).namespace
            handler = getattr(self, f"_{command.action}")
            return await handler(session, command, namespace)

    async def rollback(self, context: StepContext) -> StepResult:
        data = context.previous_data
        action = data.get("action")
        if action not in INVERTIBLE:
            raise StepError("kubernetes.rollback_without_data", step=context.step.id, title=context.step.title)
        async with self._session(context) as session:
            return await getattr(self, f"_undo_{action}")(session, data)

    # Connection -------------------------------------------------------------

    def _session(self, context: StepContext) -> _SessionScope:
        return _SessionScope(context)

    # apply ------------------------------------------------------------------

    async def _apply(self, session: Session, command: KubectlCommand, namespace: str) -> StepResult:
        context = session.context
        manifests = load_manifests(context, command.paths, command.namespace, namespace)
        earlier = _earlier_objects(context, "apply")
        records = []
        for manifest in manifests:
            current = await self._read(session, manifest.kind, manifest.namespace, manifest.name, manifest.label)
            record = earlier.get(_record_key(manifest.kind, manifest.namespace, manifest.name))
            if record is None:
                record = {
                    "file": manifest.file, "kind": manifest.kind, "apiVersion": manifest.body["apiVersion"],
                    "namespace": manifest.namespace, "name": manifest.name,
                    "existed": current is not None, "previous": _restorable(current),
                }
            record["current_version"] = (current or {}).get("metadata", {}).get("resourceVersion")
            records.append(record)
        data = {"action": "apply", "namespace": namespace, "paths": command.paths,
                "objects": [_without(record, "current_version") for record in records]}
        # The previous objects are stored before the first change, so a repeat
        # after an interruption still restores the objects from before the run.
        await context.save(data)

        for manifest, record in zip(manifests, records):
            applied = await self._server_side_apply(session, manifest.kind, manifest.body, manifest.label)
            version = applied.get("metadata", {}).get("resourceVersion")
            if record["current_version"] is None:
                outcome = "created"
            elif version == record["current_version"]:
                outcome = "unchanged"
            else:
                outcome = "configured"
            session.write(f"kubernetes.output_{outcome}", object=_kubectl_name(manifest.kind, manifest.name),
                          namespace=manifest.namespace)
        summary = translate("kubernetes.apply_summary", context.locale, count=len(manifests),
                            paths=", ".join(command.paths), seconds=session.elapsed())
        return StepResult(ok=True, summary=summary, data=data)

    async def _undo_apply(self, session: Session, data: dict[str, Any]) -> StepResult:
        restored = 0
        for record in reversed(data.get("objects") or []):
            label = object_label(record["kind"], record["namespace"], record["name"])
            name = _kubectl_name(record["kind"], record["name"])
            if record.get("previous") is None:
                deleted = await self._delete_object(session, record["kind"], record["namespace"], record["name"], label)
                key = "kubernetes.output_deleted" if deleted else "kubernetes.output_already_gone"
                session.write(key, object=name, namespace=record["namespace"])
            else:
                await self._server_side_apply(session, record["kind"], record["previous"], label)
                session.write("kubernetes.output_restored", object=name, namespace=record["namespace"])
            restored += 1
        summary = translate("kubernetes.rollback_summary", session.context.locale, count=restored,
                            seconds=session.elapsed())
        return StepResult(ok=True, summary=summary, data={"action": "undo_apply", "count": restored})

    # delete -----------------------------------------------------------------

    async def _delete(self, session: Session, command: KubectlCommand, namespace: str) -> StepResult:
        context = session.context
        manifests = load_manifests(context, command.paths, command.namespace, namespace)
        earlier = _earlier_objects(context, "delete")
        records = []
        for manifest in manifests:
            key = _record_key(manifest.kind, manifest.namespace, manifest.name)
            record = earlier.get(key)
            if record is None or record.get("previous") is None:
                current = await self._read(session, manifest.kind, manifest.namespace, manifest.name, manifest.label)
                record = {
                    "file": manifest.file, "kind": manifest.kind, "apiVersion": manifest.body["apiVersion"],
                    "namespace": manifest.namespace, "name": manifest.name,
                    "existed": current is not None or bool(record and record.get("existed")),
                    "previous": _restorable(current) if current is not None else (record or {}).get("previous"),
                }
            records.append(record)
        data = {"action": "delete", "namespace": namespace, "paths": command.paths, "objects": records}
        await context.save(data)

        deleted = 0
        for manifest in manifests:
            name = _kubectl_name(manifest.kind, manifest.name)
            if await self._delete_object(session, manifest.kind, manifest.namespace, manifest.name, manifest.label):
                deleted += 1
                session.write("kubernetes.output_deleted", object=name, namespace=manifest.namespace)
            else:
                session.write("kubernetes.output_already_gone", object=name, namespace=manifest.namespace)
        summary = translate("kubernetes.delete_summary", context.locale, count=deleted, total=len(manifests),
                            paths=", ".join(command.paths), seconds=session.elapsed())
        return StepResult(ok=True, summary=summary, data=data)

    async def _undo_delete(self, session: Session, data: dict[str, Any]) -> StepResult:
        restored = 0
        for record in reversed(data.get("objects") or []):
            if record.get("previous") is None:
                continue
            label = object_label(record["kind"], record["namespace"], record["name"])
            await self._server_side_apply(session, record["kind"], record["previous"], label)
            session.write("kubernetes.output_restored", object=_kubectl_name(record["kind"], record["name"]),
                          namespace=record["namespace"])
            restored += 1
        summary = translate("kubernetes.rollback_summary", session.context.locale, count=restored,
                            seconds=session.elapsed())
        return StepResult(ok=True, summary=summary, data={"action": "undo_delete", "count": restored})

    # set image ----------------------------------------------------------------

    async def _set_image(self, session: Session, command: KubectlCommand, namespace: str) -> StepResult:
        context = session.context
        name = _require(command.name, context, "name")
        label = object_label("Deployment", namespace, name)
        apps = session.api("AppsV1Api")
        deployment = await session.call("get", label, "deployments.apps", namespace,
                                         apps.read_namespaced_deployment, name, namespace)
        containers = {container.name: container.image for container in deployment.spec.template.spec.containers}
        for container in command.images:
            if container not in containers:
                raise StepError("kubernetes.container_not_found", object=label, container=container,
                                containers=", ".join(containers))
        earlier = context.previous_data
        previous = dict(earlier.get("previous_images") or {}) if (
            earlier.get("action") == "set_image" and earlier.get("name") == name
            and earlier.get("namespace") == namespace) else {}
        for container in command.images:
            previous.setdefault(container, containers[container])
        data = {"action": "set_image", "namespace": namespace, "name": name, "images": dict(command.images),
                "previous_images": previous}
        await context.save(data)

        await self._patch_images(session, namespace, name, command.images, label)
        for container, image in command.images.items():
            session.write("kubernetes.output_image", object=_kubectl_name("Deployment", name), namespace=namespace,
                          container=container, image=image, previous=containers[container])
        summary = translate("kubernetes.set_image_summary", context.locale, object=label,
                            images=_images_text(command.images), seconds=session.elapsed())
        return StepResult(ok=True, summary=summary, data=data)

    async def _undo_set_image(self, session: Session, data: dict[str, Any]) -> StepResult:
        name, namespace = data["name"], data["namespace"]
        previous = data.get("previous_images") or {}
        label = object_label("Deployment", namespace, name)
        await self._patch_images(session, namespace, name, previous, label)
        for container, image in previous.items():
            session.write("kubernetes.output_image_restored", object=_kubectl_name("Deployment", name),
                          namespace=namespace, container=container, image=image)
        summary = translate("kubernetes.set_image_summary", session.context.locale, object=label,
                            images=_images_text(previous), seconds=session.elapsed())
        return StepResult(ok=True, summary=summary, data={"action": "undo_set_image", "images": previous})

    async def _patch_images(self, session: Session, namespace: str, name: str, images: dict[str, str],
                            label: str) -> None:
        apps = session.api("AppsV1Api")
        body = {"spec": {"template": {"spec": {"containers": [
            {"name": container, "image": image} for container, image in images.items()
        ]}}}}
        await session.call("patch", label, "deployments.apps", namespace, apps.patch_namespaced_deployment,
                           name, namespace, body, _content_type="application/strategic-merge-patch+json")

    # scale --------------------------------------------------------------------

    async def _scale(self, session: Session, command: KubectlCommand, namespace: str) -> StepResult:
        context = session.context
        name = _require(command.name, context, "name")
        replicas = _require(command.replicas, context, "replicas")
        label = object_label("Deployment", namespace, name)
        apps = session.api("AppsV1Api")
        scale = await session.call("get", label, "deployments.apps/scale", namespace,
                                   apps.read_namespaced_deployment_scale, name, namespace)
        current = scale.spec.replicas if scale.spec and scale.spec.replicas is not None else 0
        earlier = context.previous_data
        previous = earlier.get("previous_replicas") if (
            earlier.get("action") == "scale" and earlier.get("name") == name
            and earlier.get("namespace") == namespace) else None
        if previous is None:
            previous = current
        data = {"action": "scale", "namespace": namespace, "name": name, "replicas": int(replicas),
                "previous_replicas": int(previous)}
        await context.save(data)

        await self._patch_replicas(session, namespace, name, int(replicas), label)
        session.write("kubernetes.output_scaled", object=_kubectl_name("Deployment", name), namespace=namespace,
                      replicas=replicas, previous=current)
        summary = translate("kubernetes.scale_summary", context.locale, object=label, replicas=replicas,
                            previous=current, seconds=session.elapsed())
        return StepResult(ok=True, summary=summary, data=data)

    async def _undo_scale(self, session: Session, data: dict[str, Any]) -> StepResult:
        name, namespace, previous = data["name"], data["namespace"], int(data["previous_replicas"])
        label = object_label("Deployment", namespace, name)
        await self._patch_replicas(session, namespace, name, previous, label)
        session.write("kubernetes.output_scaled", object=_kubectl_name("Deployment", name), namespace=namespace,
                      replicas=previous, previous=data.get("replicas"))
        summary = translate("kubernetes.scale_summary", session.context.locale, object=label, replicas=previous,
                            previous=data.get("replicas"), seconds=session.elapsed())
        return StepResult(ok=True, summary=summary, data={"action": "undo_scale", "replicas": previous})

    async def _patch_replicas(self, session: Session, namespace: str, name: str, replicas: int, label: str) -> None:
        apps = session.api("AppsV1Api")
        await session.call("patch", label, "deployments.apps/scale", namespace,
                           apps.patch_namespaced_deployment_scale, name, namespace, {"spec": {"replicas": replicas}},
                           _content_type="application/merge-patch+json")

    # get pods -l: wait until Ready ------------------------------------------------

    async def _wait_pods(self, session: Session, command: KubectlCommand, namespace: str) -> StepResult:
        from kubernetes_asyncio import watch
        from kubernetes_asyncio.client.exceptions import ApiException

        context = session.context
        selector = _require(command.selector, context, "selector")
        target = translate("kubernetes.pods_label", context.locale, selector=selector, namespace=namespace)
        settings = _settings(context)
        loop = asyncio.get_running_loop()
        wait_deadline = min(session.deadline, session.started + settings.wait_timeout_seconds)
        limit = min(settings.wait_timeout_seconds, context.timeout_seconds)
        core = session.api("CoreV1Api")
        pods: dict[str, Any] = {}
        shown: dict[str, str] = {}

        def report() -> bool:
            for pod_name, pod in sorted(pods.items()):
                line = _pod_line(pod)
                if shown.get(pod_name) != line:
                    shown[pod_name] = line
                    context.output.write(line)
            for gone in sorted(set(shown) - set(pods)):
                shown.pop(gone)
                session.write("kubernetes.output_pod_gone", pod=gone)
            return bool(pods) and all(_pod_ready(pod) for pod in pods.values())

        def wait_failure() -> StepError:
            states = "; ".join(_pod_line(pod) for _, pod in sorted(pods.items()))
            if not pods:
                return StepError("kubernetes.wait_no_pods", selector=selector, namespace=namespace, seconds=limit)
            return StepError("kubernetes.wait_timed_out", selector=selector, namespace=namespace, seconds=limit,
                             pods=states)

        while True:
            if wait_deadline - loop.time() <= 0:
                raise wait_failure()
            listing = await session.call("list", target, "pods", namespace, core.list_namespaced_pod, namespace,
                                         label_selector=selector)
            pods = {pod.metadata.name: pod for pod in listing.items if not pod.metadata.deletion_timestamp}
            if report():
                break
            version = listing.metadata.resource_version
            remaining = wait_deadline - loop.time()
            if remaining <= 0:
                raise wait_failure()
            watcher = watch.Watch()
            done = False
            try:
                async with asyncio.timeout_at(wait_deadline):
                    async for event in watcher.stream(
                        core.list_namespaced_pod, namespace, label_selector=selector, resource_version=version,
                        timeout_seconds=max(1, min(WATCH_SECONDS, int(remaining) + 1)),
                        _request_timeout=remaining + 1,
                    ):
                        pod = event["object"]
                        if event["type"] == "DELETED" or pod.metadata.deletion_timestamp:
                            pods.pop(pod.metadata.name, None)
                        else:
                            pods[pod.metadata.name] = pod
                        if report():
                            done = True
                            break
            except TimeoutError:
                raise wait_failure() from None
            except ApiException as error:
                if error.status != 410:
                    raise session.api_error(error, "watch", target, "pods", namespace) from None
            except Exception as error:  # noqa: BLE001 - a broken watch is listed again
                import aiohttp

                if not isinstance(error, (aiohttp.ClientError, asyncio.TimeoutError)):
                    raise
            finally:
                await watcher.close()
            if done:
                break

        names = sorted(pods)
        summary = translate("kubernetes.wait_summary", context.locale, count=len(names), selector=selector,
                            namespace=namespace, seconds=session.elapsed())
        return StepResult(ok=True, summary=summary,
                          data={"action": "wait_pods", "namespace": namespace, "selector": selector, "pods": names})

    # logs ---------------------------------------------------------------------------

    async def _logs(self, session: Session, command: KubectlCommand, namespace: str) -> StepResult:
        context = session.context
        selector = _require(command.selector, context, "selector")
        target = translate("kubernetes.pods_label", context.locale, selector=selector, namespace=namespace)
        core = session.api("CoreV1Api")
        listing = await session.call("list", target, "pods", namespace, core.list_namespaced_pod, namespace,
                                     label_selector=selector)
        names = sorted(pod.metadata.name for pod in listing.items)
        if not names:
            session.write("kubernetes.output_no_pods", selector=selector, namespace=namespace)

        tail = SELECTOR_DEFAULT_TAIL if command.tail is None else command.tail
        written = 0
        cut = False
        for name in names:
            options: dict[str, Any] = {}
            if tail >= 0:
                options["tail_lines"] = tail
            if command.container:
                options["container"] = command.container
            label = object_label("Pod", namespace, name)
            text = await session.call("get", label, "pods/log", namespace, core.read_namespaced_pod_log, name,
                                      namespace, **options)
            for line in (text or "").splitlines():
                if command.head is not None and written >= command.head:
                    cut = True
                    break
                context.output.write(f"{name} | {line}")
                written += 1
        if cut:
            session.write("kubernetes.output_head", count=command.head)
        summary = translate("kubernetes.logs_summary", context.locale, lines=written, count=len(names),
                            selector=selector, namespace=namespace)
        return StepResult(ok=True, summary=summary, data={"action": "logs", "namespace": namespace,
                                                          "selector": selector, "pods": names, "lines": written})

    # Object helpers ---------------------------------------------------------------

    async def _read(self, session: Session, kind: str, namespace: str, name: str, label: str) -> dict | None:
        _, api_class, suffix, resource = KINDS[kind]
        api = session.api(api_class)
        found = await session.call("get", label, resource, namespace, getattr(api, f"read_{suffix}"), name,
                                   namespace, not_found_ok=True)
        return None if found is None else session.api_client.sanitize_for_serialization(found)

    async def _server_side_apply(self, session: Session, kind: str, body: dict, label: str) -> dict:
        _, api_class, suffix, resource = KINDS[kind]
        api = session.api(api_class)
        metadata = body["metadata"]
        result = await session.call(
            "patch", label, resource, metadata["namespace"], getattr(api, f"patch_{suffix}"), metadata["name"],
            metadata["namespace"], body, field_manager=FIELD_MANAGER, force=True,
            _content_type="application/apply-patch+yaml",
        )
        return session.api_client.sanitize_for_serialization(result)

    async def _delete_object(self, session: Session, kind: str, namespace: str, name: str, label: str) -> bool:
        _, api_class, suffix, resource = KINDS[kind]
        api = session.api(api_class)
        result = await session.call("delete", label, resource, namespace, getattr(api, f"delete_{suffix}"), name,
                                    namespace, not_found_ok=True)
        return result is not None


class _SessionScope:
    """Open an API client from the environment's settings and close it afterwards."""

    def __init__(self, context: StepContext) -> None:
        self.context = context
        self.api_client: Any = None

    async def __aenter__(self) -> Session:
        from kubernetes_asyncio import client, config
        from kubernetes_asyncio.config.config_exception import ConfigException

        settings = _settings(self.context)
        if settings.in_cluster:
            source = "in-cluster service account"
        else:
            source = str(settings.kubeconfig) if settings.kubeconfig else config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
            if settings.context:
                source += f" (context {settings.context})"
        try:
            if settings.in_cluster:
                configuration = type.__call__(client.Configuration)
                config.load_incluster_config(client_configuration=configuration)
                self.api_client = client.ApiClient(configuration)
            else:
                self.api_client = await config.new_client_from_config(
                    config_file=str(settings.kubeconfig) if settings.kubeconfig else None,
                    context=settings.context,
                    persist_config=False,
                )
        except (ConfigException, OSError, ValueError, TypeError, KeyError) as error:
            # The loaders' messages name files and contexts, never a token.
            raise StepError("kubernetes.config_failed", source=source, error=_config_error(error)) from None
        server = self.api_client.configuration.host
        return Session(self.context, self.api_client, server, source)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.api_client is not None:
            await self.api_client.close()


# Helpers ------------------------------------------------------------------------


def _action(step: Step) -> str | None:
    if step.params.get("action"):
        return str(step.params["action"])
    line = step.run_command or (step.commands[0] if step.commands else "")
    parsed = parse_kubectl(line) if line else None
    return parsed.action if parsed else None


# The action of a step, for callers outside this module such as the rollback planner.
action_of = _action


def _settings(context: StepContext) -> KubernetesSettings:
    settings = context.environment.kubernetes
    if settings is None:
        raise StepError("kubernetes.not_configured", environment=context.environment.name)
    return settings


def _require(value: Any, context: StepContext, key: str) -> Any:
    if value is None or value == "":
        raise StepError("kubernetes.missing_param", step=context.step.id, title=context.step.title, key=key)
    return value


def _earlier_objects(context: StepContext, action: str) -> dict[str, dict]:
    earlier = context.previous_data
    if earlier.get("action") != action:
        return {}
    return {_record_key(record["kind"], record["namespace"], record["name"]): dict(record)
            for record in earlier.get("objects") or [] if isinstance(record, dict)}


def _record_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}"


def _without(record: dict, key: str) -> dict:
    return {name: value for name, value in record.items() if name != key}


def _restorable(obj: dict | None) -> dict | None:
    """Return an object as it can be applied again: its spec and data, without what the server owns."""
    if obj is None:
        return None
    metadata = obj.get("metadata") or {}
    restorable = {key: value for key, value in obj.items() if key not in ("status", "metadata")}
    restorable["metadata"] = {key: metadata[key] for key in KEPT_METADATA if metadata.get(key)}
    return restorable


def _kubectl_name(kind: str, name: str) -> str:
    """Name an object the way kubectl's output does: deployment.apps/api-v2."""
    resource = KINDS[kind][3] if kind in KINDS else kind.lower()
    singular = resource.split(".", 1)
    group = f".{singular[1]}" if len(singular) > 1 else ""
    return f"{kind.lower()}{group}/{name}"


def _images_text(images: dict[str, str]) -> str:
    return ", ".join(f"{container}={image}" for container, image in images.items())


def _pod_ready(pod: Any) -> bool:
    status = pod.status
    if status is None or status.phase != "Running":
        return False
    return any(condition.type == "Ready" and condition.status == "True" for condition in status.conditions or [])


def _pod_line(pod: Any) -> str:
    """Describe a pod as `kubectl get pods` does: name, ready containers, status."""
    status = pod.status
    containers = (status.container_statuses if status else None) or []
    ready = sum(1 for container in containers if container.ready)
    total = len(pod.spec.containers) if pod.spec and pod.spec.containers else len(containers)
    phase = (status.phase if status else None) or "Unknown"
    reason = next((c.state.waiting.reason for c in containers
                   if c.state and c.state.waiting and c.state.waiting.reason), None)
    shown = reason or phase
    return f"{pod.metadata.name} {ready}/{total} {shown}{' Ready' if _pod_ready(pod) else ''}"


def _status_message(error: Any) -> str:
    """Return the message of the API's Status body, or the HTTP reason."""
    body = error.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            return _one_line(body)[:300]
        if isinstance(parsed, dict) and parsed.get("message"):
            return _one_line(str(parsed["message"]))[:500]
    return str(error.reason or f"HTTP {error.status}")


def _config_error(error: Exception) -> str:
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error.strerror or error}"
    return _one_line(str(error)) or type(error).__name__


def _describe(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())
