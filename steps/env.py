"""The env step: set variables in a dotenv file, and put the old values back on rollback.

The file is edited as text so that every line the step does not set keeps its
bytes: comments, blank lines, CRLF line endings, other variables and their
quoting. The file is read the way python-dotenv reads it (the parser behind
pydantic-settings), so a key's previous value is the one its last assignment
gives, as python-dotenv loads it. Each write replaces the file atomically.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult
from steps.files import fsync_directory, replace_file

KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Values made only of these characters are written without quotes.
UNQUOTED_VALUE = re.compile(r"[A-Za-z0-9_./:@,+%^~=-]*")
# Values of keys with these words in their name are masked in the step output.
SECRET_KEY = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|PRIVATE|CREDENTIAL|(^|_)KEY$", re.IGNORECASE)
# Blank lines at the start of a parsed entry, which stay when the entry is removed.
LEADING_BLANK_LINES = re.compile(r"(?:[^\S\r\n]*(?:\r\n|\n|\r))*")
LEADING_WHITESPACE = re.compile(r"\s*")
EXPORT_PREFIX = re.compile(r"export[^\S\r\n]+")
LINE_END = re.compile(r"(?:\r\n|\n|\r)$")


class EnvExecutor(BaseExecutor):
    kind = "env"

    def repeat_safe(self, step: Step) -> bool:
        return True

    def has_inverse(self, step: Step) -> bool:
        return True

    async def execute(self, context: StepContext) -> StepResult:
        step = context.step
        path = _step_path(context)
        validate_variables(step.variables, path)

        original = _read(path)
        text = "" if original is None else _decode(original)
        data = _initial_data(context, path, existed=original is not None)

        for key, value in step.variables.items():
            previous = find_assignment(text, key, path)
            if key not in data["previous"]:
                data["previous"][key] = previous.value if previous else None
                data["previous_lines"][key] = previous.line if previous else None
            text, added_newline = set_variable(text, key, value, path)
            data["added_newline"] = data["added_newline"] or added_newline
            context.output.write(_change_line(key, value, previous.value if previous else None, path, context.locale))

        # The previous values are stored before the file changes, so a repeat
        # after an interruption still has the values from before the run.
        await context.save(data)
        new = _encode(text)
        if new != original:
            await asyncio.to_thread(write_atomically, path, new)
        else:
            context.output.write(translate("env.output_unchanged", context.locale, path=path))

        summary = translate("env.summary", context.locale, count=len(step.variables), file=str(path))
        return StepResult(ok=True, summary=summary, data=data)

    async def rollback(self, context: StepContext) -> StepResult:
        data = context.previous_data
        previous: dict[str, str | None] | None = data.get("previous")
        path = Path(data["file"]) if data.get("file") else _step_path(context)
        if previous is None:
            raise StepError("env.rollback_without_data", step=context.step.id, file=str(path))

        original = _read(path)
        if original is None:
            if data.get("existed"):
                raise StepError("env.rollback_file_missing", file=str(path))
            context.output.write(translate("env.output_nothing_to_restore", context.locale, path=path))
            summary = translate("env.rollback_summary", context.locale, count=0, file=str(path))
            return StepResult(ok=True, summary=summary, data={"file": str(path), "restored": []})

        text = _decode(original)
        previous_lines: dict[str, str | None] = data.get("previous_lines") or {}
        for key, value in previous.items():
            if value is None:
                text = remove_variable(text, key, path)
                context.output.write(translate("env.output_removed", context.locale, key=key, path=path))
            else:
                text = restore_variable(text, key, value, previous_lines.get(key), path)
                displayed = "***" if SECRET_KEY.search(key) else value
                context.output.write(translate("env.output_restored", context.locale, key=key, value=displayed, path=path))
        if data.get("added_newline"):
            text = LINE_END.sub("", text, count=1)

        if not data.get("existed", True) and text == "":
            await asyncio.to_thread(_remove_file, path)
            context.output.write(translate("env.output_deleted", context.locale, path=path))
        elif _encode(text) != original:
            await asyncio.to_thread(write_atomically, path, _encode(text))

        summary = translate("env.rollback_summary", context.locale, count=len(previous), file=str(path))
        return StepResult(ok=True, summary=summary, data={"file": str(path), "restored": sorted(previous)})


@dataclass
class Assignment:
    """The last assignment of a key in a dotenv file."""

    index: int
    value: str
    # The entry's text from the key (or `export`) to its line end, with any
    # inline comment, as the file has it.
    line: str


def validate_variables(variables: dict[str, str], path: Path) -> None:
    for key, value in variables.items():
        if not KEY_PATTERN.fullmatch(key):
            raise StepError("env.invalid_key", name=key, file=str(path))
        if "\n" in value or "\r" in value:
            raise StepError("env.value_has_newline", name=key, file=str(path))


def quote_value(value: str) -> str:
    """Return the value as python-dotenv reads it back unchanged, quoted only if needed.

    NOTE: python-dotenv expands `${NAME}` in values, quoted or not, when it
    loads with interpolation on (its default), and no quoting prevents that.
    """
    if UNQUOTED_VALUE.fullmatch(value):
        return value
    if "'" not in value and "\\" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def parse_entries(text: str, path: Path) -> list[Any]:
    """Split dotenv text into python-dotenv bindings whose texts join back to `text`."""
    from dotenv.parser import parse_stream

    bindings = list(parse_stream(io.StringIO(text)))
    if "".join(binding.original.string for binding in bindings) != text:
        raise StepError("env.unparseable", file=str(path))
    return bindings


def find_assignment(text: str, key: str, path: Path) -> Assignment | None:
    bindings = parse_entries(text, path)
    for index in range(len(bindings) - 1, -1, -1):
        binding = bindings[index]
        if binding.key == key and binding.value is not None:
            chunk = binding.original.string
            leading = LEADING_WHITESPACE.match(chunk)
            return Assignment(index=index, value=binding.value, line=chunk[leading.end() :])
    return None


def set_variable(text: str, key: str, value: str, path: Path) -> tuple[str, bool]:
    """Set key to value and return the new text and whether a final newline was added.

    The last assignment of the key is replaced in place, keeping its `export`
    prefix, indentation and line ending, but not an inline comment. A key
    without one is appended on a new line.
    """
    assignment = find_assignment(text, key, path)
    if assignment is None:
        newline = "\r\n" if "\r\n" in text else "\n"
        added_newline = bool(text) and not text.endswith(("\n", "\r"))
        if added_newline:
            text += newline
        return text + f"{key}={quote_value(value)}{newline}", added_newline

    def replace(chunk: str) -> str:
        leading = LEADING_WHITESPACE.match(chunk).group(0)
        rest = chunk[len(leading) :]
        export = EXPORT_PREFIX.match(rest)
        prefix = leading + (export.group(0) if export else "")
        line_end = LINE_END.search(chunk)
        return f"{prefix}{key}={quote_value(value)}{line_end.group(0) if line_end else ''}"

    return _replace_entry(text, assignment.index, replace, path), False


def remove_variable(text: str, key: str, path: Path) -> str:
    """Remove every assignment of key, keeping the blank lines before each."""
    while (assignment := find_assignment(text, key, path)) is not None:
        text = _replace_entry(
            text,
            assignment.index,
            lambda chunk: LEADING_BLANK_LINES.match(chunk).group(0),
            path,
        )
    return text


def restore_variable(text: str, key: str, value: str, line: str | None, path: Path) -> str:
    """Set key back to value, using the entry's original text when it gives that value."""
    assignment = find_assignment(text, key, path)
    if assignment is None or line is None:
        return set_variable(text, key, value, path)[0]

    def replace(chunk: str) -> str:
        leading = LEADING_WHITESPACE.match(chunk).group(0)
        return leading + line

    restored = _replace_entry(text, assignment.index, replace, path)
    check = find_assignment(restored, key, path)
    if check is None or check.value != value:
        return set_variable(text, key, value, path)[0]
    return restored


def _replace_entry(text: str, index: int, replace: Callable[[str], str], path: Path) -> str:
    chunks = [binding.original.string for binding in parse_entries(text, path)]
    chunks[index] = replace(chunks[index])
    return "".join(chunks)


def _step_path(context: StepContext) -> Path:
    step = context.step
    if not step.file:
        raise StepError("env.missing_file", step=step.id, title=step.title)
    return context.environment.resolve(step.file)


def _initial_data(context: StepContext, path: Path, existed: bool) -> dict[str, Any]:
    """Return the step data, keeping what an earlier attempt on the same file recorded."""
    earlier = context.previous_data
    if earlier.get("file") == str(path) and isinstance(earlier.get("previous"), dict):
        return {
            "file": str(path),
            "existed": bool(earlier.get("existed", existed)),
            "previous": dict(earlier["previous"]),
            "previous_lines": dict(earlier.get("previous_lines") or {}),
            "added_newline": bool(earlier.get("added_newline", False)),
        }
    return {
        "file": str(path),
        "existed": existed,
        "previous": {},
        "previous_lines": {},
        "added_newline": False,
    }


def _change_line(key: str, value: str, previous: str | None, path: Path, locale: str) -> str:
    secret = SECRET_KEY.search(key) is not None
    displayed = "***" if secret else value
    if previous is None:
        return translate("env.output_added", locale, key=key, value=displayed, path=path)
    if previous == value:
        return translate("env.output_already_set", locale, key=key, value=displayed, path=path)
    displayed_previous = "***" if secret else previous
    return translate("env.output_set", locale, key=key, value=displayed, path=path, previous=displayed_previous)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StepError("env.read_failed", file=str(path), error=_os_error(error)) from None


# Undecodable bytes survive a round trip as lone surrogates.
def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def write_atomically(path: Path, data: bytes) -> None:
    """Replace the file's content in one step, keeping its mode, owner and symlink (see replace_file)."""
    try:
        replace_file(path, data)
    except OSError as error:
        raise StepError("env.write_failed", file=str(path), error=_os_error(error)) from None


def _remove_file(path: Path) -> None:
    try:
        path.unlink()
    except OSError as error:
        raise StepError("env.write_failed", file=str(path), error=_os_error(error)) from None
    fsync_directory(path.parent)


def _os_error(error: OSError) -> str:
    return f"{type(error).__name__}: {error.strerror or error}"
