"""One local server that emulates the Cloudflare, Datadog and Sentry APIs the cdn, datadog and sentry steps call.

Each service is served under its own path prefix, so a client is pointed at it
by its base URL alone:

    Cloudflare  http://127.0.0.1:PORT/cloudflare/client/v4   (CloudflareSettings.api_url)
    Datadog     http://127.0.0.1:PORT/datadog                (DatadogSettings.api_url, the client's host)
    Sentry      http://127.0.0.1:PORT/sentry/api/0           (SentrySettings.api_url)

The request paths, JSON field names, status codes and error bodies follow
the public API references. For Cloudflare that is API v4: the Rulesets API
and the zone's `http_request_cache_settings` phase. For Datadog it is API v1
(dashboards, monitors, metrics query), as the datadog-api-client 2.62 models
read it. For Sentry it is API 0: organization releases and deploys. Only the operations the steps use
are emulated.

Tests run it in-process:

    async with SaasEmulator() as saas:
        saas.cloudflare_url, saas.datadog_url, saas.sentry_url
        saas.credentials              # tokens and keys the emulator accepts
        saas.cloudflare.rules()       # state, also saas.datadog.dashboards ...
        saas.inject("/sentry/", status=503)   # the next matching request fails
        await saas.stop(); await saas.start()  # refused connections in between

The sandbox runs it as a process:

    python -m bot.sandbox.saas --port N --state FILE --credentials FILE

A credentials file that does not exist is created with new random
credentials (mode 0600). With --state, the state is read at start and written
after every change. The process prints one JSON line with the bound port when
it listens. The control endpoints under /_emulator/ (state, faults, reset,
Datadog series) let another process drive it; like the APIs, they are served
on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
CLOUDFLARE_PREFIX = "/cloudflare/client/v4"
DATADOG_PREFIX = "/datadog"
SENTRY_PREFIX = "/sentry/api/0"
# Metric points older than this are dropped.
SERIES_RETENTION_SECONDS = 3600
CONTROL_PREFIX = "/_emulator"
CACHE_PHASE = "http_request_cache_settings"

# Width of one pointlist bucket of a Datadog metrics query, in seconds.
QUERY_INTERVAL_SECONDS = 10


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime | None = None) -> str:
    return (moment or _now()).isoformat().replace("+00:00", "Z")


def _hex_id() -> str:
    return secrets.token_hex(16)


def new_credentials() -> dict[str, dict[str, str]]:
    """Return random credentials and object names for the three services."""
    return {
        "cloudflare": {"token": secrets.token_urlsafe(30), "zone_id": _hex_id()},
        "datadog": {"api_key": secrets.token_hex(16), "app_key": secrets.token_hex(20)},
        "sentry": {"token": "sntrys_" + secrets.token_urlsafe(30), "organization": "example-org", "project": "api"},
    }


def load_credentials(path: Path) -> dict[str, dict[str, str]]:
    """Read the credentials file, creating it with new credentials (mode 0600) when it does not exist."""
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        defaults = new_credentials()
        for service, values in defaults.items():
            data.setdefault(service, values)
        return data
    data = new_credentials()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    return data


@dataclass
class Fault:
    """A failure the next matching requests get instead of, or before, the normal response."""

    path: str
    method: str | None = None
    status: int | None = None
    body: Any = None
    delay_seconds: float = 0.0
    times: int = 1

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return path.startswith(self.path)


def _json(data: Any, status: int = 200) -> web.Response:
    from aiohttp import web

    return web.json_response(data, status=status)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def _read_json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        return None


# --- Cloudflare ---------------------------------------------------------------


class CloudflareService:
    """Zone rulesets of Cloudflare API v4, as the Rulesets API serves them."""

    def __init__(self, owner: SaasEmulator) -> None:
        self.owner = owner
        # zone id -> ruleset id -> ruleset
        self.rulesets: dict[str, dict[str, dict[str, Any]]] = {}

    @property
    def zone_id(self) -> str:
        return self.owner.credentials["cloudflare"]["zone_id"]

    def entrypoint(self, phase: str = CACHE_PHASE, zone_id: str | None = None) -> dict[str, Any] | None:
        for ruleset in self.rulesets.get(zone_id or self.zone_id, {}).values():
            if ruleset["phase"] == phase and ruleset["kind"] == "zone":
                return ruleset
        return None

    def rules(self, phase: str = CACHE_PHASE) -> list[dict[str, Any]]:
        """Return the rules of the zone's entry point ruleset of a phase, empty when it has none."""
        ruleset = self.entrypoint(phase)
        return copy.deepcopy(ruleset["rules"]) if ruleset else []

    # NOTE: the status codes and messages follow Cloudflare's documented errors, but
    # the numeric codes other than 10000, 10003 and 7003 are placeholders.
    @staticmethod
    def envelope(result: Any, status: int = 200) -> web.Response:
        return _json({"success": True, "errors": [], "messages": [], "result": result}, status)

    @staticmethod
    def error(status: int, code: int, message: str) -> web.Response:
        body = {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None}
        return _json(body, status)

    @staticmethod
    def default_error_body(status: int) -> dict[str, Any]:
        messages = {401: (10000, "Authentication error"), 403: (10000, "Authentication error"),
                    404: (7003, "Could not route to the requested object"), 409: (10009, "conflict"),
                    429: (971, "Please wait and consider throttling your request speed")}
        code, message = messages.get(status, (10001, "Internal server error"))
        return {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None}

    def routes(self, app: web.Application) -> None:
        base = CLOUDFLARE_PREFIX + "/zones/{zone_id}/rulesets"
        app.router.add_get(base, self.list_rulesets)
        app.router.add_get(base + "/phases/{phase}/entrypoint", self.get_entrypoint)
        app.router.add_put(base + "/phases/{phase}/entrypoint", self.put_entrypoint)
        app.router.add_get(base + "/{ruleset_id}", self.get_ruleset)
        app.router.add_post(base + "/{ruleset_id}/rules", self.add_rule)
        app.router.add_patch(base + "/{ruleset_id}/rules/{rule_id}", self.update_rule)
        app.router.add_delete(base + "/{ruleset_id}/rules/{rule_id}", self.delete_rule)

    def _check(self, request: web.Request) -> web.Response | None:
        token = _bearer(request)
        if token is None:
            # Cloudflare API v4 rejects a request without credentials with 400 and codes 9106/9107,
            # but the steps always send a token, so the emulator returns its invalid-token error.
            return self.error(401, 10000, "Authentication error")
        if not secrets.compare_digest(token, self.owner.credentials["cloudflare"]["token"]):
            return self.error(401, 10000, "Authentication error")
        if request.match_info["zone_id"] != self.zone_id:
            # A token without access to a zone (or a zone id that does not exist) gets 403.
            return self.error(403, 10000, "Authentication error")
        return None

    def _ruleset(self, request: web.Request) -> dict[str, Any] | None:
        return self.rulesets.get(self.zone_id, {}).get(request.match_info["ruleset_id"])

    async def list_rulesets(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        summaries = []
        for ruleset in self.rulesets.get(self.zone_id, {}).values():
            summaries.append({key: value for key, value in ruleset.items() if key != "rules"})
        return self.envelope(summaries)

    async def get_entrypoint(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        phase = request.match_info["phase"]
        ruleset = self.entrypoint(phase)
        if ruleset is None:
            return self.error(404, 10003, f"could not find entrypoint ruleset in the {phase} phase")
        return self.envelope(ruleset)

    async def put_entrypoint(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        phase = request.match_info["phase"]
        body = await _read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("rules", []), list):
            return self.error(400, 10021, "failed to parse request body: rules must be a list")
        ruleset = self.entrypoint(phase)
        rules = []
        for raw in body.get("rules", []):
            previous = None
            if ruleset is not None and raw.get("id"):
                previous = next((rule for rule in ruleset["rules"] if rule["id"] == raw["id"]), None)
            rule, problem = self._make_rule(raw, previous)
            if problem:
                return self.error(400, 20021, problem)
            rules.append(rule)
        if problem := self._duplicate_ref(rules):
            return self.error(400, 20217, problem)
        if ruleset is None:
            ruleset = {
                "id": _hex_id(),
                "name": body.get("name", "default"),
                "description": body.get("description", ""),
                "kind": "zone",
                "version": "0",
                "phase": phase,
                "rules": [],
                "last_updated": _iso(),
            }
            self.rulesets.setdefault(self.zone_id, {})[ruleset["id"]] = ruleset
        ruleset["rules"] = rules
        self._touch(ruleset)
        return self.envelope(ruleset)

    async def get_ruleset(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        ruleset = self._ruleset(request)
        if ruleset is None:
            return self.error(404, 10006, "could not find ruleset")
        return self.envelope(ruleset)

    async def add_rule(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        ruleset = self._ruleset(request)
        if ruleset is None:
            return self.error(404, 10006, "could not find ruleset")
        body = await _read_json(request)
        if not isinstance(body, dict):
            return self.error(400, 10021, "failed to parse request body")
        rule, problem = self._make_rule(body, None)
        if problem:
            return self.error(400, 20021, problem)
        rules = ruleset["rules"] + [rule]
        if problem := self._duplicate_ref(rules):
            return self.error(400, 20217, problem)
        ruleset["rules"] = rules
        self._touch(ruleset)
        return self.envelope(ruleset)

    async def update_rule(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        ruleset = self._ruleset(request)
        if ruleset is None:
            return self.error(404, 10006, "could not find ruleset")
        index = self._rule_index(ruleset, request.match_info["rule_id"])
        if index is None:
            return self.error(404, 10007, "could not find rule in ruleset")
        body = await _read_json(request)
        if not isinstance(body, dict):
            return self.error(400, 10021, "failed to parse request body")
        previous = ruleset["rules"][index]
        merged = {**previous, **body}
        rule, problem = self._make_rule(merged, previous)
        if problem:
            return self.error(400, 20021, problem)
        rules = list(ruleset["rules"])
        rules[index] = rule
        if problem := self._duplicate_ref(rules):
            return self.error(400, 20217, problem)
        ruleset["rules"] = rules
        self._touch(ruleset)
        return self.envelope(ruleset)

    async def delete_rule(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        ruleset = self._ruleset(request)
        if ruleset is None:
            return self.error(404, 10006, "could not find ruleset")
        index = self._rule_index(ruleset, request.match_info["rule_id"])
        if index is None:
            return self.error(404, 10007, "could not find rule in ruleset")
        ruleset["rules"] = [rule for position, rule in enumerate(ruleset["rules"]) if position != index]
        self._touch(ruleset)
        return self.envelope(ruleset)

    @staticmethod
    def _rule_index(ruleset: dict[str, Any], rule_id: str) -> int | None:
        for index, rule in enumerate(ruleset["rules"]):
            if rule["id"] == rule_id:
                return index
        return None

    @staticmethod
    def _duplicate_ref(rules: list[dict[str, Any]]) -> str | None:
        seen: set[str] = set()
        for rule in rules:
            if rule["ref"] in seen:
                return f"'ref' must be unique within a ruleset: {rule['ref']!r} is used twice"
            seen.add(rule["ref"])
        return None

    @staticmethod
    def _make_rule(raw: dict[str, Any], previous: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
        """Validate a rule as the Rulesets API does for the fields cache rules use."""
        expression = raw.get("expression")
        if not isinstance(expression, str) or not expression.strip():
            return {}, "'expression' is required"
        if expression.count('"') % 2:
            return {}, f"filter parsing error: unterminated string in {expression!r}"
        action = raw.get("action")
        if action != "set_cache_settings":
            return {}, f"'{action}' is not a valid action for the {CACHE_PHASE} phase"
        parameters = raw.get("action_parameters") or {}
        if "cache" in parameters and not isinstance(parameters["cache"], bool):
            return {}, "'action_parameters.cache' must be a boolean"
        edge_ttl = parameters.get("edge_ttl")
        if edge_ttl is not None:
            mode = edge_ttl.get("mode")
            if mode not in ("respect_origin", "bypass_by_default", "override_origin"):
                return {}, f"'action_parameters.edge_ttl.mode' {mode!r} is not valid"
            if mode == "override_origin":
                default = edge_ttl.get("default")
                if not isinstance(default, int) or isinstance(default, bool) or default < 1:
                    return {}, "'action_parameters.edge_ttl.default' must be a positive integer"
        rule_id = previous["id"] if previous else _hex_id()
        version = str(int(previous["version"]) + 1) if previous else "1"
        rule = {
            "id": rule_id,
            "version": version,
            "action": action,
            "action_parameters": parameters,
            "expression": expression,
            "description": raw.get("description", ""),
            "enabled": raw.get("enabled", True),
            "ref": raw.get("ref") or rule_id,
            "last_updated": _iso(),
        }
        return rule, None

    def _touch(self, ruleset: dict[str, Any]) -> None:
        ruleset["version"] = str(int(ruleset["version"]) + 1)
        ruleset["last_updated"] = _iso()
        self.owner.changed()


# --- Datadog ------------------------------------------------------------------


QUERY_PATTERN = re.compile(
    r"^\s*(?P<aggregator>avg|sum|min|max|p50|p75|p90|p95|p99):(?P<metric>[A-Za-z][\w.]*)"
    r"\{(?P<scope>[^}]*)\}(?P<functions>(?:\.\w+\([^)]*\))*)\s*$"
)
MONITOR_QUERY_PATTERN = re.compile(r"^\s*\w+\(last_\d+[mhd]\):.+?(?P<comparator><=|>=|<|>|==)\s*(?P<threshold>-?[\d.]+)\s*$")
MONITOR_TYPES = {"query alert", "metric alert", "service check", "event-v2 alert", "log alert", "composite"}


@dataclass
class Point:
    timestamp: float
    value: float
    tags: tuple[str, ...] = ()


class DatadogService:
    """Dashboards, monitors and metric queries of Datadog API v1."""

    def __init__(self, owner: SaasEmulator) -> None:
        self.owner = owner
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.monitors: dict[int, dict[str, Any]] = {}
        self.series: dict[str, list[Point]] = {}
        self._next_monitor_id = 1000001

    def record(self, metric: str, value: float, timestamp: float | None = None, tags: list[str] | None = None) -> None:
        """Add one point of a metric, which the metrics query endpoint then returns.

        Points older than SERIES_RETENTION_SECONDS are dropped, so a sandbox
        with steady traffic keeps a bounded amount in memory.
        """
        moment = _now().timestamp() if timestamp is None else float(timestamp)
        points = self.series.setdefault(metric, [])
        points.append(Point(moment, float(value), tuple(tags or ())))
        if len(points) % 1000 == 0:
            horizon = moment - SERIES_RETENTION_SECONDS
            points[:] = [point for point in points if point.timestamp >= horizon]

    @staticmethod
    def error(status: int, *messages: str) -> web.Response:
        return _json({"errors": list(messages)}, status)

    @staticmethod
    def default_error_body(status: int) -> dict[str, Any]:
        messages = {401: "Unauthorized", 403: "Forbidden", 404: "Not found", 409: "Conflict",
                    429: "Rate limit exceeded"}
        return {"errors": [messages.get(status, "Internal Server Error")]}

    def routes(self, app: web.Application) -> None:
        base = DATADOG_PREFIX + "/api/v1"
        app.router.add_get(base + "/dashboard", self.list_dashboards)
        app.router.add_post(base + "/dashboard", self.create_dashboard)
        app.router.add_get(base + "/dashboard/{id}", self.get_dashboard)
        app.router.add_put(base + "/dashboard/{id}", self.update_dashboard)
        app.router.add_delete(base + "/dashboard/{id}", self.delete_dashboard)
        app.router.add_get(base + "/monitor", self.list_monitors)
        app.router.add_post(base + "/monitor", self.create_monitor)
        app.router.add_get(base + "/monitor/{id}", self.get_monitor)
        app.router.add_put(base + "/monitor/{id}", self.update_monitor)
        app.router.add_delete(base + "/monitor/{id}", self.delete_monitor)
        app.router.add_get(base + "/query", self.query_metrics)

    def _check(self, request: web.Request) -> web.Response | None:
        keys = self.owner.credentials["datadog"]
        api_key = request.headers.get("DD-API-KEY", "")
        app_key = request.headers.get("DD-APPLICATION-KEY", "")
        # Datadog rejects both a wrong API key and a wrong application key with 403 Forbidden.
        if not api_key or not secrets.compare_digest(api_key, keys["api_key"]):
            return self.error(403, "Forbidden")
        if not app_key or not secrets.compare_digest(app_key, keys["app_key"]):
            return self.error(403, "Forbidden")
        return None

    # Dashboards

    def _dashboard_problem(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Invalid JSON"
        if not isinstance(body.get("title"), str) or not body["title"]:
            return "Dashboard title is required"
        if body.get("layout_type") not in ("ordered", "free"):
            return "layout_type must be one of 'ordered', 'free'"
        if not isinstance(body.get("widgets"), list):
            return "widgets is required"
        for widget in body["widgets"]:
            definition = widget.get("definition") if isinstance(widget, dict) else None
            if not isinstance(definition, dict) or "type" not in definition:
                return "Each widget needs a definition with a type"
            if definition["type"] == "timeseries" and not definition.get("requests"):
                return "A timeseries widget needs at least one request"
        return None

    def _store_dashboard(self, body: dict[str, Any], dashboard_id: str, created_at: str | None) -> dict[str, Any]:
        widgets = []
        for index, widget in enumerate(body["widgets"]):
            widgets.append({**widget, "id": widget.get("id") or 1000 + index})
        dashboard = {
            "id": dashboard_id,
            "title": body["title"],
            "description": body.get("description"),
            "layout_type": body["layout_type"],
            "widgets": widgets,
            "template_variables": body.get("template_variables") or [],
            "notify_list": body.get("notify_list") or [],
            "reflow_type": body.get("reflow_type", "auto") if body["layout_type"] == "ordered" else None,
            "is_read_only": False,
            "url": f"/dashboard/{dashboard_id}/{re.sub(r'[^a-z0-9]+', '-', body['title'].lower()).strip('-')}",
            "author_handle": "postmerge@example.com",
            "author_name": "postmerge",
            "created_at": created_at or _iso(),
            "modified_at": _iso(),
        }
        if dashboard["reflow_type"] is None:
            del dashboard["reflow_type"]
        self.dashboards[dashboard_id] = dashboard
        self.owner.changed()
        return dashboard

    async def list_dashboards(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        summaries = []
        for dashboard in self.dashboards.values():
            summaries.append({key: dashboard[key] for key in (
                "id", "title", "description", "layout_type", "url", "is_read_only",
                "created_at", "modified_at", "author_handle")})
        return _json({"dashboards": summaries})

    async def create_dashboard(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        body = await _read_json(request)
        if problem := self._dashboard_problem(body):
            return self.error(400, problem)
        dashboard_id = "-".join(secrets.token_hex(2)[:3] for _ in range(3))
        return _json(self._store_dashboard(body, dashboard_id, None))

    async def get_dashboard(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        dashboard = self.dashboards.get(request.match_info["id"])
        if dashboard is None:
            return self.error(404, "Dashboard does not exist")
        return _json(dashboard)

    async def update_dashboard(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        dashboard = self.dashboards.get(request.match_info["id"])
        if dashboard is None:
            return self.error(404, "Dashboard does not exist")
        body = await _read_json(request)
        if problem := self._dashboard_problem(body):
            return self.error(400, problem)
        return _json(self._store_dashboard(body, dashboard["id"], dashboard["created_at"]))

    async def delete_dashboard(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        dashboard_id = request.match_info["id"]
        if self.dashboards.pop(dashboard_id, None) is None:
            return self.error(404, "Dashboard does not exist")
        self.owner.changed()
        return _json({"deleted_dashboard_id": dashboard_id})

    # Monitors

    def _monitor_problem(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Invalid JSON"
        if body.get("type") not in MONITOR_TYPES:
            return f"Invalid monitor type: {body.get('type')!r}"
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            return "The value provided for parameter 'query' is invalid"
        if body["type"] in ("query alert", "metric alert"):
            match = MONITOR_QUERY_PATTERN.match(query)
            if match is None:
                return "The value provided for parameter 'query' is invalid"
            critical = ((body.get("options") or {}).get("thresholds") or {}).get("critical")
            if critical is not None and float(critical) != float(match["threshold"]):
                return (f"Alert threshold ({critical}) does not match that used in the query "
                        f"({match['threshold']}).")
        return None

    def _store_monitor(self, body: dict[str, Any], monitor_id: int, created: str | None) -> dict[str, Any]:
        monitor = {
            "id": monitor_id,
            "name": body.get("name", ""),
            "message": body.get("message", ""),
            "query": body["query"],
            "type": body["type"],
            "tags": body.get("tags") or [],
            "options": body.get("options") or {},
            "priority": body.get("priority"),
            "multi": False,
            "overall_state": "No Data",
            "org_id": 1,
            "creator": {"email": "postmerge@example.com", "handle": "postmerge@example.com", "name": "postmerge"},
            "created": created or _iso(),
            "modified": _iso(),
            "deleted": None,
            "restricted_roles": None,
        }
        self.monitors[monitor_id] = monitor
        self.owner.changed()
        return monitor

    def _monitor_id(self, request: web.Request) -> int | None:
        try:
            return int(request.match_info["id"])
        except ValueError:
            return None

    async def list_monitors(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        name = request.query.get("name")
        found = [monitor for monitor in self.monitors.values()
                 if name is None or name.lower() in monitor["name"].lower()]
        return _json(found)

    async def create_monitor(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        body = await _read_json(request)
        if problem := self._monitor_problem(body):
            return self.error(400, problem)
        monitor_id = self._next_monitor_id
        self._next_monitor_id += 1
        return _json(self._store_monitor(body, monitor_id, None))

    async def get_monitor(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        monitor = self.monitors.get(self._monitor_id(request))
        if monitor is None:
            return self.error(404, "Monitor not found")
        return _json(monitor)

    async def update_monitor(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        monitor = self.monitors.get(self._monitor_id(request))
        if monitor is None:
            return self.error(404, "Monitor not found")
        body = await _read_json(request)
        if not isinstance(body, dict):
            return self.error(400, "Invalid JSON")
        merged = {**monitor, **body}
        if problem := self._monitor_problem(merged):
            return self.error(400, problem)
        return _json(self._store_monitor(merged, monitor["id"], monitor["created"]))

    async def delete_monitor(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        monitor_id = self._monitor_id(request)
        if self.monitors.pop(monitor_id, None) is None:
            return self.error(404, "Monitor not found")
        self.owner.changed()
        return _json({"deleted_monitor_id": monitor_id})

    # Metrics

    async def query_metrics(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        try:
            start = int(request.query["from"])
            end = int(request.query["to"])
            query = request.query["query"]
        except (KeyError, ValueError):
            return self.error(400, "The 'from', 'to' and 'query' parameters are required")
        match = QUERY_PATTERN.match(query)
        if match is None:
            return self.error(400, f"Error parsing query: {query}")
        series = self._query_series(match, start, end, query)
        return _json({
            "status": "ok",
            "res_type": "time_series",
            "resp_version": 1,
            "query": query,
            "from_date": start * 1000,
            "to_date": end * 1000,
            "series": series,
            "group_by": [],
            "message": "",
        })

    def _query_series(self, match: re.Match[str], start: int, end: int, query: str) -> list[dict[str, Any]]:
        metric = match["metric"]
        scope = match["scope"].strip() or "*"
        wanted = set() if scope == "*" else {tag.strip() for tag in scope.split(",")}
        points = [point for point in self.series.get(metric, [])
                  if start <= point.timestamp <= end and wanted <= set(point.tags)]
        if not points:
            return []

        functions = match["functions"] or ""
        buckets: dict[int, list[float]] = {}
        for point in points:
            bucket = int(point.timestamp) - int(point.timestamp) % QUERY_INTERVAL_SECONDS
            buckets.setdefault(bucket, []).append(point.value)

        aggregator = match["aggregator"]
        pointlist = []
        for bucket in sorted(buckets):
            values = buckets[bucket]
            if ".as_count()" in functions:
                value = sum(values)
            elif ".as_rate()" in functions:
                value = sum(values) / QUERY_INTERVAL_SECONDS
            else:
                value = _aggregate(aggregator, values)
            pointlist.append([float(bucket * 1000), float(value)])

        first, last = min(buckets), max(buckets)
        return [{
            "metric": metric,
            "display_name": metric,
            "expression": query.strip(),
            "scope": scope,
            "tag_set": [],
            "aggr": aggregator,
            "pointlist": pointlist,
            "start": first * 1000,
            "end": (last + QUERY_INTERVAL_SECONDS) * 1000 - 1,
            "interval": QUERY_INTERVAL_SECONDS,
            "length": len(pointlist),
            "query_index": 0,
        }]


def _aggregate(aggregator: str, values: list[float]) -> float:
    if aggregator == "sum":
        return sum(values)
    if aggregator == "min":
        return min(values)
    if aggregator == "max":
        return max(values)
    if aggregator.startswith("p"):
        ordered = sorted(values)
        rank = math.ceil(int(aggregator[1:]) / 100 * len(ordered))
        return ordered[max(rank, 1) - 1]
    return sum(values) / len(values)


# --- Sentry -------------------------------------------------------------------


# Sentry rejects release versions that contain these characters or are one of
# the reserved names (Release.is_valid_version in src/sentry/models/release.py).
# NOTE: the 200-character limit is the step's conservative one; the model stores 250.
SENTRY_BAD_VERSION_CHARACTERS = set("\r\n\f\x0c\t/\\")
SENTRY_RESERVED_VERSIONS = {".", "..", "latest"}
SENTRY_MAX_VERSION_LENGTH = 200
SENTRY_MAX_ENVIRONMENT_LENGTH = 64
SENTRY_NOT_FOUND = "The requested resource does not exist"


class SentryService:
    """Organization releases and their deploys of Sentry API 0."""

    def __init__(self, owner: SaasEmulator) -> None:
        self.owner = owner
        self.releases: dict[str, dict[str, Any]] = {}
        self.deploys: dict[str, list[dict[str, Any]]] = {}
        self.environments: list[str] = []
        # Versions that have events, which Sentry does not let a client delete.
        self.in_use: set[str] = set()
        self._next_id = 1

    @property
    def organization(self) -> str:
        return self.owner.credentials["sentry"]["organization"]

    @property
    def project(self) -> str:
        return self.owner.credentials["sentry"]["project"]

    def mark_in_use(self, version: str) -> None:
        """Make the release undeletable, as events that reference it make it in Sentry."""
        self.in_use.add(version)
        self.owner.changed()

    @staticmethod
    def error(status: int, detail: Any) -> web.Response:
        return _json(detail if isinstance(detail, dict) else {"detail": detail}, status)

    @staticmethod
    def default_error_body(status: int) -> dict[str, Any]:
        messages = {401: "Invalid token", 403: "You do not have permission to perform this action.",
                    404: SENTRY_NOT_FOUND, 409: "Conflict", 429: "You are attempting to use this endpoint too frequently."}
        return {"detail": messages.get(status, "Internal Error")}

    def routes(self, app: web.Application) -> None:
        base = SENTRY_PREFIX + "/organizations/{org}/releases/"
        app.router.add_get(base, self.list_releases)
        app.router.add_post(base, self.create_release)
        app.router.add_get(base + "{version}/", self.get_release)
        app.router.add_delete(base + "{version}/", self.delete_release)
        app.router.add_get(base + "{version}/deploys/", self.list_deploys)
        app.router.add_post(base + "{version}/deploys/", self.create_deploy)

    def _check(self, request: web.Request) -> web.Response | None:
        token = _bearer(request)
        if token is None:
            return self.error(401, "Authentication credentials were not provided.")
        if not secrets.compare_digest(token, self.owner.credentials["sentry"]["token"]):
            return self.error(401, "Invalid token")
        if request.match_info["org"] != self.organization:
            return self.error(404, SENTRY_NOT_FOUND)
        return None

    def _next(self) -> int:
        value = self._next_id
        self._next_id += 1
        return value

    def _release_body(self, release: dict[str, Any]) -> dict[str, Any]:
        deploys = self.deploys.get(release["version"], [])
        return {**release, "deployCount": len(deploys), "lastDeploy": deploys[-1] if deploys else None}

    @staticmethod
    def version_problem(version: Any) -> str | None:
        if not isinstance(version, str) or not version:
            return "This field is required."
        if (len(version) > SENTRY_MAX_VERSION_LENGTH or version.lower() in SENTRY_RESERVED_VERSIONS
                or SENTRY_BAD_VERSION_CHARACTERS & set(version) or version != version.strip()):
            return f"Release with name {version} is not allowed"
        return None

    async def list_releases(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        return _json([self._release_body(release) for release in self.releases.values()])

    async def create_release(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        body = await _read_json(request)
        if not isinstance(body, dict):
            return self.error(400, "Malformed request")
        version = body.get("version")
        if problem := self.version_problem(version):
            return self.error(400, {"version": [problem]})
        projects = body.get("projects")
        if not isinstance(projects, list) or not projects:
            return self.error(400, {"projects": ["This field is required."]})
        if any(project != self.project for project in projects):
            return self.error(400, "Invalid project ids or slugs")

        project = {"id": 1, "slug": self.project, "name": self.project, "newGroups": 0,
                   "platform": None, "platforms": [], "hasHealthData": False}
        release = self.releases.get(version)
        if release is not None:
            # Sentry returns 208 Already Reported for an existing version and adds the projects.
            if not release["projects"]:
                release["projects"] = [project]
                self.owner.changed()
            return _json(self._release_body(release), 208)
        release = {
            "id": self._next(),
            "version": version,
            "shortVersion": version,
            "status": "open",
            "ref": body.get("ref"),
            "url": body.get("url"),
            "dateReleased": body.get("dateReleased"),
            "dateCreated": _iso(),
            "data": {},
            "newGroups": 0,
            "owner": None,
            "commitCount": 0,
            "lastCommit": None,
            "authors": [],
            "projects": [project],
            "firstEvent": None,
            "lastEvent": None,
        }
        self.releases[version] = release
        self.owner.changed()
        return _json(self._release_body(release), 201)

    async def get_release(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        release = self.releases.get(request.match_info["version"])
        if release is None:
            return self.error(404, SENTRY_NOT_FOUND)
        return _json(self._release_body(release))

    async def delete_release(self, request: web.Request) -> web.Response:
        from aiohttp import web

        if (failure := self._check(request)) is not None:
            return failure
        version = request.match_info["version"]
        if version not in self.releases:
            return self.error(404, SENTRY_NOT_FOUND)
        if version in self.in_use:
            return self.error(400, "This release is referenced by active issues and cannot be removed.")
        del self.releases[version]
        # Deploys belong to the release and go with it, but the environments stay, as in Sentry.
        self.deploys.pop(version, None)
        self.owner.changed()
        return web.Response(status=204)

    async def list_deploys(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        version = request.match_info["version"]
        if version not in self.releases:
            return self.error(404, SENTRY_NOT_FOUND)
        return _json(list(reversed(self.deploys.get(version, []))))

    async def create_deploy(self, request: web.Request) -> web.Response:
        if (failure := self._check(request)) is not None:
            return failure
        version = request.match_info["version"]
        if version not in self.releases:
            return self.error(404, SENTRY_NOT_FOUND)
        body = await _read_json(request)
        if not isinstance(body, dict):
            return self.error(400, "Malformed request")
        environment = body.get("environment")
        if (not isinstance(environment, str) or not environment
                or len(environment) > SENTRY_MAX_ENVIRONMENT_LENGTH or re.search(r"[\n\r\f/]", environment)):
            return self.error(400, {"environment": ["Invalid value for environment"]})
        deploy = {
            "id": str(self._next()),
            "environment": environment,
            "name": body.get("name"),
            "url": body.get("url"),
            "dateStarted": body.get("dateStarted"),
            "dateFinished": body.get("dateFinished") or _iso(),
        }
        self.deploys.setdefault(version, []).append(deploy)
        if environment not in self.environments:
            self.environments.append(environment)
        self.owner.changed()
        return _json(deploy, 201)


# --- The server ---------------------------------------------------------------


class SaasEmulator:
    """The aiohttp server that serves the three emulated APIs on 127.0.0.1."""

    def __init__(
        self,
        port: int = 0,
        credentials: dict[str, dict[str, str]] | None = None,
        state_file: Path | None = None,
    ) -> None:
        self.port = port
        self.credentials = credentials or new_credentials()
        self.state_file = state_file
        self.cloudflare = CloudflareService(self)
        self.datadog = DatadogService(self)
        self.sentry = SentryService(self)
        self.faults: list[Fault] = []
        # Every request as (method, path), for tests that count calls.
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None
        if state_file is not None and state_file.exists():
            self.load_state(json.loads(state_file.read_text(encoding="utf-8")))

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def cloudflare_url(self) -> str:
        return self.base_url + CLOUDFLARE_PREFIX

    @property
    def datadog_url(self) -> str:
        return self.base_url + DATADOG_PREFIX

    @property
    def sentry_url(self) -> str:
        return self.base_url + SENTRY_PREFIX

    async def __aenter__(self) -> SaasEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def build_app(self) -> web.Application:
        from aiohttp import web

        app = web.Application(middlewares=[self._fault_middleware])
        self.cloudflare.routes(app)
        self.datadog.routes(app)
        self.sentry.routes(app)
        app.router.add_get(CONTROL_PREFIX + "/state", self._control_state)
        app.router.add_post(CONTROL_PREFIX + "/faults", self._control_fault)
        app.router.add_post(CONTROL_PREFIX + "/reset", self._control_reset)
        app.router.add_post(CONTROL_PREFIX + "/datadog/series", self._control_series)
        return app

    async def start(self) -> None:
        """Listen on 127.0.0.1, on the same port as before after a stop."""
        from aiohttp import web

        self._runner = web.AppRunner(self.build_app(), shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port, reuse_address=True)
        await site.start()
        sockets = self._runner.addresses
        self.port = sockets[0][1]
        logger.info("SaaS emulator listening on %s", self.base_url)

    async def stop(self) -> None:
        """Close the listening socket, so connections are refused until `start`."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            logger.info("SaaS emulator on port %s stopped", self.port)

    def inject(
        self,
        path: str,
        status: int | None = None,
        *,
        body: Any = None,
        delay_seconds: float = 0.0,
        method: str | None = None,
        times: int = 1,
    ) -> Fault:
        """Make the next `times` requests whose path starts with `path` fail or wait.

        `path` includes the service prefix, for example "/cloudflare/" or
        "/sentry/api/0/organizations/example-org/releases/". With a status,
        the request gets that status and `body`, or the service's error body
        for it. With only a delay, the request is handled normally after it.
        """
        fault = Fault(path=path, method=method, status=status, body=body, delay_seconds=delay_seconds, times=times)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    async def _fault_middleware_impl(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        fault = next((item for item in self.faults if item.matches(request.method, request.path)), None)
        if fault is not None:
            fault.times -= 1
            if fault.times <= 0:
                self.faults.remove(fault)
            if fault.delay_seconds:
                await asyncio.sleep(fault.delay_seconds)
            if fault.status is not None:
                return _json(fault.body if fault.body is not None else self._error_body(request.path, fault.status),
                             fault.status)
        return await handler(request)

    @property
    def _fault_middleware(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
            return await self._fault_middleware_impl(request, handler)

        return middleware

    def _error_body(self, path: str, status: int) -> Any:
        if path.startswith("/cloudflare/"):
            return CloudflareService.default_error_body(status)
        if path.startswith("/datadog/"):
            return DatadogService.default_error_body(status)
        return SentryService.default_error_body(status)

    # State

    def state(self) -> dict[str, Any]:
        """Return every stored object, as the --state file and /_emulator/state contain it."""
        return {
            "cloudflare": {"rulesets": self.cloudflare.rulesets},
            "datadog": {
                "dashboards": self.datadog.dashboards,
                "monitors": {str(key): value for key, value in self.datadog.monitors.items()},
                "next_monitor_id": self.datadog._next_monitor_id,
            },
            "sentry": {
                "releases": self.sentry.releases,
                "deploys": self.sentry.deploys,
                "environments": self.sentry.environments,
                "in_use": sorted(self.sentry.in_use),
                "next_id": self.sentry._next_id,
            },
        }

    def load_state(self, data: dict[str, Any]) -> None:
        cloudflare = data.get("cloudflare", {})
        self.cloudflare.rulesets = cloudflare.get("rulesets", {})
        datadog = data.get("datadog", {})
        self.datadog.dashboards = datadog.get("dashboards", {})
        self.datadog.monitors = {int(key): value for key, value in datadog.get("monitors", {}).items()}
        self.datadog._next_monitor_id = datadog.get("next_monitor_id", 1000001)
        sentry = data.get("sentry", {})
        self.sentry.releases = sentry.get("releases", {})
        self.sentry.deploys = sentry.get("deploys", {})
        self.sentry.environments = sentry.get("environments", [])
        self.sentry.in_use = set(sentry.get("in_use", []))
        self.sentry._next_id = sentry.get("next_id", 1)

    def reset(self) -> None:
        self.load_state({})
        self.faults.clear()
        self.changed()

    def changed(self) -> None:
        """Write the state file after a change, when the emulator has one."""
        if self.state_file is None:
            return
        temporary = self.state_file.with_name(f".{self.state_file.name}.{secrets.token_hex(4)}.tmp")
        temporary.write_text(json.dumps(self.state(), indent=1), encoding="utf-8")
        os.replace(temporary, self.state_file)

    # Control endpoints for a sandbox or traffic generator in another process

    async def _control_state(self, request: web.Request) -> web.Response:
        return _json(self.state())

    async def _control_fault(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            return _json({"error": "a JSON object with 'path' is required"}, 400)
        self.inject(
            body["path"],
            body.get("status"),
            body=body.get("body"),
            delay_seconds=float(body.get("delay_seconds", 0.0)),
            method=body.get("method"),
            times=int(body.get("times", 1)),
        )
        return _json({"faults": len(self.faults)})

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"ok": True})

    async def _control_series(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        points = body.get("points") if isinstance(body, dict) else None
        if not isinstance(points, list):
            return _json({"error": "a JSON object with a 'points' list is required"}, 400)
        for point in points:
            try:
                self.datadog.record(point["metric"], point["value"], point.get("timestamp"), point.get("tags"))
            except (KeyError, TypeError, ValueError) as error:
                return _json({"error": f"invalid point {point!r}: {error}"}, 400)
        # Metric points are telemetry that the traffic makes again, so they are not written to the state file.
        return _json({"recorded": len(points)})


async def _serve(port: int, state_file: Path | None, credentials_file: Path | None,
                 port_file: Path | None = None) -> None:
    credentials = load_credentials(credentials_file) if credentials_file else None
    emulator = SaasEmulator(port=port, credentials=credentials, state_file=state_file)
    await emulator.start()
    print(json.dumps({"port": emulator.port, "cloudflare_url": emulator.cloudflare_url,
                      "datadog_url": emulator.datadog_url, "sentry_url": emulator.sentry_url}), flush=True)
    if port_file is not None:
        # Write then rename, so a reader never sees a partial number.
        partial = port_file.with_name(port_file.name + ".tmp")
        partial.write_text(f"{emulator.port}\n", encoding="utf-8")
        os.replace(partial, port_file)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopped.set)
    try:
        await stopped.wait()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.sandbox.saas",
                                     description="Emulate the Cloudflare, Datadog and Sentry APIs on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--state", type=Path, help="JSON file the state is read from and written to")
    parser.add_argument("--credentials", type=Path,
                        help="JSON file of the accepted tokens and keys, created with new ones when missing")
    parser.add_argument("--port-file", type=Path, help="file that receives the bound port once listening")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(arguments.port, arguments.state, arguments.credentials, arguments.port_file))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
