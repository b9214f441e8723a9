"""The sentry step: track a release in Sentry and record its deploy to an environment.

Uses Sentry's REST API 0 with aiohttp (organization releases:
`GET/POST /api/0/organizations/{org}/releases/`, `DELETE …/releases/{version}/`,
`GET/POST …/releases/{version}/deploys/`), with the auth token sent as
`Authorization: Bearer`. A deploy of a release to an environment creates the
environment in Sentry and turns on release tracking for it, which is what the
runbook's "新規環境追加" and "Release tracking有効化" lines ask for.

Step params, filled by the planner from "Sentry プロジェクト設定":

    environment  str  Environment name, "production-v2" (from the 新規環境追加 line).
                      At most 64 characters, without "/" or line breaks, as Sentry requires.
    release      str  Release version the planner derives from the runbook, such as
                      "api-v2-migration@pr-456". Sentry rejects versions with "/", "\\",
                      whitespace or more than 200 characters, and ".", ".." and "latest".

The organization and project come from `environment.sentry`.

The step is idempotent: an existing release is reused (the project is added
to it if missing), and a deploy to the same environment is not recorded
twice. StepResult.data records whether the step created the release.

Rollback deletes the release only when this step created it. Sentry has no
API to delete a deploy, and it keeps environments, so those stay (an
environment can be hidden in the project settings). Sentry also refuses to
delete a release that events already reference; the rollback then fails
with that reason and leaves the release in place.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult, http_failure_key, send_json

if TYPE_CHECKING:
    import aiohttp

# Release version rules of Sentry's Release.is_valid_version (src/sentry/models/release.py):
# no BAD_RELEASE_CHARS (including "/", "\\" and line breaks), and not ".", ".." or "latest"
# in any case. The step also rejects spaces, which Sentry allows, because a
# version with spaces is hard to use in URLs and commands.
# NOTE: the model stores 250 characters (DB_VERSION_LENGTH); 200 is a conservative limit.
MAX_VERSION_LENGTH = 200
RESERVED_VERSIONS = frozenset({".", "..", "latest"})
INVALID_VERSION_CHARACTERS = re.compile(r"[\s/\\]")
# Environment name rules of Sentry's Environment.is_valid_name (not checked against its source).
MAX_ENVIRONMENT_LENGTH = 64
INVALID_ENVIRONMENT_CHARACTERS = re.compile(r"[\n\r\f/]")


class SentryApi:
    """Requests to one Sentry organization, with failures raised as StepError."""

    def __init__(self, session: aiohttp.ClientSession, context: StepContext, version: str) -> None:
        settings = context.environment.sentry
        assert settings is not None
        self.session = session
        self.base = f"{settings.api_url.rstrip('/')}/organizations/{quote(settings.organization, safe='')}"
        self.organization = settings.organization
        self.project = settings.project
        self.token_variable = settings.token_variable
        self.token = context.environment.secret(settings.token_variable) or ""
        self.timeout = min(context.environment.http_timeout_seconds, context.timeout_seconds)
        self.version = version

    @property
    def release_url(self) -> str:
        return f"{self.base}/releases/{quote(self.version, safe='')}/"

    async def call(self, method: str, url: str, json_body: Any = None,
                   accept: tuple[int, ...] = ()) -> tuple[int, Any]:
        """Send one request; a status in `accept` is returned instead of raised."""
        status, body = await send_json(self.session, method, url, token=self.token, json_body=json_body,
                                       timeout_seconds=self.timeout, prefix="sentry", release=self.version)
        common = {"method": method, "url": url, "release": self.version}
        if 200 <= status < 300 or status in accept:
            return status, body
        raise self.failure(status, body, common)

    def failure(self, status: int, body: Any, common: dict[str, Any]) -> StepError:
        return StepError(http_failure_key("sentry", status), **common, status=status, detail=_detail(body),
                         organization=self.organization, variable=self.token_variable, project=self.project)


class SentryExecutor(BaseExecutor):
    kind = "sentry"

    def repeat_safe(self, step: Step) -> bool:
        # An existing release is reused and a deploy is recorded only once per environment.
        return True

    def has_inverse(self, step: Step) -> bool:
        return True

    async def execute(self, context: StepContext) -> StepResult:
        version, environment = _read_params(context.step)
        _check_settings(context)
        locale = context.locale
        earlier = context.previous_data
        same = earlier.get("release") == version
        data: dict[str, Any] = {
            "release": version,
            "environment": environment,
            "organization": context.environment.sentry.organization,
            "project": context.environment.sentry.project,
            "created_release": bool(earlier.get("created_release")) if same else False,
            "deploy_id": earlier.get("deploy_id") if same else None,
        }

        import aiohttp

        async with aiohttp.ClientSession() as session:
            api = SentryApi(session, context, version)
            status, release = await api.call("GET", api.release_url, accept=(404,))
            if status == 404:
                data["created_release"] = True
                await context.save(data)
                await api.call("POST", f"{api.base}/releases/", {"version": version, "projects": [api.project]})
                context.output.write(translate("sentry.output_release_created", locale, release=version,
                                               project=api.project))
            elif api.project not in _project_slugs(release):
                # Creating an existing version again adds the project to it (HTTP 208).
                await api.call("POST", f"{api.base}/releases/", {"version": version, "projects": [api.project]})
                context.output.write(translate("sentry.output_project_added", locale, release=version,
                                               project=api.project))
            else:
                context.output.write(translate("sentry.output_release_exists", locale, release=version))

            _, deploys = await api.call("GET", api.release_url + "deploys/")
            existing = next((deploy for deploy in deploys or [] if deploy.get("environment") == environment), None)
            if existing is not None:
                data["deploy_id"] = existing.get("id")
                context.output.write(translate("sentry.output_deploy_exists", locale, release=version,
                                               environment=environment))
            else:
                body = {"environment": environment, "name": f"{version} to {environment}"}
                _, deploy = await api.call("POST", api.release_url + "deploys/", body)
                data["deploy_id"] = (deploy or {}).get("id")
                context.output.write(translate("sentry.output_deploy_created", locale, release=version,
                                               environment=environment))

        summary = translate("sentry.summary", locale, release=version, environment=environment,
                            project=data["project"])
        return StepResult(ok=True, summary=summary, data=data)

    async def rollback(self, context: StepContext) -> StepResult:
        data = context.previous_data
        version = data.get("release")
        if not version:
            raise StepError("sentry.rollback_without_data", step=context.step.id)
        _check_settings(context)
        locale = context.locale
        environment = data.get("environment", "")

        if not data.get("created_release"):
            context.output.write(translate("sentry.output_release_kept", locale, release=version,
                                           environment=environment))
            summary = translate("sentry.rollback_summary_kept", locale, release=version)
            return StepResult(ok=True, summary=summary, data={"release": version, "rollback": "none"})

        import aiohttp

        async with aiohttp.ClientSession() as session:
            api = SentryApi(session, context, version)
            status, body = await api.call("DELETE", api.release_url, accept=(400, 404))
        if status == 400:
            raise StepError("sentry.release_in_use", release=version, detail=_detail(body),
                            organization=data.get("organization"))
        if status == 404:
            context.output.write(translate("sentry.output_release_already_deleted", locale, release=version))
            outcome = "none"
        else:
            context.output.write(translate("sentry.output_release_deleted", locale, release=version,
                                           environment=environment))
            outcome = "deleted"
        summary = translate(f"sentry.rollback_summary_{outcome}", locale, release=version)
        return StepResult(ok=True, summary=summary, data={"release": version, "rollback": outcome})


def validate_version(version: Any) -> str | None:
    """Return why Sentry would reject the release version, or None when it is valid."""
    if not isinstance(version, str) or not version:
        return "empty"
    if len(version) > MAX_VERSION_LENGTH:
        return f"longer than {MAX_VERSION_LENGTH} characters"
    if version.lower() in RESERVED_VERSIONS:
        return "reserved name"
    if INVALID_VERSION_CHARACTERS.search(version):
        return "contains /, \\ or whitespace"
    return None


def _read_params(step: Step) -> tuple[str, str]:
    version = step.params.get("release")
    problem = validate_version(version)
    if problem is not None:
        raise StepError("sentry.invalid_release", step=step.id, release=repr(version), problem=problem)
    environment = step.params.get("environment")
    if (not isinstance(environment, str) or not environment or len(environment) > MAX_ENVIRONMENT_LENGTH
            or INVALID_ENVIRONMENT_CHARACTERS.search(environment)):
        raise StepError("sentry.invalid_environment", step=step.id, environment=repr(environment))
    return version, environment


def _check_settings(context: StepContext) -> None:
    settings = context.environment.sentry
    if settings is None:
        raise StepError("sentry.missing_settings", environment=context.environment.name)
    if not context.environment.secret(settings.token_variable):
        raise StepError("sentry.missing_token", variable=settings.token_variable,
                        environment=context.environment.name)


def _project_slugs(release: Any) -> set[str]:
    if not isinstance(release, dict):
        return set()
    return {project.get("slug") for project in release.get("projects") or [] if isinstance(project, dict)}


def _detail(body: Any) -> str:
    """Return Sentry's error text: {"detail": …} or a field-to-messages object."""
    if isinstance(body, dict):
        if "detail" in body:
            return str(body["detail"])
        parts = [f"{key}: {'; '.join(map(str, value)) if isinstance(value, list) else value}"
                 for key, value in body.items()]
        return ", ".join(parts) or "-"
    return "-" if body is None else str(body)[:300]

