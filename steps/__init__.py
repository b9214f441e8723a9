"""Step executors, one module per step kind, imported only when a step needs it."""

from __future__ import annotations

from importlib import import_module

from steps.base import BaseExecutor, Executor, OutputBuffer, StepContext, StepResult

__all__ = [
    "BaseExecutor",
    "Executor",
    "OutputBuffer",
    "StepContext",
    "StepResult",
    "GATE_KINDS",
    "has_executor",
    "load_executor",
]

# Kinds that a module of this package carries out. Gates (manual and
# approval) are decided by a person through the engine's interaction.
_EXECUTORS = {
    "shell": "steps.shell:ShellExecutor",
    "http": "steps.http:HttpExecutor",
    "sql": "steps.sql:SqlExecutor",
    "env": "steps.env:EnvExecutor",
    "nginx": "steps.nginx:NginxExecutor",
    "kubernetes": "steps.kubernetes:KubernetesExecutor",
    "cdn": "steps.cdn:CdnExecutor",
    "datadog": "steps.datadog:DatadogExecutor",
    "sentry": "steps.sentry:SentryExecutor",
    "traffic": "steps.traffic:TrafficExecutor",
    "monitor": "steps.monitor:MonitorExecutor",
}
GATE_KINDS = ("manual", "approval")

_loaded: dict[str, Executor] = {}


def has_executor(kind: str) -> bool:
    return kind in _EXECUTORS or kind in GATE_KINDS


def load_executor(kind: str) -> Executor:
    """Import and return the executor for kind; the import happens once."""
    if kind not in _loaded:
        module_name, _, class_name = _EXECUTORS[kind].partition(":")
        executor_class = getattr(import_module(module_name), class_name)
        _loaded[kind] = executor_class()
    return _loaded[kind]
