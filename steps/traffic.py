"""The traffic step: set the share of requests that blue (v2) gets, and put all of them on green (v1) to undo it.

The runbook's Phase 6 lines

    1. 10% トラフィック → Blue (v2)
    3. 問題なければ 50% → Blue
    5. 問題なければ 100% → Blue

and its rollback line (トラフィック 100% → Green (v1)) become traffic steps.
The share comes from `Step.weight` (an int from 0 to 100, blue's percentage),
or from `Step.params["weight"]` when the planner puts it there. No other
`params` key is read. Where the share is set comes from the environment's
`traffic` section (bot.config.TrafficSettings):

provider "nginx": the weighted upstream `upstream_name` (default
"backend-api") in `upstream_file` gets one `server` line for `green_server`
and one for `blue_server`:

    10%   server GREEN weight=90;   server BLUE weight=10;
    0%    server GREEN weight=100;  server BLUE down;
    100%  server GREEN down;        server BLUE weight=100;

nginx weights are 1 or more, so 0% and 100% mark the other server `down`.
Only the upstream block is rewritten. Its other directives, such as
`keepalive`, stay, but comments inside it are dropped. The rest of the file
keeps its bytes. The file is replaced atomically, then tested with
`environment.nginx.test_command` and nginx reloaded with
`environment.nginx.reload_command` (without them: `nginx -t` and
`nginx -s reload`), each run as an argument list, never through a shell. The
reload is nginx's graceful one: new workers start with the new weights, old
workers finish the requests they accepted, so no request is dropped. A failed
test puts the previous file back and fails the step.

provider "kubernetes": the ingress-nginx canary Ingress `canary_ingress` in
`namespace` (else `environment.kubernetes.namespace`) gets the annotations
`nginx.ingress.kubernetes.io/canary: "true"` and
`nginx.ingress.kubernetes.io/canary-weight: "<weight>"` (scaled when the
Ingress sets `canary-weight-total`), with a JSON merge patch through
kubernetes_asyncio, connected as kubernetes steps connect.

StepResult.data: {"provider", "previous_weight" (int or None when it could
not be read), "weight", and "file" and "upstream" (nginx) or "ingress" and
"namespace" (kubernetes)}. The step's rollback, and any undo, sends all
traffic to green (weight 0), whatever the previous weight was. Setting a
weight is idempotent, so the step is safe to repeat.

Without a step, `send_all_to_green(environment)` puts every request on green
at once (for the monitor step and the engine) and returns the seconds it
took, and `current_weight(environment)` reads blue's share.
"""

from __future__ import annotations

import asyncio
import math
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, OutputBuffer, StepContext, StepResult
from steps.files import replace_file

if TYPE_CHECKING:
    from bot.config import Environment, TrafficSettings

CANARY = "nginx.ingress.kubernetes.io/canary"
CANARY_WEIGHT = "nginx.ingress.kubernetes.io/canary-weight"
CANARY_WEIGHT_TOTAL = "nginx.ingress.kubernetes.io/canary-weight-total"
INGRESS_RESOURCE = "ingresses.networking.k8s.io"
# Characters of an nginx server address (host:port, [v6]:port, unix:/path);
# anything else could change the config around the server line.
SERVER_ADDRESS = re.compile(r"[A-Za-z0-9._:\[\]/-]+")
NEW_FILE_MODE = 0o644
DEFAULT_TIMEOUT_SECONDS = 30.0


class TrafficExecutor(BaseExecutor):
    kind = "traffic"

    def repeat_safe(self, step: Step) -> bool:
        # Setting a weight is idempotent.
        return True

    def has_inverse(self, step: Step) -> bool:
        return True

    async def execute(self, context: StepContext) -> StepResult:
        weight = step_weight(context.step)
        return await _set_weight(context, weight, rollback=False)

    async def rollback(self, context: StepContext) -> StepResult:
        # Undo means every request on green, never the weight before the step.
        return await _set_weight(context, 0, rollback=True)


def step_weight(step: Step) -> int:
    """Return blue's share the step sets, from Step.weight or params["weight"]."""
    value: Any = step.weight if step.weight is not None else step.params.get("weight")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise StepError("traffic.invalid_weight", step=step.id, title=step.title, weight=value)
    return value


async def send_all_to_green(environment: Environment, *, output: OutputBuffer | None = None,
                            timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, locale: str | None = None) -> float:
    """Put all traffic on green (v1) at once, without a step, and return the seconds it took.

    Raises StepError as the step would. Output lines go to `output` when given.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    context = _standalone_context(environment, output, timeout_seconds, locale, weight=0)
    await _set_weight(context, 0, rollback=True)
    return loop.time() - started


async def current_weight(environment: Environment, *, timeout_seconds: float = 10.0) -> int | None:
    """Return blue's (v2's) share in percent as the upstream file or the canary annotation sets it.

    None when the share cannot be determined (the upstream has neither server up).
    Raises StepError when the settings, file or Ingress are missing.
    """
    context = _standalone_context(environment, None, timeout_seconds, None, weight=None)
    settings = _traffic_settings(context)
    if settings.provider == "nginx":
        target = _NginxTarget.of(context, settings)
        return target.weight_of(_decode(target.read()))
    async with _kube_session(context) as session:
        ingress = await _KubeTarget.of(context, settings).read(session)
        return _annotation_weight(ingress)


# -- the change ------------------------------------------------------------------


async def _set_weight(context: StepContext, weight: int, *, rollback: bool) -> StepResult:
    settings = _traffic_settings(context)
    if settings.provider == "nginx":
        data = await _set_nginx_weight(context, settings, weight)
        target = f"{data['upstream']} in {data['file']}"
    else:
        data = await _set_kubernetes_weight(context, settings, weight)
        target = f"Ingress {data['namespace']}/{data['ingress']}"
    previous = data["previous_weight"]
    shown = "?" if previous is None else previous
    if rollback:
        summary = translate("traffic.rollback_summary", context.locale, previous=shown,
                            provider=settings.provider, target=target)
    else:
        summary = translate("traffic.summary", context.locale, weight=weight, green=100 - weight, previous=shown,
                            provider=settings.provider, target=target)
    return StepResult(ok=True, summary=summary, data=data)


def _write_change(context: StepContext, provider: str, target: str, previous: int | None, weight: int) -> None:
    if previous == weight:
        context.output.write(translate("traffic.output_unchanged", context.locale, weight=weight,
                                       provider=provider, target=target))
    else:
        context.output.write(translate("traffic.output_set", context.locale, previous="?" if previous is None
                                       else previous, weight=weight, provider=provider, target=target))


# -- nginx -----------------------------------------------------------------------


@dataclass
class _NginxTarget:
    path: Path
    upstream: str
    green: str
    blue: str

    @classmethod
    def of(cls, context: StepContext, settings: TrafficSettings) -> _NginxTarget:
        for key in ("upstream_file", "green_server", "blue_server"):
            if not getattr(settings, key):
                raise StepError("traffic.missing_setting", environment=context.environment.name,
                                provider="nginx", key=key)
        for key in ("green_server", "blue_server"):
            if not SERVER_ADDRESS.fullmatch(getattr(settings, key)):
                raise StepError("traffic.bad_server", environment=context.environment.name, key=key,
                                value=getattr(settings, key))
        path = context.environment.resolve(str(settings.upstream_file))
        return cls(path, settings.upstream_name, settings.green_server, settings.blue_server)

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise StepError("traffic.upstream_file_missing", path=str(self.path), upstream=self.upstream) from None
        except OSError as error:
            raise StepError("traffic.read_failed", path=str(self.path), error=_os_error(error)) from None

    def block(self, text: str) -> Any:
        from steps.nginx import ConfigSyntaxError, parse_config

        try:
            directives = parse_config(text)
        except ConfigSyntaxError as error:
            raise StepError("traffic.upstream_unparseable", path=str(self.path), line=error.line,
                            error=error.reason) from None
        found = _find_upstream(directives, self.upstream)
        if found is None:
            raise StepError("traffic.upstream_not_found", path=str(self.path), upstream=self.upstream)
        others = [child.args[0] for child in found.children or []
                  if child.name == "server" and child.args and child.args[0] not in (self.green, self.blue)]
        if others:
            raise StepError("traffic.upstream_other_servers", path=str(self.path), upstream=self.upstream,
                            servers=", ".join(others), green=self.green, blue=self.blue)
        return found

    def weight_of(self, text: str) -> int | None:
        return upstream_weight(self.block(text), self.green, self.blue)

    def render(self, text: str, weight: int) -> str:
        """Return the text with the upstream block's green and blue server lines set for the weight."""
        block = self.block(text)
        newline = "\r\n" if "\r\n" in text else "\n"
        line_start = text.rfind("\n", 0, block.start) + 1
        outer = text[line_start:block.start]
        outer = outer if not outer.strip() else ""
        indent = outer + "    "
        lines = []
        servers_written = False
        for child in block.children or []:
            if child.name == "server":
                if not servers_written:
                    lines.extend(server_lines(self.green, self.blue, weight))
                    servers_written = True
                continue
            lines.append(" ".join(child.text(text).split()) if child.children is None else child.text(text))
        if not servers_written:
            lines[:0] = server_lines(self.green, self.blue, weight)
        body = "".join(f"{indent}{line}{newline}" for line in lines)
        head = text[block.start:block.open]
        return f"{text[:block.start]}{head.rstrip()} {{{newline}{body}{outer}}}{text[block.end:]}"


def _find_upstream(directives: list[Any], name: str) -> Any:
    for directive in directives:
        if directive.children is None:
            continue
        if directive.name == "upstream" and directive.args == [name]:
            return directive
        if directive.name == "http":
            found = _find_upstream(directive.children, name)
            if found is not None:
                return found
    return None


def server_lines(green: str, blue: str, weight: int) -> list[str]:
    """Return the upstream's two server lines that send `weight` percent of requests to blue."""
    if weight <= 0:
        return [f"server {green} weight=100;", f"server {blue} down;"]
    if weight >= 100:
        return [f"server {green} down;", f"server {blue} weight=100;"]
    return [f"server {green} weight={100 - weight};", f"server {blue} weight={weight};"]


def render_upstream(name: str, green: str, blue: str, weight: int) -> str:
    """Return a whole upstream block for a new upstream file, such as the sandbox's."""
    lines = "".join(f"    {line}\n" for line in server_lines(green, blue, weight))
    return f"upstream {name} {{\n{lines}}}\n"


def upstream_weight(block: Any, green: str, blue: str) -> int | None:
    """Return blue's share in percent from an upstream block's server directives; None when neither is up."""
    shares = {green: 0, blue: 0}
    for child in block.children or []:
        if child.name != "server" or not child.args or child.args[0] not in shares:
            continue
        options = child.args[1:]
        if "down" in options or "backup" in options:
            continue
        server_weight = 1
        for option in options:
            if option.startswith("weight="):
                try:
                    server_weight = int(option.split("=", 1)[1])
                except ValueError:
                    return None
        shares[child.args[0]] += server_weight
    total = shares[green] + shares[blue]
    if total == 0:
        return None
    return round(100 * shares[blue] / total)


async def _set_nginx_weight(context: StepContext, settings: TrafficSettings, weight: int) -> dict[str, Any]:
    from steps.nginx import check_config, reload_argv, run_command

    target = _NginxTarget.of(context, settings)
    original = target.read()
    text = _decode(original)
    previous = target.weight_of(text)
    new = _encode(target.render(text, weight))
    data = {"provider": "nginx", "file": str(target.path), "upstream": target.upstream,
            "previous_weight": previous, "weight": weight}
    _write_change(context, "nginx", f"{target.upstream} in {target.path}", previous, weight)
    await context.save(data)

    wrote = new != original
    if wrote:
        await asyncio.to_thread(_write_atomically, target.path, new)
    try:
        failure = await check_config(context)
    except BaseException:
        # The test could not run or the step was cancelled: an untested change must not stay.
        if wrote:
            _write_atomically(target.path, original)
            context.output.write(translate("traffic.output_put_back", context.locale, path=target.path))
        raise
    if failure is not None:
        if wrote:
            await asyncio.to_thread(_write_atomically, target.path, original)
            context.output.write(translate("traffic.output_put_back", context.locale, path=target.path))
        raise StepError("traffic.validate_failed", exit_code=failure.code, command=failure.command,
                        path=str(target.path), upstream=target.upstream, weight=weight, errors=failure.errors)

    argv, _ = reload_argv(context)
    code, lines = await run_command(context, argv)
    if code != 0:
        raise StepError("traffic.reload_failed", exit_code=code, code=code, command=shlex.join(argv), path=str(target.path),
                        weight=weight, errors=" / ".join(lines[-5:]) or "(no output)")
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        replace_file(path, data, new_file_mode=NEW_FILE_MODE)
    except OSError as error:
        raise StepError("traffic.write_failed", path=str(path), error=_os_error(error)) from None


# -- kubernetes ------------------------------------------------------------------


@dataclass
class _KubeTarget:
    name: str
    namespace: str

    @classmethod
    def of(cls, context: StepContext, settings: TrafficSettings) -> _KubeTarget:
        if not settings.canary_ingress:
            raise StepError("traffic.missing_setting", environment=context.environment.name,
                            provider="kubernetes", key="canary_ingress")
        kubernetes = context.environment.kubernetes
        if kubernetes is None:
            raise StepError("kubernetes.not_configured", environment=context.environment.name)
        return cls(settings.canary_ingress, settings.namespace or kubernetes.namespace)

    @property
    def label(self) -> str:
        return f"ingress.networking.k8s.io/{self.name}"

    async def read(self, session: Any) -> Any:
        api = session.api("NetworkingV1Api")
        ingress = await session.call("get", self.label, INGRESS_RESOURCE, self.namespace,
                                     api.read_namespaced_ingress, self.name, self.namespace, not_found_ok=True)
        if ingress is None:
            raise StepError("traffic.canary_ingress_missing", ingress=self.name, namespace=self.namespace,
                            server=session.server)
        return ingress


def _annotation_weight(ingress: Any) -> int | None:
    annotations = (ingress.metadata.annotations if ingress.metadata else None) or {}
    if str(annotations.get(CANARY, "")).lower() != "true":
        return 0
    try:
        weight = int(annotations.get(CANARY_WEIGHT) or 0)
        total = int(annotations.get(CANARY_WEIGHT_TOTAL) or 100)
    except ValueError:
        return None
    if total <= 0:
        return None
    return max(0, min(100, round(100 * weight / total)))


def _kube_session(context: StepContext) -> Any:
    # The connection is set up exactly as kubernetes steps set it up.
    from steps.kubernetes import _SessionScope

    return _SessionScope(context)


async def _set_kubernetes_weight(context: StepContext, settings: TrafficSettings, weight: int) -> dict[str, Any]:
    target = _KubeTarget.of(context, settings)
    async with _kube_session(context) as session:
        ingress = await target.read(session)
        previous = _annotation_weight(ingress)
        annotations = (ingress.metadata.annotations if ingress.metadata else None) or {}
        try:
            total = int(annotations.get(CANARY_WEIGHT_TOTAL) or 100)
        except ValueError:
            total = 100
        value = math.floor(weight * total / 100) if total > 0 else weight
        data = {"provider": "kubernetes", "ingress": target.name, "namespace": target.namespace,
                "previous_weight": previous, "weight": weight}
        _write_change(context, "kubernetes", f"Ingress {target.namespace}/{target.name}", previous, weight)
        await context.save(data)
        patch = {"metadata": {"annotations": {CANARY: "true", CANARY_WEIGHT: str(value)}}}
        api = session.api("NetworkingV1Api")
        await session.call("patch", target.label, INGRESS_RESOURCE, target.namespace,
                           api.patch_namespaced_ingress, target.name, target.namespace, patch,
                           _content_type="application/merge-patch+json")
        context.output.write(f"{CANARY_WEIGHT}={value} on {target.label} (namespace {target.namespace})")
    return data


# -- helpers ---------------------------------------------------------------------


def _traffic_settings(context: StepContext) -> TrafficSettings:
    settings = context.environment.traffic
    if settings is None:
        raise StepError("traffic.not_configured", environment=context.environment.name)
    return settings


def _standalone_context(environment: Environment, output: OutputBuffer | None, timeout_seconds: float,
                        locale: str | None, weight: int | None) -> StepContext:
    """Return a context for changes made without a step, such as putting all traffic on green."""
    step = Step(id="traffic", title="traffic", kind="traffic", source_line=0, weight=weight)
    return StepContext(
        run_id="",
        step=step,
        environment=environment,
        artifacts_dir=Path(tempfile.gettempdir()),
        output=output or OutputBuffer(64_000),
        timeout_seconds=timeout_seconds,
        locale=locale or environment.locale or "ja",
    )


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _os_error(error: OSError) -> str:
    return f"{type(error).__name__}: {error.strerror or error}"
