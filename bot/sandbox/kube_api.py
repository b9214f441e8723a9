"""The sandbox's Kubernetes API server: a stand-in for a cluster's kube-apiserver.

Run it as `python -m bot.sandbox.kube_api --port N --state FILE --token-file FILE
[--kubeconfig FILE] [--port-file FILE] [--ready-delay SECONDS]`. It binds to
127.0.0.1 only. Tests start it in-process with `async with KubeApiEmulator() as kube:`.

It serves the paths and wire format of the real API, as documented for
Kubernetes v1.30 (https://kubernetes.io/docs/reference/kubernetes-api/ and
apimachinery's metav1.Status), for the resources kubernetes steps use:

    /api/v1/namespaces/{ns}/pods[/{name}[/log]]       (list, watch=true, get, delete, log)
    /api/v1/namespaces/{ns}/services[/{name}]
    /api/v1/namespaces/{ns}/configmaps[/{name}]
    /apis/apps/v1/namespaces/{ns}/deployments[/{name}[/scale]]
    /apis/networking.k8s.io/v1/namespaces/{ns}/ingresses[/{name}]

with GET, LIST (labelSelector), POST, PATCH (application/apply-patch+yaml as a
simplified server-side apply with field managers, strategic-merge-patch+json and
merge-patch+json) and DELETE, plus /version, /api, /apis and the group
discovery documents. Errors are `Status` bodies with the real reasons and codes.

A small controller plays the Deployment and ReplicaSet controllers and the
kubelet: each Deployment gets `spec.replicas` pods named
`<deployment>-<template hash>-<random>` with the template's labels, which turn
Running and Ready `ready_delay` seconds after they are created. A new template
rolls the pods (new pods first, old ones deleted once the new ones are Ready),
and the Deployment's status is kept current.

Requests need `Authorization: Bearer <token>`; another token gets 401. The
state is written to the --state JSON file after every change and read back on
start, so it survives a restart. The seed is the Green Deployment `api`
(app=api, version=v1, container `api`, image `api:v1`, 2 replicas) in `default`.

Fault injection, for tests: `fail(path, status=..., count=..., delay=...)`
makes the next `count` requests whose path contains `path` get that status
(after the delay). `stop()` closes the listening socket so connections are
refused, and `start()` listens on the same port again. Pods of an image in
`unready_images` never become Ready (ImagePullBackOff).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import logging
import os
import random
import re
import secrets
import signal
import sys
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

logger = logging.getLogger("bot.sandbox.kube_api")

HOST = "127.0.0.1"
CONTEXT_NAME = "postmerge-sandbox"
DEFAULT_READY_DELAY_SECONDS = 0.3
CONTROLLER_TICK_SECONDS = 0.05
# Watch events kept for watches that resume from a resourceVersion.
EVENT_LOG_SIZE = 2000
REQUEST_LOG_SIZE = 1000
GIT_VERSION = "v1.30.0"
# The service account the 403 messages name, as a real cluster would.
SANDBOX_USER = "system:serviceaccount:default:postmerge"
# Characters of generated names, as Kubernetes' rand.SafeEncodeString uses.
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """The resource's name as Kubernetes messages write it: `deployments.apps`, `pods`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES = [
    ResourceType("", "v1", "pods", "Pod", ("po",)),
    ResourceType("", "v1", "services", "Service", ("svc",)),
    ResourceType("", "v1", "configmaps", "ConfigMap", ("cm",)),
    ResourceType("apps", "v1", "deployments", "Deployment", ("deploy",)),
    ResourceType("networking.k8s.io", "v1", "ingresses", "Ingress", ("ing",)),
]
BY_PATH = {(resource.group, resource.version, resource.plural): resource for resource in RESOURCES}
BY_KEY = {resource.key: resource for resource in RESOURCES}
DEPLOYMENTS = BY_KEY["deployments.apps"]
PODS = BY_KEY["pods"]

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}

# Metadata fields the server owns. The server ignores a client's values for them.
SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "selfLink")


class ApiError(Exception):
    """An error the API returns as a Status body."""

    def __init__(self, code: int, message: str, reason: str | None = None, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "Unknown")
        self.details = details

    def response(self) -> web.Response:
        return status_response(self.code, self.message, self.reason, self.details)


def status_body(code: int, message: str, reason: str | None = None, details: dict | None = None) -> dict:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def status_response(code: int, message: str, reason: str | None = None, details: dict | None = None) -> web.Response:
    return web.json_response(status_body(code, message, reason, details), status=code)


def now_text() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(length: int = 5) -> str:
    return "".join(random.choice(SAFE_ALPHABET) for _ in range(length))


def template_hash(template: dict) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return "".join(SAFE_ALPHABET[byte % len(SAFE_ALPHABET)] for byte in digest[:10])


# Label selectors -------------------------------------------------------------

_SELECTOR_TERM = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<absent>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*(?:,|$)"
)


def parse_selector(text: str) -> list[tuple[str, str, Any]]:
    """Parse a label selector into (key, operator, value) terms, raising ApiError 400 when it is invalid."""
    terms: list[tuple[str, str, Any]] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _SELECTOR_TERM.match(text, position)
        if match is None or match.end() == position:
            raise ApiError(400, f'unable to parse requirement: found \'{text[position:]}\', expected: label selector')
        if match.group("not"):
            terms.append((match.group("absent"), "!", None))
        elif match.group("op"):
            op = "!=" if match.group("op") == "!=" else "="
            terms.append((match.group("key"), op, match.group("value")))
        elif match.group("setop"):
            values = {value.strip() for value in match.group("values").split(",") if value.strip()}
            terms.append((match.group("key"), match.group("setop"), values))
        else:
            terms.append((match.group("key"), "exists", None))
        position = match.end()
    return terms


def selector_matches(terms: list[tuple[str, str, Any]], labels: dict[str, str]) -> bool:
    for key, op, value in terms:
        present = key in labels
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and present and labels[key] == value:
            return False
        if op == "in" and labels.get(key) not in value:
            return False
        if op == "notin" and present and labels[key] in value:
            return False
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
    return True


# Patches ---------------------------------------------------------------------


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) and "name" in item for item in value)


def strategic_merge(target: Any, patch: Any) -> Any:
    """Merge patch into target the way strategic merge patch does for the fields used here.

    Objects merge key by key, null deletes a key, lists of objects with a `name`
    (containers, ports, env) merge item by item on that name, other lists replace.
    """
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = strategic_merge(result[key], value)
        elif _named_list(value) and _named_list(result.get(key)):
            merged = [copy.deepcopy(item) for item in result[key]]
            positions = {item["name"]: index for index, item in enumerate(merged)}
            for item in value:
                if item["name"] in positions:
                    merged[positions[item["name"]]] = strategic_merge(merged[positions[item["name"]]], item)
                else:
                    merged.append(copy.deepcopy(item))
            result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def remove_unowned(target: Any, before: Any, after: Any) -> Any:
    """Remove from target the fields a manager applied before and no longer applies."""
    if not isinstance(target, dict) or not isinstance(before, dict):
        return target
    after = after if isinstance(after, dict) else {}
    result = dict(target)
    for key, old in before.items():
        if key not in result:
            continue
        if key not in after:
            result.pop(key)
        elif isinstance(old, dict):
            result[key] = remove_unowned(result[key], old, after[key])
        elif _named_list(old) and _named_list(after[key]) and isinstance(result[key], list):
            kept = {item["name"] for item in after[key]}
            dropped = {item["name"] for item in old} - kept
            old_items = {item["name"]: item for item in old}
            new_items = {item["name"]: item for item in after[key]}
            result[key] = [
                remove_unowned(item, old_items.get(item.get("name")), new_items.get(item.get("name")))
                for item in result[key]
                if not (isinstance(item, dict) and item.get("name") in dropped)
            ]
    return result


def leaf_conflicts(applied: Any, other: Any, current: Any, path: str = "") -> list[str]:
    """Return the paths where applied sets a value that another manager owns with a different value."""
    conflicts: list[str] = []
    if isinstance(applied, dict) and isinstance(other, dict):
        for key, value in applied.items():
            if key in other:
                conflicts += leaf_conflicts(
                    value, other[key], current.get(key) if isinstance(current, dict) else None, f"{path}.{key}"
                )
        return conflicts
    if _named_list(applied) and _named_list(other):
        others = {item["name"]: item for item in other}
        for item in applied:
            if item["name"] in others:
                conflicts += leaf_conflicts(item, others[item["name"]], None, f'{path}[name="{item["name"]}"]')
        return conflicts
    if applied != other and other == current:
        conflicts.append(path)
    return conflicts


# The emulator ------------------------------------------------------------------


@dataclass
class Fault:
    path: str
    status: int | None
    count: int
    delay: float
    method: str | None
    message: str | None


class KubeApiEmulator:
    """A Kubernetes API server on 127.0.0.1 with a controller that rolls pods.

    Objects are kept by resource key (`deployments.apps`, `pods`, …) and
    namespace/name; `get`, `list` and `pods_of` read them for assertions.
    """

    def __init__(
        self,
        token: str | None = None,
        port: int = 0,
        state_file: Path | None = None,
        ready_delay: float = DEFAULT_READY_DELAY_SECONDS,
        seed: bool = True,
    ) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self.port = port
        self.state_file = Path(state_file) if state_file else None
        self.ready_delay = ready_delay
        self.unready_images: set[str] = set()
        # The latest requests, without their headers, for tests to inspect.
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)
        self.faults: list[Fault] = []
        self.objects: dict[str, dict[tuple[str, str], dict]] = {resource.key: {} for resource in RESOURCES}
        # Per object, what each field manager last applied or patched.
        self.managers: dict[str, dict[str, dict]] = {}
        self.resource_version = 1000
        self._events: list[tuple[int, str, str, str, dict]] = []
        self._watchers: set[asyncio.Queue] = set()
        # When each pending pod turns Ready (monotonic time), by "namespace/name".
        self._ready_at: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        self._controller: asyncio.Task | None = None
        self._closing = asyncio.Event()
        self._loaded = False
        self._seed = seed

    # Life cycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def __aenter__(self) -> KubeApiEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on 127.0.0.1 (the same port again after `stop`) and run the controller."""
        if not self._loaded:
            self._load()
            self._loaded = True
        self._closing = asyncio.Event()
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = self._runner.addresses[0][1]
        if self._controller is None:
            self._controller = asyncio.create_task(self._control_loop())

    async def stop(self) -> None:
        """Stop listening and end open watches, so new connections are refused. The state stays."""
        if self._runner is not None:
            self._closing.set()
            for queue in list(self._watchers):
                queue.put_nowait(None)
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        await self.stop()
        if self._controller is not None:
            self._controller.cancel()
            try:
                await self._controller
            except asyncio.CancelledError:
                pass
            self._controller = None

    def write_kubeconfig(self, path: Path, context: str = CONTEXT_NAME) -> Path:
        """Write a kubeconfig for this server with the token, readable by its owner only."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": "default"}}],
            "current-context": context,
            "preferences": {},
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        os.replace(partial, path)
        return path

    # Test helpers -----------------------------------------------------------

    def fail(
        self,
        path: str,
        status: int | None = 500,
        count: int = 1,
        delay: float = 0.0,
        method: str | None = None,
        message: str | None = None,
    ) -> None:
        """Make the next `count` requests whose path contains `path` get `status` after `delay` seconds.

        With status None the request is only delayed and then served.
        """
        self.faults.append(Fault(path, status, count, delay, method.upper() if method else None, message))

    def get(self, key: str, namespace: str, name: str) -> dict | None:
        found = self.objects[key].get((namespace, name))
        return copy.deepcopy(found) if found else None

    def list(self, key: str, namespace: str = "default") -> list[dict]:
        return [copy.deepcopy(obj) for (ns, _), obj in sorted(self.objects[key].items()) if ns == namespace]

    def pods_of(self, deployment: str, namespace: str = "default") -> list[dict]:
        return [pod for pod in self.list("pods", namespace) if _pod_owner(pod) == deployment]

    # Requests ---------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(
            {"method": request.method, "path": request.path, "query": dict(request.query),
             "content_type": request.headers.get("Content-Type", "")}
        )
        fault = self._take_fault(request)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None:
                return self._fault_response(request, fault)
        auth = request.headers.get("Authorization", "")
        if not secrets.compare_digest(auth.encode(), f"Bearer {self.token}".encode()):
            return status_response(401, "Unauthorized")
        try:
            return await handler(request)
        except ApiError as error:
            logger.info("%s %s -> %d %s: %s", request.method, request.path, error.code, error.reason, error.message)
            return error.response()

    def _take_fault(self, request: web.Request) -> Fault | None:
        for fault in self.faults:
            if fault.path in request.path and (fault.method is None or fault.method == request.method):
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _fault_response(self, request: web.Request, fault: Fault) -> web.Response:
        status = fault.status or 500
        parsed = _parse_path(request.path)
        resource, name = (parsed[0], parsed[2]) if parsed else (None, None)
        details = None
        if resource is not None:
            details = {"kind": resource.plural}
            if resource.group:
                details["group"] = resource.group
            if name:
                details["name"] = name
        if resource is None:
            what = request.path
        elif name:
            what = f'{resource.key} "{name}"'
        else:
            what = resource.key
        namespace = parsed[1] if parsed else "default"
        if fault.message:
            message = fault.message
        elif status == 401:
            return status_response(401, "Unauthorized")
        elif status == 403:
            verb = VERBS.get(request.method, request.method.lower())
            group = resource.group if resource else ""
            plural = resource.plural if resource else request.path
            message = (
                f'{what} is forbidden: User "{SANDBOX_USER}" cannot {verb} resource "{plural}"'
                f' in API group "{group}" in the namespace "{namespace}"'
            )
        elif status == 404:
            message = f"{what} not found"
        elif status == 409:
            message = (
                f"Operation cannot be fulfilled on {what}: the object has been modified;"
                " please apply your changes to the latest version and try again"
            )
        elif status == 422:
            message = f"{resource.kind if resource else 'Object'} \"{name}\" is invalid: spec: Invalid value"
        elif status == 429:
            message = "Too many requests, please try again later."
        elif status == 503:
            message = "the server is currently unable to handle the request"
        elif status == 504:
            message = "the server was unable to return a response in the time allotted"
        else:
            message = "an error on the server (\"internal error\") has prevented the request from succeeding"
        return status_response(status, message, details=details)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        discovery = self._discovery(path)
        if discovery is not None:
            return web.json_response(discovery)
        parsed = _parse_path(path)
        if parsed is None:
            return status_response(404, "the server could not find the requested resource")
        resource, namespace, name, subresource = parsed
        method = request.method
        if name is None:
            if method == "GET":
                if request.query.get("watch", "").lower() in ("true", "1", "t"):
                    return await self._watch(request, resource, namespace)
                return web.json_response(self._list(resource, namespace, request.query.get("labelSelector", "")))
            if method == "POST":
                body = await _read_body(request)
                return web.json_response(self._create(resource, namespace, body, request.query), status=201)
            raise ApiError(405, "the server does not allow this method on the requested resource")
        if subresource == "log" and resource is PODS and method == "GET":
            return self._log(namespace, name, request.query)
        if subresource == "scale" and resource is DEPLOYMENTS:
            if method == "GET":
                return web.json_response(self._scale(namespace, name))
            if method == "PATCH":
                return web.json_response(await self._patch_scale(request, namespace, name))
            raise ApiError(405, "the server does not allow this method on the requested resource")
        if subresource is not None:
            return status_response(404, "the server could not find the requested resource")
        if method == "GET":
            return web.json_response(self._read(resource, namespace, name))
        if method == "PATCH":
            obj, created = await self._patch(request, resource, namespace, name)
            return web.json_response(obj, status=201 if created else 200)
        if method == "DELETE":
            return web.json_response(self._delete(resource, namespace, name))
        raise ApiError(405, "the server does not allow this method on the requested resource")

    def _discovery(self, path: str) -> dict | None:
        if path == "/version":
            return {"major": "1", "minor": "30", "gitVersion": GIT_VERSION, "platform": "linux/amd64"}
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"{HOST}:{self.port}"}],
            }
        groups = sorted({(resource.group, resource.version) for resource in RESOURCES if resource.group})
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": group,
                        "versions": [{"groupVersion": f"{group}/{version}", "version": version}],
                        "preferredVersion": {"groupVersion": f"{group}/{version}", "version": version},
                    }
                    for group, version in groups
                ],
            }
        for group, version in [("", "v1"), *groups]:
            prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
            if path == prefix:
                resources = []
                for resource in RESOURCES:
                    if (resource.group, resource.version) != (group, version):
                        continue
                    resources.append({
                        "name": resource.plural, "singularName": resource.kind.lower(), "namespaced": True,
                        "kind": resource.kind, "shortNames": list(resource.short_names),
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    })
                    if resource is DEPLOYMENTS:
                        resources.append({"name": "deployments/scale", "singularName": "", "namespaced": True,
                                          "group": "autoscaling", "version": "v1", "kind": "Scale",
                                          "verbs": ["get", "patch", "update"]})
                    if resource is PODS:
                        resources.append({"name": "pods/log", "singularName": "", "namespaced": True,
                                          "kind": "Pod", "verbs": ["get"]})
                return {"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": f"{group}/{version}" if group else version, "resources": resources}
            if path == f"/apis/{group}" and group:
                return {"kind": "APIGroup", "apiVersion": "v1", "name": group,
                        "versions": [{"groupVersion": f"{group}/{version}", "version": version}],
                        "preferredVersion": {"groupVersion": f"{group}/{version}", "version": version}}
        return None

    # Verbs ------------------------------------------------------------------

    def _read(self, resource: ResourceType, namespace: str, name: str) -> dict:
        obj = self.objects[resource.key].get((namespace, name))
        if obj is None:
            raise _not_found(resource, name)
        return obj

    def _list(self, resource: ResourceType, namespace: str, selector: str) -> dict:
        terms = parse_selector(selector)
        items = []
        for (ns, _), obj in sorted(self.objects[resource.key].items()):
            if ns == namespace and selector_matches(terms, obj["metadata"].get("labels") or {}):
                items.append({key: value for key, value in obj.items() if key not in ("kind", "apiVersion")})
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self.resource_version)},
            "items": items,
        }

    def _create(self, resource: ResourceType, namespace: str, body: Any, query: Any, manager: str | None = None) -> dict:
        body = self._check_body(resource, namespace, body, None)
        name = body["metadata"]["name"]
        if (namespace, name) in self.objects[resource.key]:
            raise ApiError(409, f'{resource.key} "{name}" already exists', "AlreadyExists", _details(resource, name))
        manager = manager or query.get("fieldManager") or "kubectl-create"
        obj = self._new_object(resource, namespace, body)
        self.managers[_object_id(resource, namespace, name)] = {manager: _config_of(body)}
        self._store(resource, obj, "ADDED")
        return obj

    async def _patch(self, request: web.Request, resource: ResourceType, namespace: str, name: str) -> tuple[dict, bool]:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        raw = await request.read()
        current = self.objects[resource.key].get((namespace, name))
        if content_type == "application/apply-patch+yaml":
            try:
                body = yaml.safe_load(raw.decode("utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                raise ApiError(400, f"error decoding YAML: {error}") from None
            manager = request.query.get("fieldManager")
            if not manager:
                raise ApiError(422, "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value:"
                               " is required for apply patch", "Invalid")
            force = request.query.get("force", "").lower() in ("true", "1", "t")
            return self._apply(resource, namespace, name, body, manager, force, current)
        if current is None:
            raise _not_found(resource, name)
        try:
            patch = json.loads(raw or b"{}")
        except ValueError as error:
            raise ApiError(400, f"error decoding patch: {error}") from None
        if content_type == "application/strategic-merge-patch+json":
            merged = strategic_merge(current, patch)
        elif content_type == "application/merge-patch+json":
            merged = merge_patch(current, patch)
        else:
            raise ApiError(415, "the body of the request was in an unknown format - accepted media types include: "
                           "application/json-patch+json, application/merge-patch+json, "
                           "application/apply-patch+yaml, application/strategic-merge-patch+json")
        manager = request.query.get("fieldManager") or "kubectl-patch"
        owned = self.managers.setdefault(_object_id(resource, namespace, name), {})
        owned[manager] = strategic_merge(owned.get(manager, {}), _config_of(patch))
        return self._replace(resource, current, merged), False

    def _apply(
        self, resource: ResourceType, namespace: str, name: str, body: Any, manager: str, force: bool,
        current: dict | None,
    ) -> tuple[dict, bool]:
        body = self._check_body(resource, namespace, body, name)
        config = _config_of(body)
        object_id = _object_id(resource, namespace, name)
        owned = self.managers.setdefault(object_id, {})
        if current is None:
            owned.clear()
            owned[manager] = config
            obj = self._new_object(resource, namespace, body)
            self._store(resource, obj, "ADDED")
            return obj, True
        if not force:
            conflicts = []
            for other, other_config in owned.items():
                if other != manager:
                    conflicts += [(other, path) for path in leaf_conflicts(config, other_config, current)]
            if conflicts:
                listed = "\n".join(f'- conflict with "{other}": {path}' for other, path in conflicts)
                raise ApiError(
                    409, f"Apply failed with {len(conflicts)} conflict{'s' if len(conflicts) > 1 else ''}:\n{listed}",
                    "Conflict", _details(resource, name),
                )
        base = remove_unowned(_config_of(current, keep_status=True), owned.get(manager), config)
        merged = strategic_merge(base, config)
        if force:
            for other in list(owned):
                if other != manager:
                    owned[other] = remove_unowned(owned[other], config, {})
        owned[manager] = config
        return self._replace(resource, current, merged), False

    def _replace(self, resource: ResourceType, current: dict, merged: dict) -> dict:
        merged = copy.deepcopy(merged)
        name = current["metadata"]["name"]
        merged["kind"], merged["apiVersion"] = resource.kind, resource.api_version
        metadata = merged.setdefault("metadata", {})
        for field in SERVER_METADATA + ("name", "namespace"):
            if field in current["metadata"]:
                metadata[field] = current["metadata"][field]
        self._validate(resource, merged, name)
        merged = self._defaults(resource, merged)
        if "status" in current:
            merged["status"] = current["status"]
        if merged == current:
            return current
        if merged.get("spec") != current.get("spec") and "generation" in metadata:
            metadata["generation"] = int(metadata["generation"]) + 1
        self._store(resource, merged, "MODIFIED")
        return merged

    def _delete(self, resource: ResourceType, namespace: str, name: str) -> dict:
        obj = self.objects[resource.key].pop((namespace, name), None)
        if obj is None:
            raise _not_found(resource, name)
        self.managers.pop(_object_id(resource, namespace, name), None)
        self._ready_at.pop(f"{namespace}/{name}", None)
        self._bump(obj)
        self._emit(resource, "DELETED", obj)
        if resource is DEPLOYMENTS:
            # Background propagation: the garbage collector deletes the pods.
            for pod in self.pods_of(name, namespace):
                self._delete(PODS, namespace, pod["metadata"]["name"])
        self._save()
        if resource is PODS:
            return obj
        details = {"name": name, "kind": resource.plural, "uid": obj["metadata"]["uid"]}
        if resource.group:
            details["group"] = resource.group
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def _scale(self, namespace: str, name: str) -> dict:
        deployment = self._read(DEPLOYMENTS, namespace, name)
        metadata = deployment["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {key: metadata[key] for key in ("name", "namespace", "uid", "resourceVersion",
                                                         "creationTimestamp")},
            "spec": {"replicas": deployment["spec"].get("replicas", 1)},
            "status": {
                "replicas": deployment.get("status", {}).get("replicas", 0),
                "selector": ",".join(f"{key}={value}" for key, value in
                                     sorted(deployment["spec"]["selector"].get("matchLabels", {}).items())),
            },
        }

    async def _patch_scale(self, request: web.Request, namespace: str, name: str) -> dict:
        deployment = self._read(DEPLOYMENTS, namespace, name)
        try:
            patch = json.loads(await request.read() or b"{}")
        except ValueError as error:
            raise ApiError(400, f"error decoding patch: {error}") from None
        replicas = (patch.get("spec") or {}).get("replicas") if isinstance(patch, dict) else None
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError(422, f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                           f'{json.dumps(replicas)}: must be greater than or equal to 0', "Invalid",
                           _details(DEPLOYMENTS, name, "Scale", "autoscaling"))
        updated = copy.deepcopy(deployment)
        updated["spec"]["replicas"] = replicas
        self._replace(DEPLOYMENTS, deployment, updated)
        return self._scale(namespace, name)

    def _log(self, namespace: str, name: str, query: Any) -> web.Response:
        pod = self._read(PODS, namespace, name)
        containers = [container["name"] for container in pod["spec"].get("containers", [])]
        container = query.get("container") or (containers[0] if len(containers) == 1 else None)
        if container is None:
            raise ApiError(400, f"a container name must be specified for pod {name}, choose one of: {containers}")
        if container not in containers:
            raise ApiError(400, f"container {container} is not valid for pod {name}")
        if not _pod_ready(pod):
            raise ApiError(400, f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
        image = next(c["image"] for c in pod["spec"]["containers"] if c["name"] == container)
        started = pod["status"].get("startTime", now_text())
        lines = [
            f'{started} INFO starting {container} image={image} pod={name}',
            f"{started} INFO connected to database",
            f"{started} INFO listening on :8080",
        ]
        lines += [f"{started} INFO GET /v2/health 200 {index + 1}ms" for index in range(4)]
        tail = query.get("tailLines")
        if tail is not None and tail.lstrip("-").isdigit() and int(tail) >= 0:
            lines = lines[len(lines) - int(tail):] if int(tail) else []
        return web.Response(text="".join(line + "\n" for line in lines), content_type="text/plain")

    async def _watch(self, request: web.Request, resource: ResourceType, namespace: str) -> web.StreamResponse:
        terms = parse_selector(request.query.get("labelSelector", ""))
        since = request.query.get("resourceVersion")
        timeout = request.query.get("timeoutSeconds")
        queue: asyncio.Queue = asyncio.Queue()
        self._watchers.add(queue)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            initial: list[tuple[str, dict]] = []
            if since and since != "0":
                if not since.isdigit():
                    raise ApiError(400, f'invalid resource version: "{since}"')
                if self._events and int(since) < self._events[0][0] - 1:
                    initial = [("ERROR", status_body(410, f"too old resource version: {since} "
                                                          f"({self._events[0][0]})", "Expired"))]
                else:
                    initial = [(kind, obj) for version, key, ns, kind, obj in self._events
                               if version > int(since) and key == resource.key and ns == namespace]
            else:
                initial = [("ADDED", obj) for (ns, _), obj in sorted(self.objects[resource.key].items())
                           if ns == namespace]
            response.enable_chunked_encoding()
            await response.prepare(request)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + float(timeout) if timeout else None

            async def send(kind: str, obj: dict) -> None:
                if kind != "ERROR" and not selector_matches(terms, obj["metadata"].get("labels") or {}):
                    return
                await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

            for kind, obj in initial:
                await send(kind, obj)
            while not self._closing.is_set():
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if event is None:
                    break
                key, ns, kind, obj = event
                if key == resource.key and ns == namespace:
                    await send(kind, obj)
            await response.write_eof()
            return response
        except ConnectionResetError:
            # The client closed the watch.
            return response
        finally:
            self._watchers.discard(queue)

    # Objects ----------------------------------------------------------------

    def _check_body(self, resource: ResourceType, namespace: str, body: Any, name: str | None) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the body of the request must be an object")
        if body.get("kind") and body.get("kind") != resource.kind or (
            body.get("apiVersion") and body.get("apiVersion") != resource.api_version
        ):
            raise ApiError(400, f"the API version in the data ({body.get('apiVersion')}) and kind "
                           f"({body.get('kind')}) do not match the request ({resource.api_version}, {resource.kind})")
        metadata = body.get("metadata")
        if not isinstance(metadata, dict):
            raise ApiError(422, f'{resource.kind}.{resource.group or "core"} "" is invalid: metadata.name: '
                           "Required value: name or generateName is required", "Invalid")
        if metadata.get("namespace") and metadata["namespace"] != namespace:
            raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the request")
        body_name = metadata.get("name")
        if name is not None and body_name != name:
            raise ApiError(400, "the name of the object "
                           f"({body_name}) does not match the name on the URL ({name})")
        self._validate(resource, body, body_name)
        return body

    def _validate(self, resource: ResourceType, body: dict, name: Any) -> None:
        causes: list[tuple[str, str]] = []
        if not isinstance(name, str) or not name:
            causes.append(("metadata.name", "Required value: name or generateName is required"))
        elif len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
            causes.append(("metadata.name", f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist '
                           "of lower case alphanumeric characters, '-' or '.', and must start and end with an "
                           "alphanumeric character"))
        if resource is DEPLOYMENTS:
            spec = body.get("spec") or {}
            selector = (spec.get("selector") or {}).get("matchLabels")
            template = spec.get("template") or {}
            labels = (template.get("metadata") or {}).get("labels") or {}
            containers = (template.get("spec") or {}).get("containers") or []
            if not selector:
                causes.append(("spec.selector", "Required value"))
            elif any(labels.get(key) != value for key, value in selector.items()):
                causes.append(("spec.template.metadata.labels", f"Invalid value: {json.dumps(labels)}: "
                               "`selector` does not match template `labels`"))
            if not containers:
                causes.append(("spec.template.spec.containers", "Required value"))
            for index, container in enumerate(containers):
                if not isinstance(container, dict) or not container.get("name"):
                    causes.append((f"spec.template.spec.containers[{index}].name", "Required value"))
                elif not container.get("image"):
                    causes.append((f"spec.template.spec.containers[{index}].image", "Required value"))
            replicas = spec.get("replicas", 1)
            if not isinstance(replicas, int) or replicas < 0:
                causes.append(("spec.replicas", f"Invalid value: {json.dumps(replicas)}: must be greater than or "
                               "equal to 0"))
        if causes:
            group = resource.group or ""
            text = ", ".join(f"{field}: {message}" for field, message in causes)
            details = _details(resource, name if isinstance(name, str) else "", resource.kind, group)
            details["causes"] = [{"reason": "FieldValueInvalid", "message": message, "field": field}
                                 for field, message in causes]
            qualified = f"{resource.kind}.{group}" if group else resource.kind
            listed = f"[{text}]" if len(causes) > 1 else text
            raise ApiError(422, f'{qualified} "{name}" is invalid: {listed}', "Invalid", details)

    def _new_object(self, resource: ResourceType, namespace: str, body: dict) -> dict:
        obj = copy.deepcopy(body)
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        metadata = obj.setdefault("metadata", {})
        for field in SERVER_METADATA:
            metadata.pop(field, None)
        metadata["namespace"] = namespace
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = now_text()
        if resource is DEPLOYMENTS:
            metadata["generation"] = 1
            obj["status"] = {}
        else:
            obj.pop("status", None)
        obj = self._defaults(resource, obj)
        if resource.key == "services":
            obj["spec"].setdefault("clusterIP", f"10.96.{random.randint(0, 255)}.{random.randint(1, 254)}")
            obj["spec"].setdefault("clusterIPs", [obj["spec"]["clusterIP"]])
            obj["status"] = {"loadBalancer": {}}
        if resource.key == "ingresses.networking.k8s.io":
            obj["status"] = {"loadBalancer": {}}
        return obj

    def _defaults(self, resource: ResourceType, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        if resource is DEPLOYMENTS:
            spec = obj.setdefault("spec", {})
            spec.setdefault("replicas", 1)
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("progressDeadlineSeconds", 600)
            spec.setdefault("strategy", {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
            template_spec = spec.setdefault("template", {}).setdefault("spec", {})
            spec["template"].setdefault("metadata", {})
            template_spec.setdefault("restartPolicy", "Always")
            template_spec.setdefault("terminationGracePeriodSeconds", 30)
            template_spec.setdefault("dnsPolicy", "ClusterFirst")
            template_spec.setdefault("schedulerName", "default-scheduler")
            template_spec.setdefault("securityContext", {})
            for container in template_spec.get("containers", []):
                container.setdefault("imagePullPolicy", "IfNotPresent")
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
                container.setdefault("resources", {})
        if resource.key == "services":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            for port in spec.get("ports", []):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        return obj

    def _store(self, resource: ResourceType, obj: dict, kind: str) -> None:
        metadata = obj["metadata"]
        self._bump(obj)
        metadata["managedFields"] = [
            {"manager": manager, "operation": "Apply", "apiVersion": resource.api_version, "time": now_text(),
             "fieldsType": "FieldsV1", "fieldsV1": {}}
            for manager in sorted(self.managers.get(_object_id(resource, metadata["namespace"], metadata["name"]), {}))
        ]
        self.objects[resource.key][(metadata["namespace"], metadata["name"])] = obj
        self._emit(resource, kind, obj)
        if resource is DEPLOYMENTS:
            self._reconcile_deployment(obj)
        self._save()

    def _bump(self, obj: dict) -> None:
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)

    def _emit(self, resource: ResourceType, kind: str, obj: dict) -> None:
        snapshot = copy.deepcopy(obj)
        namespace = obj["metadata"]["namespace"]
        self._events.append((self.resource_version, resource.key, namespace, kind, snapshot))
        del self._events[:-EVENT_LOG_SIZE]
        for queue in list(self._watchers):
            queue.put_nowait((resource.key, namespace, kind, snapshot))

    # Controller -------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            try:
                self._reconcile_all()
            except Exception:  # noqa: BLE001 - the controller must keep running
                logger.exception("controller step failed")
            await asyncio.sleep(CONTROLLER_TICK_SECONDS)

    def _reconcile_all(self) -> None:
        for pod in list(self.objects["pods"].values()):
            self._progress_pod(pod)
        for deployment in list(self.objects["deployments.apps"].values()):
            self._reconcile_deployment(deployment)

    def _progress_pod(self, pod: dict) -> None:
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        ready_at = self._ready_at.get(key)
        if ready_at is None or asyncio.get_running_loop().time() < ready_at:
            return
        self._ready_at.pop(key)
        updated = copy.deepcopy(pod)
        started = now_text()
        stuck = [c for c in updated["spec"]["containers"] if c.get("image") in self.unready_images]
        statuses = []
        for container in updated["spec"]["containers"]:
            if container in stuck:
                statuses.append(_container_status(container, waiting=(
                    "ImagePullBackOff", f'Back-off pulling image "{container["image"]}"')))
            else:
                statuses.append(_container_status(container, started=started))
        ready = not stuck
        if stuck:
            # The kubelet retries the pull, so the pod starts once the image is fixed.
            self._ready_at[key] = asyncio.get_running_loop().time() + self.ready_delay
            if pod["status"].get("containerStatuses") == statuses:
                return
        status = updated["status"]
        status["phase"] = "Running" if ready else "Pending"
        status["containerStatuses"] = statuses
        status["conditions"] = _pod_conditions(ready, started)
        if ready:
            status["startTime"] = status.get("startTime") or started
        self._store(PODS, updated, "MODIFIED")

    def _reconcile_deployment(self, deployment: dict) -> None:
        metadata = deployment["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        if (namespace, name) not in self.objects["deployments.apps"]:
            return
        spec = deployment["spec"]
        replicas = spec.get("replicas", 1)
        current_hash = template_hash(spec["template"])
        pods = [pod for pod in self.pods_of(name, namespace)]
        new = [pod for pod in pods if pod["metadata"]["labels"].get("pod-template-hash") == current_hash]
        old = [pod for pod in pods if pod not in new]

        # The new ReplicaSet scales to spec.replicas, and the old pods go once the new ones are Ready.
        for _ in range(replicas - len(new)):
            new.append(self._create_pod(deployment, current_hash))
        if len(new) > replicas:
            surplus = sorted(new, key=lambda pod: (_pod_ready(pod), pod["metadata"]["creationTimestamp"]))
            for pod in surplus[: len(new) - replicas]:
                self._delete(PODS, namespace, pod["metadata"]["name"])
                new.remove(pod)
        ready_new = [pod for pod in new if _pod_ready(pod)]
        if old and len(ready_new) >= replicas:
            for pod in old:
                self._delete(PODS, namespace, pod["metadata"]["name"])
            old = []

        ready = [pod for pod in new + old if _pod_ready(pod)]
        complete = len(ready_new) >= replicas and not old
        status: dict[str, Any] = {"observedGeneration": metadata.get("generation", 1)}
        for field, count in (("replicas", len(new) + len(old)), ("updatedReplicas", len(new)),
                             ("readyReplicas", len(ready)), ("availableReplicas", len(ready))):
            if count:
                status[field] = count
        if len(new) + len(old) - len(ready):
            status["unavailableReplicas"] = len(new) + len(old) - len(ready)

        previous = deployment.get("status") or {}
        previous_conditions = {c["type"]: c for c in previous.get("conditions", [])}
        conditions = [
            ("Available", "True" if len(ready) >= replicas else "False",
             "MinimumReplicasAvailable" if len(ready) >= replicas else "MinimumReplicasUnavailable",
             "Deployment has minimum availability." if len(ready) >= replicas
             else "Deployment does not have minimum availability."),
            ("Progressing", "True", "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
             f'ReplicaSet "{name}-{current_hash}" has successfully progressed.' if complete
             else f'ReplicaSet "{name}-{current_hash}" is progressing.'),
        ]
        status["conditions"] = []
        for kind, value, reason, message in conditions:
            before = previous_conditions.get(kind, {})
            changed = (before.get("status"), before.get("reason")) != (value, reason)
            status["conditions"].append({
                "type": kind, "status": value, "reason": reason, "message": message,
                "lastUpdateTime": now_text() if changed else before.get("lastUpdateTime", now_text()),
                "lastTransitionTime": now_text() if before.get("status") != value
                else before.get("lastTransitionTime", now_text()),
            })
        if status != previous:
            updated = copy.deepcopy(self.objects["deployments.apps"][(namespace, name)])
            updated["status"] = status
            self._bump(updated)
            self.objects["deployments.apps"][(namespace, name)] = updated
            self._emit(DEPLOYMENTS, "MODIFIED", updated)
            self._save()

    def _create_pod(self, deployment: dict, pod_hash: str) -> dict:
        metadata = deployment["metadata"]
        template = deployment["spec"]["template"]
        namespace, deployment_name = metadata["namespace"], metadata["name"]
        replica_set = f"{deployment_name}-{pod_hash}"
        name = f"{replica_set}-{random_suffix()}"
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels["pod-template-hash"] = pod_hash
        containers = copy.deepcopy(template["spec"]["containers"])
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "generateName": f"{replica_set}-",
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now_text(),
                "labels": labels,
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set,
                    "uid": str(uuid.uuid5(uuid.UUID(metadata["uid"]), pod_hash)),
                    "controller": True, "blockOwnerDeletion": True,
                }],
            },
            "spec": {**copy.deepcopy(template["spec"]), "containers": containers, "nodeName": "sandbox-node"},
            "status": {
                "phase": "Pending",
                "hostIP": "10.0.0.10",
                "podIP": f"10.244.0.{random.randint(2, 254)}",
                "qosClass": "Burstable",
                "conditions": _pod_conditions(False, now_text()),
                "containerStatuses": [_container_status(c, waiting=("ContainerCreating", None)) for c in containers],
            },
        }
        self._ready_at[f"{namespace}/{name}"] = asyncio.get_running_loop().time() + self.ready_delay
        self._store(PODS, pod, "ADDED")
        return pod

    # State ------------------------------------------------------------------

    def _load(self) -> None:
        if self.state_file is not None and self.state_file.is_file():
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            self.resource_version = int(data.get("resourceVersion", self.resource_version))
            for key, items in data.get("objects", {}).items():
                if key in self.objects:
                    for obj in items:
                        self.objects[key][(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
            self.managers = data.get("managers", {})
            loop_time = asyncio.get_running_loop().time()
            for pod in self.objects["pods"].values():
                if not _pod_ready(pod):
                    self._ready_at[f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"] = (
                        loop_time + self.ready_delay)
            return
        if self._seed:
            self._create(DEPLOYMENTS, "default", green_deployment(), {}, manager="kubectl-client-side-apply")

    def _save(self) -> None:
        if self.state_file is None:
            return
        data = {
            "resourceVersion": self.resource_version,
            "objects": {key: [obj for _, obj in sorted(items.items())] for key, items in self.objects.items()},
            "managers": self.managers,
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_name(self.state_file.name + ".tmp")
        partial.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, self.state_file)


def green_deployment() -> dict:
    """Return the Green (v1) Deployment `api`, which the emulator starts with and which serves traffic before v2."""
    labels = {"app": "api", "version": "v1"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "default", "labels": dict(labels)},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"containers": [{"name": "api", "image": "api:v1",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]},
            },
        },
    }


def _parse_path(path: str) -> tuple[ResourceType, str, str | None, str | None] | None:
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if len(rest) < 3 or rest[0] != "namespaces" or len(rest) > 5:
        return None
    resource = BY_PATH.get((group, version, rest[2]))
    if resource is None:
        return None
    name = rest[3] if len(rest) > 3 else None
    subresource = rest[4] if len(rest) > 4 else None
    return resource, rest[1], name, subresource


async def _read_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except ValueError:
        try:
            return yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ApiError(400, f"error decoding the request body: {error}") from None


def _not_found(resource: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{resource.key} "{name}" not found', "NotFound", _details(resource, name))


def _details(resource: ResourceType, name: str, kind: str | None = None, group: str | None = None) -> dict:
    details = {"name": name, "kind": kind or resource.plural}
    if group if group is not None else resource.group:
        details["group"] = group if group is not None else resource.group
    return details


def _object_id(resource: ResourceType, namespace: str, name: str) -> str:
    return f"{resource.key}/{namespace}/{name}"


def _config_of(obj: dict, keep_status: bool = False) -> dict:
    """Return what a client sets in an object: without server metadata and, unless asked, status."""
    config = copy.deepcopy(obj)
    if not keep_status:
        config.pop("status", None)
    metadata = config.get("metadata")
    if isinstance(metadata, dict):
        for field in SERVER_METADATA:
            metadata.pop(field, None)
    return config


def _pod_owner(pod: dict) -> str | None:
    references = pod["metadata"].get("ownerReferences") or []
    if not references or references[0].get("kind") != "ReplicaSet":
        return None
    return references[0]["name"].rsplit("-", 1)[0]


def _pod_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in pod.get("status", {}).get("conditions", []))


def _pod_conditions(ready: bool, when: str) -> list[dict]:
    value = "True" if ready else "False"
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": when},
        {"type": "Initialized", "status": "True", "lastTransitionTime": when},
        {"type": "ContainersReady", "status": value, "lastTransitionTime": when},
        {"type": "Ready", "status": value, "lastTransitionTime": when},
    ]
    if not ready:
        for condition in conditions[2:]:
            condition["reason"] = "ContainersNotReady"
    return conditions


def _container_status(container: dict, started: str | None = None,
                      waiting: tuple[str, str | None] | None = None) -> dict:
    status: dict[str, Any] = {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 0,
    }
    if waiting is not None:
        reason, message = waiting
        status["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        return status
    digest = hashlib.sha256(container["image"].encode()).hexdigest()
    status.update(
        imageID=f"docker.io/library/{container['image'].split(':')[0]}@sha256:{digest}",
        containerID=f"containerd://{secrets.token_hex(32)}",
        ready=True,
        started=True,
        state={"running": {"startedAt": started}},
    )
    return status


# Command line ------------------------------------------------------------------


def _read_or_create_token(path: Path) -> str:
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT."""
    token = _read_or_create_token(args.token_file)
    emulator = KubeApiEmulator(token=token, port=args.port, state_file=args.state, ready_delay=args.ready_delay)
    await emulator.start()
    try:
        if args.kubeconfig is not None:
            emulator.write_kubeconfig(args.kubeconfig)
        if args.port_file is not None:
            partial = args.port_file.with_name(args.port_file.name + ".tmp")
            partial.write_text(f"{emulator.port}\n", encoding="utf-8")
            os.replace(partial, args.port_file)
        logger.info("Kubernetes API emulator listening on %s (pid %d)", emulator.url, os.getpid())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("Kubernetes API emulator stopping (pid %d)", os.getpid())
    finally:
        await emulator.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.sandbox.kube_api", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1; 0 picks a free port")
    parser.add_argument("--state", type=Path, required=True, help="JSON file the cluster state is kept in")
    parser.add_argument("--token-file", type=Path, required=True,
                        help="file with the bearer token clients must send; created with a new token if missing")
    parser.add_argument("--kubeconfig", type=Path, help=f"write a kubeconfig (context {CONTEXT_NAME}) to this file")
    parser.add_argument("--port-file", type=Path, help="file that receives the bound port once listening")
    parser.add_argument("--ready-delay", type=float, default=DEFAULT_READY_DELAY_SECONDS,
                        help="seconds before a new pod is Running and Ready")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        asyncio.run(serve(args))
    except OSError as error:
        logger.error("Kubernetes API emulator failed to listen on %s:%d: %s", HOST, args.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
