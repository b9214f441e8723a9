"""The cdn step: add, update or delete one Cloudflare cache rule through the Rulesets API.

A cache rule lives in the zone's entry point ruleset of the
`http_request_cache_settings` phase (Cloudflare API v4, Rulesets API, as the
"Create a cache rule via API" guide describes it). The step finds its rule by
the rule's `ref`, which it derives from the path pattern, so a second run
updates the rule it added before instead of adding another. Requests use
aiohttp and send the API token as `Authorization: Bearer`.

Step params, filled by the planner from a runbook task such as
"CDN設定更新: Cloudflare" with "設定: `/api/v2/*` をキャッシュ対象に追加" and
"TTL: 300秒":

    pattern      str    URI path pattern to cache, "/api/v2/*" (from the 設定 line).
                        A trailing "*" matches every path with that prefix.
    ttl_seconds  int    Edge cache TTL in seconds, 300 (from the TTL line), default 300.
    action       str    "create" (default): add the rule, or update it to the pattern and TTL.
                        "delete": remove the rule, for the rollback plan's "CDN設定を元に戻す".
    ref          str    Optional rule ref; default derived from the pattern
                        ("postmerge-api-v2-cache" for "/api/v2/*").

Settings come from `environment.cloudflare` (api_url, zone_id, token_variable).
StepResult.data contains what rollback needs: the ruleset and rule ids, the
ref, whether this step created the rule, and the rule as it was before an
update or a delete. The token never appears in output, errors or data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult, http_failure_key, send_json

if TYPE_CHECKING:
    import aiohttp

PHASE = "http_request_cache_settings"
DEFAULT_TTL_SECONDS = 300
# Cloudflare's error code for "could not find entrypoint ruleset in the … phase".
ENTRYPOINT_NOT_FOUND_CODE = 10003
# The rule fields the step writes, and compares to decide whether a rule is up to date.
RULE_FIELDS = ("action", "action_parameters", "expression", "description", "enabled", "ref")
PATH_PATTERN = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


@dataclass
class CloudflareClient:
    """Rulesets API requests for one zone, with failures raised as StepError."""

    session: aiohttp.ClientSession
    api_url: str
    zone_id: str
    token: str
    token_variable: str
    timeout_seconds: float
    ref: str

    @property
    def entrypoint_url(self) -> str:
        return f"{self.api_url}/zones/{self.zone_id}/rulesets/phases/{PHASE}/entrypoint"

    def rules_url(self, ruleset_id: str, rule_id: str | None = None) -> str:
        url = f"{self.api_url}/zones/{self.zone_id}/rulesets/{ruleset_id}/rules"
        return f"{url}/{rule_id}" if rule_id else url

    async def entrypoint(self) -> dict[str, Any] | None:
        """Return the zone's cache settings entry point ruleset, or None when the zone has none yet."""
        status, body = await self.call("GET", self.entrypoint_url, allow_missing=True)
        if status == 404:
            return None
        return body["result"]

    async def call(self, method: str, url: str, json_body: Any = None, allow_missing: bool = False) -> tuple[int, Any]:
        status, body = await send_json(self.session, method, url, token=self.token, json_body=json_body,
                                       timeout_seconds=self.timeout_seconds, prefix="cdn", ref=self.ref)
        if 200 <= status < 300 and isinstance(body, dict) and body.get("success") is not False:
            return status, body
        if allow_missing and status == 404 and ENTRYPOINT_NOT_FOUND_CODE in _error_codes(body):
            return status, body
        raise self.failure(method, url, status, body)

    def failure(self, method: str, url: str, status: int, body: Any) -> StepError:
        return StepError(http_failure_key("cdn", status), method=method, url=url, status=status, ref=self.ref,
                         zone=self.zone_id, errors=_error_text(body), variable=self.token_variable)


class CdnExecutor(BaseExecutor):
    kind = "cdn"

    def repeat_safe(self, step: Step) -> bool:
        # The rule is found by its ref, so a repeat updates or deletes the same rule.
        return True

    def has_inverse(self, step: Step) -> bool:
        return True

    async def execute(self, context: StepContext) -> StepResult:
        request = _read_params(context.step)
        if request["action"] == "delete":
            return await self._delete(context, request)
        return await self._create(context, request)

    async def rollback(self, context: StepContext) -> StepResult:
        data = context.previous_data
        if not data.get("ref"):
            raise StepError("cdn.rollback_without_data", step=context.step.id)
        locale = context.locale
        async with _client(context, data["ref"]) as client:
            ruleset = await client.entrypoint()
            current = _find_rule(ruleset, data["ref"])

            if data.get("action") == "delete":
                restored = data.get("deleted_rule")
                if restored is None or current is not None:
                    context.output.write(translate("cdn.output_nothing_to_undo", locale, ref=data["ref"]))
                    return _rollback_result(locale, data, "none")
                await _put_rule(client, ruleset, None, restored)
                context.output.write(translate("cdn.output_restored", locale, ref=data["ref"]))
                return _rollback_result(locale, data, "restored")

            if data.get("created"):
                if current is None:
                    context.output.write(translate("cdn.output_already_deleted", locale, ref=data["ref"]))
                    return _rollback_result(locale, data, "none")
                await client.call("DELETE", client.rules_url(ruleset["id"], current["id"]))
                context.output.write(translate("cdn.output_deleted", locale, ref=data["ref"]))
                return _rollback_result(locale, data, "deleted")

            previous = data.get("previous_rule")
            if previous is None:
                context.output.write(translate("cdn.output_nothing_to_undo", locale, ref=data["ref"]))
                return _rollback_result(locale, data, "none")
            await _put_rule(client, ruleset, current, previous)
            context.output.write(translate("cdn.output_restored", locale, ref=data["ref"]))
            return _rollback_result(locale, data, "restored")

    async def _create(self, context: StepContext, request: dict[str, Any]) -> StepResult:
        locale = context.locale
        desired = cache_rule(request["pattern"], request["ttl_seconds"], request["ref"])
        data = _initial_data(context, request)
        async with _client(context, request["ref"]) as client:
            data["zone_id"] = client.zone_id
            ruleset = await client.entrypoint()
            current = _find_rule(ruleset, request["ref"])

            if current is None:
                # Recorded before the request, so a rollback after an interrupted
                # attempt deletes the rule if the request did add it.
                data["created"] = True
                await context.save(data)
                ruleset = await _put_rule(client, ruleset, None, desired)
                context.output.write(translate("cdn.output_added", locale, ref=request["ref"],
                                               expression=desired["expression"], ttl=request["ttl_seconds"]))
            elif _rule_fields(current) == desired:
                context.output.write(translate("cdn.output_unchanged", locale, ref=request["ref"],
                                               ttl=request["ttl_seconds"]))
            else:
                if not data["created"] and data["previous_rule"] is None:
                    data["previous_rule"] = _rule_fields(current)
                await context.save(data)
                ruleset = await _put_rule(client, ruleset, current, desired)
                context.output.write(translate("cdn.output_updated", locale, ref=request["ref"],
                                               expression=desired["expression"], ttl=request["ttl_seconds"]))

        rule = _find_rule(ruleset, request["ref"])
        data["ruleset_id"] = ruleset["id"] if ruleset else None
        data["rule_id"] = rule["id"] if rule else None
        summary = translate("cdn.summary", locale, pattern=request["pattern"], ttl=request["ttl_seconds"],
                            zone=data["zone_id"])
        return StepResult(ok=True, summary=summary, data=data)

    async def _delete(self, context: StepContext, request: dict[str, Any]) -> StepResult:
        locale = context.locale
        data = _initial_data(context, request)
        async with _client(context, request["ref"]) as client:
            data["zone_id"] = client.zone_id
            ruleset = await client.entrypoint()
            current = _find_rule(ruleset, request["ref"])
            if current is None:
                context.output.write(translate("cdn.output_already_deleted", locale, ref=request["ref"]))
            else:
                if data.get("deleted_rule") is None:
                    data["deleted_rule"] = _rule_fields(current)
                data["ruleset_id"] = ruleset["id"]
                await context.save(data)
                await client.call("DELETE", client.rules_url(ruleset["id"], current["id"]))
                context.output.write(translate("cdn.output_deleted", locale, ref=request["ref"]))
        summary = translate("cdn.delete_summary", locale, pattern=request["pattern"], zone=data["zone_id"])
        return StepResult(ok=True, summary=summary, data=data)


def cache_rule(pattern: str, ttl_seconds: int, ref: str) -> dict[str, Any]:
    """Return the cache rule that caches paths matching the pattern for ttl_seconds at the edge."""
    return {
        "action": "set_cache_settings",
        "action_parameters": {
            "cache": True,
            "edge_ttl": {"mode": "override_origin", "default": ttl_seconds},
        },
        "expression": cache_expression(pattern),
        "description": f"postmerge: cache {pattern} for {ttl_seconds} s",
        "enabled": True,
        "ref": ref,
    }


def cache_expression(pattern: str) -> str:
    """Return the Rules language expression for a path pattern.

    "/api/v2/*" becomes `starts_with(http.request.uri.path, "/api/v2/")`, a
    pattern with another "*" uses the `wildcard` operator, and a pattern
    without "*" matches the path exactly.
    """
    if pattern.endswith("*") and "*" not in pattern[:-1]:
        return f'starts_with(http.request.uri.path, "{pattern[:-1]}")'
    if "*" in pattern:
        return f'http.request.uri.path wildcard "{pattern}"'
    return f'http.request.uri.path eq "{pattern}"'


def rule_ref(pattern: str) -> str:
    """Return the ref that identifies the step's rule for a pattern, such as "postmerge-api-v2-cache"."""
    is_prefix = pattern.endswith("*") and "*" not in pattern[:-1]
    base = pattern.rstrip("*") if is_prefix else pattern
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-") or "root"
    if is_prefix:
        return f"postmerge-{slug}-cache"
    digest = hashlib.sha1(pattern.encode("utf-8")).hexdigest()[:8]
    return f"postmerge-{slug}-{digest}-cache"


def _read_params(step: Step) -> dict[str, Any]:
    params = step.params
    pattern = params.get("pattern")
    if not isinstance(pattern, str) or not PATH_PATTERN.fullmatch(pattern):
        raise StepError("cdn.invalid_pattern", step=step.id, pattern=str(pattern))
    ttl = params.get("ttl_seconds", DEFAULT_TTL_SECONDS)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise StepError("cdn.invalid_ttl", step=step.id, ttl=str(ttl))
    action = params.get("action", "create")
    if action not in ("create", "delete"):
        raise StepError("cdn.invalid_action", step=step.id, action=str(action))
    ref = params.get("ref") or rule_ref(pattern)
    return {"pattern": pattern, "ttl_seconds": ttl, "action": action, "ref": ref}


def _initial_data(context: StepContext, request: dict[str, Any]) -> dict[str, Any]:
    """Return the step data, keeping what an earlier attempt for the same rule recorded."""
    earlier = context.previous_data
    same = earlier.get("ref") == request["ref"] and earlier.get("action", "create") == request["action"]
    return {
        "action": request["action"],
        "pattern": request["pattern"],
        "ttl_seconds": request["ttl_seconds"],
        "ref": request["ref"],
        "zone_id": None,
        "ruleset_id": earlier.get("ruleset_id") if same else None,
        "rule_id": earlier.get("rule_id") if same else None,
        "created": bool(earlier.get("created")) if same else False,
        "previous_rule": earlier.get("previous_rule") if same else None,
        "deleted_rule": earlier.get("deleted_rule") if same else None,
    }


class _client:
    """An async context manager that opens an aiohttp session and returns a CloudflareClient."""

    def __init__(self, context: StepContext, ref: str) -> None:
        settings = context.environment.cloudflare
        if settings is None:
            raise StepError("cdn.missing_settings", environment=context.environment.name)
        token = context.environment.secret(settings.token_variable)
        if not token:
            raise StepError("cdn.missing_token", variable=settings.token_variable,
                            environment=context.environment.name)
        self.settings = settings
        self.token = token
        self.timeout = min(context.environment.http_timeout_seconds, context.timeout_seconds)
        self.ref = ref
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CloudflareClient:
        import aiohttp

        self.session = aiohttp.ClientSession()
        return CloudflareClient(
            session=self.session,
            api_url=self.settings.api_url.rstrip("/"),
            zone_id=self.settings.zone_id,
            token=self.token,
            token_variable=self.settings.token_variable,
            timeout_seconds=self.timeout,
            ref=self.ref,
        )

    async def __aexit__(self, *exc_info: object) -> None:
        if self.session is not None:
            await self.session.close()


async def _put_rule(
    client: CloudflareClient,
    ruleset: dict[str, Any] | None,
    current: dict[str, Any] | None,
    rule: dict[str, Any],
) -> dict[str, Any]:
    """Add the rule, or update `current` to it, and return the ruleset the API returns."""
    if ruleset is None:
        # The zone has no cache settings entry point ruleset yet: creating it with the rule adds both.
        _, body = await client.call("PUT", client.entrypoint_url, {"rules": [rule]})
    elif current is None:
        _, body = await client.call("POST", client.rules_url(ruleset["id"]), rule)
    else:
        _, body = await client.call("PATCH", client.rules_url(ruleset["id"], current["id"]), rule)
    return body["result"]


def _find_rule(ruleset: dict[str, Any] | None, ref: str) -> dict[str, Any] | None:
    if ruleset is None:
        return None
    return next((rule for rule in ruleset.get("rules") or [] if rule.get("ref") == ref), None)


def _rule_fields(rule: dict[str, Any]) -> dict[str, Any]:
    fields = {key: rule[key] for key in RULE_FIELDS if key in rule}
    fields.setdefault("enabled", True)
    fields.setdefault("description", "")
    return fields


def _rollback_result(locale: str, data: dict[str, Any], outcome: str) -> StepResult:
    summary = translate(f"cdn.rollback_summary_{outcome}", locale, ref=data["ref"], zone=data.get("zone_id"))
    return StepResult(ok=True, summary=summary, data={"ref": data["ref"], "rollback": outcome})


def _error_codes(body: Any) -> list[int]:
    if not isinstance(body, dict):
        return []
    return [error.get("code") for error in body.get("errors") or [] if isinstance(error, dict)]


def _error_text(body: Any) -> str:
    """Return Cloudflare's errors as "code: message" pairs, or a note when the body has none."""
    if isinstance(body, dict) and body.get("errors"):
        parts = []
        for error in body["errors"]:
            if isinstance(error, dict):
                parts.append(f"{error.get('code')}: {error.get('message')}")
        if parts:
            return "; ".join(parts)
    return "-"

