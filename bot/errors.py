"""Errors shown to users, each addressed by a message catalog key.

    PostmergeError            anything a user should read, translated by key
    ├── ConfigError           postmerge.toml or POSTMERGE_* settings are invalid
    ├── RunbookError          the runbook cannot be read or planned
    ├── StoreError            the run store refused an operation
    │   ├── RunNotFound
    │   └── RunConflict       another run has the runbook and environment
    ├── StepError             a step failed in a way its executor explains
    └── UsageError            a command line that cannot be carried out
"""

from __future__ import annotations


class PostmergeError(Exception):
    def __init__(self, key: str, /, **params: object) -> None:
        super().__init__(key)
        self.key = key
        self.params = params

    def render(self, locale: str | None = None) -> str:
        from bot.i18n import translate

        return translate(self.key, locale, **self.params)

    def __str__(self) -> str:
        return self.render("en")


class ConfigError(PostmergeError):
    pass


class RunbookError(PostmergeError):
    pass


class StoreError(PostmergeError):
    pass


class RunNotFound(StoreError):
    pass


class RunConflict(StoreError):
    pass


class StepError(PostmergeError):
    """A step failure with a translated reason; `exit_code` is kept when a process ran."""

    def __init__(self, key: str, /, *, exit_code: int | None = None, **params: object) -> None:
        super().__init__(key, **params)
        self.exit_code = exit_code


class UsageError(PostmergeError):
    pass
