"""Settings from the process environment and environments from postmerge.toml.

An environment is a named target (production, staging, sandbox) with its
working directory, URL rewrites, database for read-only checks and the
command substitutions that make a runbook's lines runnable there.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.errors import ConfigError

SANDBOX = "sandbox"
_SLACK_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")
_SLACK_MEMBER_ID = re.compile(r"^[UWS][A-Z0-9]{2,}$")


def default_home() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "postmerge"


class Settings(BaseSettings):
    """Process-wide settings, read from POSTMERGE_* variables."""

    model_config = SettingsConfigDict(env_prefix="POSTMERGE_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    database_url: str | None = None
    config: Path | None = None
    locale: str = "ja"

    @field_validator("locale")
    @classmethod
    def _check_locale(cls, value: str) -> str:
        if value not in ("ja", "en"):
            raise ValueError(f"POSTMERGE_LOCALE must be 'ja' or 'en', not {value!r}")
        return value

    def store_url(self, override: str | None = None) -> str:
        """Return the SQLAlchemy URL of the run store, SQLite under home by default."""
        url = override or self.database_url
        if url:
            return normalize_database_url(url)
        return f"sqlite+aiosqlite:///{self.home / 'postmerge.db'}"


def normalize_database_url(url: str) -> str:
    """Map plain postgresql:// and sqlite:// URLs to the async drivers."""
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain):]
    return url


class KubernetesSettings(BaseModel):
    """Connection settings of kubernetes steps: the cluster, namespace and waits."""

    model_config = {"extra": "forbid"}

    # A kubeconfig file and context; without one, in-cluster settings when
    # running in a pod, else the default kubeconfig (~/.kube/config).
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: bool = False
    namespace: str = "default"
    # Run kubectl forms that have no API mapping through the kubectl binary as
    # shell steps. When false they become manual steps.
    allow_shell: bool = False
    # How long `get pods -l` waits for the selected pods to be Running and Ready.
    wait_timeout_seconds: float = Field(default=300, gt=0)
    # The Deployment that runbook lines about Green (v1) mean, such as its scale-down.
    green_deployment: str | None = None


class NginxSettings(BaseModel):
    """Settings of nginx steps: the files a runbook names, and the validate and reload commands."""

    model_config = {"extra": "forbid"}

    # A path as the runbook writes it mapped to the file edited here,
    # for example "/etc/nginx/sites-available/api.conf" -> "/srv/nginx/api.conf".
    files: dict[str, Path] = Field(default_factory=dict)
    # Commands that replace the runbook's `nginx -t` and its reload.
    test_command: str | None = None
    reload_command: str | None = None


class CloudflareSettings(BaseModel):
    """The Cloudflare zone that cdn steps change, through the Rulesets API."""

    model_config = {"extra": "forbid"}

    api_url: str = "https://api.cloudflare.com/client/v4"
    zone_id: str
    # The name of the variable that contains the API token, looked up in the
    # environment's secrets, its variables, then the process environment.
    # The token itself never goes in this file.
    token_variable: str = "CLOUDFLARE_API_TOKEN"


class DatadogSettings(BaseModel):
    """The Datadog site and keys that datadog steps use."""

    model_config = {"extra": "forbid"}

    api_url: str = "https://api.datadoghq.com"
    api_key_variable: str = "DD_API_KEY"
    app_key_variable: str = "DD_APP_KEY"


class SentrySettings(BaseModel):
    """The Sentry organization and project that sentry steps track releases in."""

    model_config = {"extra": "forbid"}

    api_url: str = "https://sentry.io/api/0"
    organization: str
    project: str
    token_variable: str = "SENTRY_AUTH_TOKEN"


class TrafficSettings(BaseModel):
    """Settings of traffic steps: how the share of requests that go to blue (v2) is set."""

    model_config = {"extra": "forbid"}

    provider: Literal["nginx", "kubernetes"]
    # nginx: the file that contains the weighted upstream, the upstream's name, and
    # the addresses of green (v1) and blue (v2). Validation and reload use the
    # environment's nginx section.
    upstream_file: Path | None = None
    upstream_name: str = "backend-api"
    green_server: str | None = None
    blue_server: str | None = None
    # kubernetes: the ingress-nginx canary Ingress whose canary-weight annotation
    # is blue's share. The connection uses the environment's kubernetes section.
    canary_ingress: str | None = None
    namespace: str | None = None


class MonitorSettings(BaseModel):
    """Settings of monitor steps: how often Datadog is read, with which queries, and the time scale."""

    model_config = {"extra": "forbid"}

    poll_interval_seconds: float = Field(default=30, gt=0)
    # Datadog queries by name: requests, errors (counts) and p95_ms. Error rate and
    # throughput are computed from the two counts. A missing one takes the default
    # for the runbook's metric names.
    queries: dict[str, str] = Field(default_factory=dict)
    # Thresholds that replace the runbook's for this environment, by the same names.
    thresholds: dict[str, float] = Field(default_factory=dict)
    # A window with fewer requests than this is too little traffic to judge.
    min_requests: int = Field(default=100, ge=1)
    # With "share", the throughput threshold is scaled by blue's share of traffic, so
    # 1000 req/s at 10% expects 100 req/s from v2. With "v2", it applies as written.
    throughput_scope: Literal["share", "v2"] = "share"
    # Seconds to wait after the window for metric points that arrive late.
    evaluation_delay_seconds: float = Field(default=0, ge=0)
    # Monitor windows and poll intervals are multiplied by this, so a sandbox can
    # run a 5-minute window in seconds. A protected environment rejects any value but 1.
    time_scale: float = Field(default=1.0, gt=0, le=1)


class Environment(BaseModel):
    """One named target a runbook runs against."""

    model_config = {"extra": "forbid"}

    name: str
    protected: bool = False
    workdir: Path = Field(default_factory=Path.cwd)
    # Prefix rewrites applied to every URL of an http step, for example
    # "https://api.example.com" -> "http://127.0.0.1:8080".
    url_rewrites: dict[str, str] = Field(default_factory=dict)
    # Database that sql steps read, as a postgresql:// URL.
    database_url: str | None = None
    # Extra variables and dotenv files (relative to workdir) given to shell steps.
    variables: dict[str, str] = Field(default_factory=dict)
    env_files: list[str] = Field(default_factory=list)
    # A runbook command, written exactly as in the runbook, mapped to the
    # command that runs in this environment instead.
    commands: dict[str, str] = Field(default_factory=dict)
    writeback: bool = True
    locale: str | None = None
    default_timeout_seconds: float = Field(default=3600, gt=0)
    http_timeout_seconds: float = Field(default=30, gt=0)
    kill_grace_seconds: float = Field(default=10, ge=0)
    output_limit_bytes: int = Field(default=1_000_000, gt=0)
    # Slack: where runs and incidents are posted, and who may start and approve.
    # Empty lists allow anyone; entries are user ids (U…) or user group ids (S…).
    slack_runs_channel: str | None = None
    slack_incidents_channel: str | None = None
    starters: list[str] = Field(default_factory=list)
    approvers: list[str] = Field(default_factory=list)
    allow_self_approval: bool = False
    # Who may press an incident's buttons (roll back, emergency actions, retry, skip,
    # acknowledge); empty means the approvers. And who the incident message mentions.
    incident_responders: list[str] = Field(default_factory=list)
    oncall: list[str] = Field(default_factory=list)
    # How long an approval waits in Slack before a reminder is posted and the run pauses.
    approval_timeout_seconds: float = Field(default=1800, gt=0)
    runbook_dir: Path | None = None
    # External systems. A step of a kind whose section is missing becomes manual.
    kubernetes: KubernetesSettings | None = None
    nginx: NginxSettings | None = None
    cloudflare: CloudflareSettings | None = None
    datadog: DatadogSettings | None = None
    sentry: SentrySettings | None = None
    traffic: TrafficSettings | None = None
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)

    # Credentials by variable name, such as CLOUDFLARE_API_TOKEN. Unlike `variables`,
    # they are never given to shell steps, and their values are masked in step output.
    secrets: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("slack_runs_channel", "slack_incidents_channel")
    @classmethod
    def _check_channel_id(cls, value: str | None) -> str | None:
        if value is not None and not _SLACK_CHANNEL_ID.match(value):
            raise ValueError(f"{value!r} is not a Slack channel ID; use the ID such as C0123ABCD "
                             "(in Slack: the channel's name, then the ID at the bottom of About), not its #name")
        return value

    @field_validator("starters", "approvers", "incident_responders", "oncall")
    @classmethod
    def _check_member_ids(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _SLACK_MEMBER_ID.match(value):
                raise ValueError(f"{value!r} is not a Slack user ID (U…, W…) or user group ID (S…); copy a user's "
                                 "ID from their profile (⋮, Copy member ID), not a name or an @handle")
        return values

    @model_validator(mode="after")
    def _protected_runs_in_real_time(self) -> Environment:
        if self.protected and self.monitor.time_scale != 1:
            raise ValueError("monitor.time_scale must be 1 in a protected environment, which watches in real time")
        return self

    def secret(self, name: str) -> str | None:
        """Return a credential by variable name: secrets, then variables, then the process environment."""
        import os

        if name in self.secrets:
            return self.secrets[name].get_secret_value()
        return self.variables.get(name) or os.environ.get(name) or None

    def secret_values(self) -> list[str]:
        """Return the credential values that step output must never show."""
        names = set(self.secrets)
        for section in (self.cloudflare, self.datadog, self.sentry):
            if section is not None:
                names.update(value for key, value in section.model_dump().items() if key.endswith("_variable"))
        values = {self.secret(name) for name in names}
        # Very short values would mask ordinary words, and no real credential is that short.
        return sorted((value for value in values if value and len(value) >= 6), key=len, reverse=True)

    def resolve(self, path: str) -> Path:
        candidate = Path(path)
        if candidate.is_absolute():
            return candidate
        return self.workdir / candidate

    def rewrite_url(self, url: str) -> str:
        for prefix in sorted(self.url_rewrites, key=len, reverse=True):
            if url.startswith(prefix):
                return self.url_rewrites[prefix] + url[len(prefix):]
        return url


def load_environments(settings: Settings) -> dict[str, Environment]:
    """Read the environments of postmerge.toml and add the sandbox if it is up.

    When the file has its own [environments.sandbox] and the sandbox is up,
    the file's values are laid over the sandbox's.
    """
    environments: dict[str, Environment] = {}
    path = settings.config
    if path is None and Path("postmerge.toml").is_file():
        path = Path("postmerge.toml")
    if path is not None:
        environments.update(_read_config_file(path))

    from bot.sandbox import sandbox_environment

    sandbox = sandbox_environment(settings.home)
    if sandbox is not None:
        configured = environments.get(SANDBOX)
        if configured is None:
            environments[SANDBOX] = sandbox
        else:
            # [environments.sandbox] in the file adds to the running sandbox, for example
            # its Slack channels and responders. The file's values win.
            environments[SANDBOX] = sandbox.model_copy(update={
                name: getattr(configured, name) for name in configured.model_fields_set if name != "name"})

    return environments


def _read_config_file(path: Path) -> dict[str, Environment]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config.not_found", path=str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("config.invalid_toml", path=str(path), error=str(error)) from None
    except OSError as error:
        raise ConfigError("config.invalid_toml", path=str(path), error=error.strerror or str(error)) from None

    sections = data.get("environments", {})
    if not isinstance(sections, dict):
        raise ConfigError("config.invalid_layout", path=str(path), name="environments")
    environments = {}
    for name, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError("config.invalid_layout", path=str(path), name=f"environments.{name}")
        try:
            environment = Environment(name=name, **values)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise ConfigError(
                "config.invalid_environment",
                path=str(path),
                environment=name,
                field=field,
                # pydantic prefixes the message of a validator's ValueError with "Value error, ".
                error=first["msg"].removeprefix("Value error, "),
            ) from None
        if not environment.workdir.is_absolute():
            environment.workdir = (path.parent / environment.workdir).resolve()
        # Other relative paths in the file are relative to the file too.
        if environment.kubernetes and environment.kubernetes.kubeconfig:
            environment.kubernetes.kubeconfig = (path.parent / environment.kubernetes.kubeconfig).resolve()
        if environment.nginx:
            environment.nginx.files = {key: (path.parent / value).resolve()
                                       for key, value in environment.nginx.files.items()}
        environments[name] = environment
    return environments


def default_environment() -> Environment:
    """Return the environment used when no --env is given: the current directory."""
    return Environment(name="default")
