"""The nginx step: add a location block to a site file, validate the config and reload nginx.

The runbook task

    - [ ] Nginx設定更新: `/etc/nginx/sites-available/api.conf`
      - 追加: ```nginx location /api/v2 { ... } ```
      - 再起動: `sudo nginx -t && sudo systemctl reload nginx`

and the two lines of its rollback plan (`git checkout nginx.conf.backup`,
`sudo systemctl reload nginx`) are carried out with these `Step.params`:

    action    "insert" (default), "restore" or "reload".
    file      str: the config file as the runbook writes it, such as
              "/etc/nginx/sites-available/api.conf". Required for insert;
              optional for restore (the only file this run kept a copy of);
              unused for reload.
    block     str: the location block of the 追加 fence, for insert.
    validate  str: the runbook's test command, such as "sudo nginx -t"
              (default "nginx -t").
    reload    str: the runbook's reload command, such as
              "sudo systemctl reload nginx" (default "nginx -s reload").
    server_name  str, optional: the server block to insert into, by one of
              its server_name values. Without it the block goes into the
              first server block of the file.

The file edited is `environment.nginx.files[file]` when the environment maps
the path, else `file` itself (relative to the environment's workdir).

insert: when the chosen server block already has a location with the same
modifier and path, the file is left as it is. Otherwise the block goes just
before the server's closing brace, indented like the server's other
directives. The file is replaced atomically (temp file, fsync, rename). Before
the first change in a run, a copy of the file is kept under
`<artifacts_dir>/nginx/` (the rollback run shares the artifacts), and its
path is in StepResult.data["backup"]. Then the config is tested and nginx
reloaded. A failed test puts the previous file back, reports nginx's error
lines and fails the step.

restore: puts the kept copy back and tests the config; it does not reload,
which the runbook's next line does. When no copy was kept in this run (the
insert never ran), there is nothing to restore.

reload: tests the config, then reloads.

The rollback of an insert restores the kept copy when the file is as the
step left it. When the file has changed since, only the inserted location
block is removed. Then it tests and reloads.

Commands: the test is `environment.nginx.test_command` when set, else
`validate` without `sudo`. The reload is `environment.nginx.reload_command`
when set, else `reload` without `sudo`, with `systemctl reload nginx` and
`service nginx reload` mapped to `nginx -s reload`. Commands run as
argument lists (shlex.split), never through a shell. Their text comes from
the runbook and postmerge.toml, never from Slack.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import shutil
import signal
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.config import NginxSettings
from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult
from steps.files import replace_file

ACTIONS = ("insert", "restore", "reload")
DEFAULT_VALIDATE = "nginx -t"
DEFAULT_RELOAD = "nginx -s reload"
NGINX_RELOAD = ["nginx", "-s", "reload"]
# Reload commands of service managers that need root, run as nginx's own signal instead.
SERVICE_RELOADS = (
    ["systemctl", "reload", "nginx"],
    ["systemctl", "reload", "nginx.service"],
    ["service", "nginx", "reload"],
)
NGINX_BINARIES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
# nginx -t and a reload signal return in well under a second.
COMMAND_TIMEOUT_SECONDS = 60.0
KILL_WAIT_SECONDS = 5.0
ERROR_MARKERS = ("[emerg]", "[alert]", "[crit]", "[error]", "test failed")
NEW_FILE_MODE = 0o644
BACKUP_INDEX = "backups.json"


class NginxExecutor(BaseExecutor):
    kind = "nginx"

    def repeat_safe(self, step: Step) -> bool:
        # insert leaves a file that has the location as it is, restore writes
        # the same copy again, and a reload may be repeated.
        return True

    def has_inverse(self, step: Step) -> bool:
        # Read without _action's check, because a rollback plan is built before any step runs.
        return (step.params.get("action") or "insert") == "insert"

    async def execute(self, context: StepContext) -> StepResult:
        action = _action(context.step)
        if action == "restore":
            return await self._restore(context)
        if action == "reload":
            await _validate(context, None)
            await _reload(context, None)
            summary = translate("nginx.reload_summary", context.locale)
            return StepResult(ok=True, summary=summary, data={"action": "reload"})
        return await self._insert(context)

    async def _insert(self, context: StepContext) -> StepResult:
        step = context.step
        runbook_file = _param(step, "file")
        if not runbook_file:
            raise StepError("nginx.missing_file", step=step.id, title=step.title)
        block_text = _param(step, "block")
        if not block_text or not block_text.strip():
            raise StepError("nginx.missing_block", step=step.id, title=step.title, file=runbook_file)
        path = _real_path(context, runbook_file)
        original = _read(path, runbook_file, context)
        text = _decode(original)
        block = parse_location_block(block_text, runbook_file)
        server = find_server(text, path, runbook_file, _param(step, "server_name"))
        location = " ".join(block.args)

        earlier = context.previous_data if context.previous_data.get("path") == str(path) else {}
        data: dict[str, Any] = {
            "action": "insert",
            "file": runbook_file,
            "path": str(path),
            "location": location,
            "changed": bool(earlier.get("changed", False)),
            "written_sha256": earlier.get("written_sha256"),
        }
        data["backup"] = str(await asyncio.to_thread(keep_backup, context.artifacts_dir, path, original))
        context.output.write(translate("nginx.output_backup", context.locale, path=path, backup=data["backup"]))

        existing = find_location(server, block.args)
        wrote = False
        if existing is not None:
            context.output.write(translate("nginx.output_already_present", context.locale,
                                           location=location, path=path, line=existing.line))
            if _normalized(existing.text(text)) != _normalized(block.text(block_text)):
                context.output.write(translate("nginx.output_differs", context.locale, location=location))
        else:
            new_text, line = insert_block(text, server, block_text)
            data.update(changed=True, written_sha256=_sha256(_encode(new_text)))
            # Saved before the file changes, so a repeat after an interruption
            # finds that this run changed the file.
            await context.save(data)
            await asyncio.to_thread(write_atomically, path, _encode(new_text), runbook_file)
            wrote = True
            context.output.write(translate("nginx.output_inserted", context.locale,
                                           location=location, path=path, line=line))

        try:
            failure = await check_config(context)
        except BaseException:
            # The test could not run or the step was cancelled, and an untested
            # change must not stay in the file.
            if wrote:
                write_atomically(path, original, runbook_file)
                context.output.write(translate("nginx.output_put_back", context.locale, path=path))
                data.update(changed=False, written_sha256=None)
            raise
        if failure is not None:
            if not wrote and not data["changed"]:
                raise StepError("nginx.validate_failed", exit_code=failure.code, command=failure.command,
                                path=str(path), errors=failure.errors)
            if wrote:
                await asyncio.to_thread(write_atomically, path, original, runbook_file)
            else:
                # An earlier attempt of this step inserted the block.
                current = _decode(_read(path, runbook_file, context))
                removed = remove_location(current, path, runbook_file, block.args)
                await asyncio.to_thread(write_atomically, path, _encode(removed), runbook_file)
            context.output.write(translate("nginx.output_put_back", context.locale, path=path))
            data.update(changed=False, written_sha256=None)
            await context.save(data)
            old_config_fails = await check_config(context) is not None
            key = "nginx.insert_rejected_old_invalid" if old_config_fails else "nginx.insert_rejected"
            raise StepError(key, exit_code=failure.code, command=failure.command, path=str(path),
                            file=runbook_file, location=location, errors=failure.errors)

        await _reload(context, path)
        key = "nginx.summary_inserted" if wrote else "nginx.summary_present"
        summary = translate(key, context.locale, location=location, path=path)
        return StepResult(ok=True, summary=summary, data=data)

    async def _restore(self, context: StepContext) -> StepResult:
        step = context.step
        runbook_file = _param(step, "file")
        backups = read_backup_index(context.artifacts_dir)
        if runbook_file:
            path = _real_path(context, runbook_file)
        elif len(backups) == 1:
            path = Path(next(iter(backups)))
            runbook_file = str(path)
        elif not backups:
            context.output.write(translate("nginx.output_no_backups", context.locale))
            summary = translate("nginx.restore_nothing_summary", context.locale)
            return StepResult(ok=True, summary=summary, data={"action": "restore", "restored": False})
        else:
            raise StepError("nginx.restore_ambiguous", step=step.id, files=", ".join(sorted(backups)))

        backup = backups.get(str(path))
        if backup is None:
            context.output.write(translate("nginx.output_no_backup", context.locale, path=path))
            summary = translate("nginx.restore_nothing_summary", context.locale)
            return StepResult(ok=True, summary=summary,
                              data={"action": "restore", "file": runbook_file, "path": str(path), "restored": False})

        saved = _read_backup(Path(backup), path)
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            current = None
        except OSError as error:
            raise StepError("nginx.read_failed", file=str(path), error=_os_error(error)) from None
        if current == saved:
            context.output.write(translate("nginx.output_restore_unchanged", context.locale, path=path))
        else:
            await asyncio.to_thread(write_atomically, path, saved, runbook_file)
            context.output.write(translate("nginx.output_restored", context.locale, path=path, backup=backup))
        await _validate(context, path, "nginx.restore_rejected")
        summary = translate("nginx.restore_summary", context.locale, path=path)
        return StepResult(ok=True, summary=summary, data={
            "action": "restore", "file": runbook_file, "path": str(path), "backup": backup,
            "restored": current != saved,
        })

    async def rollback(self, context: StepContext) -> StepResult:
        data = context.previous_data
        step = context.step
        runbook_file = data.get("file") or _param(step, "file") or ""
        if not data.get("path") or "changed" not in data:
            raise StepError("nginx.rollback_without_data", step=step.id, file=runbook_file or "?")
        path = Path(data["path"])
        current = _read(path, runbook_file, context)
        location = data.get("location") or ""

        if not data["changed"]:
            context.output.write(translate("nginx.output_rollback_unchanged", context.locale, path=path))
            new = current
        elif data.get("written_sha256") == _sha256(current) and data.get("backup"):
            new = _read_backup(Path(data["backup"]), path)
            context.output.write(translate("nginx.output_restored", context.locale, path=path, backup=data["backup"]))
        else:
            args = shlex.split(location)
            text = _decode(current)
            if location and _contains_location(text, path, runbook_file, args):
                new = _encode(remove_location(text, path, runbook_file, args))
                context.output.write(translate("nginx.output_removed_block", context.locale,
                                               location=location, path=path))
            else:
                new = current
                context.output.write(translate("nginx.output_nothing_to_remove", context.locale,
                                               location=location, path=path))

        if new != current:
            await asyncio.to_thread(write_atomically, path, new, runbook_file)
        failure = await check_config(context)
        if failure is not None:
            if new != current:
                await asyncio.to_thread(write_atomically, path, current, runbook_file)
                context.output.write(translate("nginx.output_put_back", context.locale, path=path))
            raise StepError("nginx.rollback_rejected", exit_code=failure.code, command=failure.command,
                            path=str(path), errors=failure.errors)
        await _reload(context, path)
        summary = translate("nginx.rollback_summary", context.locale, location=location, path=path)
        return StepResult(ok=True, summary=summary, data={"file": runbook_file, "path": str(path),
                                                          "restored": new != current})


# -- nginx config text -------------------------------------------------------


@dataclass
class Directive:
    """One directive of an nginx config: its name, arguments and place in the text."""

    name: str
    args: list[str]
    start: int
    # The offset after its `;` or closing `}`.
    end: int
    line: int
    # For a block: the offset of its `{` and `}`, and its directives.
    open: int | None = None
    close: int | None = None
    children: list[Directive] | None = None

    def text(self, source: str) -> str:
        return source[self.start:self.end]


class ConfigSyntaxError(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


@dataclass
class _Token:
    kind: str  # "word", "{", "}" or ";"
    value: str
    start: int
    end: int
    line: int


@dataclass
class _Frame:
    directives: list[Directive] = field(default_factory=list)
    words: list[_Token] = field(default_factory=list)
    opener: Directive | None = None


def tokenize(text: str) -> list[_Token]:
    """Split config text into words, braces and semicolons, as nginx's parser does.

    A `#` at the start of a word begins a comment. Quotes group a word, and
    `\\` escapes the next character. `${name}` is part of a word.
    """
    tokens: list[_Token] = []
    index, line, length = 0, 1, len(text)
    while index < length:
        char = text[index]
        if char == "\n":
            line += 1
            index += 1
        elif char.isspace():
            index += 1
        elif char == "#":
            while index < length and text[index] != "\n":
                index += 1
        elif char in "{};":
            tokens.append(_Token(char, char, index, index + 1, line))
            index += 1
        elif char in "\"'":
            start, start_line = index, line
            index += 1
            value = []
            while index < length and text[index] != char:
                if text[index] == "\\" and index + 1 < length:
                    index += 1
                if text[index] == "\n":
                    line += 1
                value.append(text[index])
                index += 1
            if index >= length:
                raise ConfigSyntaxError(start_line, "unterminated quote")
            index += 1
            tokens.append(_Token("word", "".join(value), start, index, start_line))
        else:
            start = index
            while index < length:
                char = text[index]
                if char.isspace() or char in ";{}" and not (char == "{" and text[index - 1] == "$"):
                    break
                if char == "{" and text[index - 1] == "$":
                    closing = text.find("}", index)
                    index = length if closing < 0 else closing + 1
                    continue
                if char == "\\" and index + 1 < length:
                    index += 1
                index += 1
            tokens.append(_Token("word", text[start:index], start, index, line))
    return tokens


def parse_config(text: str) -> list[Directive]:
    """Return the top-level directives of config text; blocks have their children."""
    stack = [_Frame()]
    for token in tokenize(text):
        frame = stack[-1]
        if token.kind == "word":
            frame.words.append(token)
        elif token.kind == ";":
            if not frame.words:
                continue
            frame.directives.append(_directive(frame.words, token.end))
            frame.words = []
        elif token.kind == "{":
            if not frame.words:
                raise ConfigSyntaxError(token.line, "'{' without a directive name")
            opener = _directive(frame.words, token.end)
            opener.open, opener.children = token.start, []
            frame.directives.append(opener)
            frame.words = []
            stack.append(_Frame(opener=opener))
        else:
            if len(stack) == 1:
                raise ConfigSyntaxError(token.line, "unexpected '}'")
            if frame.words:
                # A directive without its `;`: kept, so that nginx -t reports it.
                frame.directives.append(_directive(frame.words, frame.words[-1].end))
            stack.pop()
            opener = frame.opener
            opener.children, opener.close, opener.end = frame.directives, token.start, token.end
    if len(stack) > 1:
        raise ConfigSyntaxError(stack[-1].opener.line, f"'{stack[-1].opener.name}' block is not closed")
    if stack[0].words:
        stack[0].directives.append(_directive(stack[0].words, stack[0].words[-1].end))
    return stack[0].directives


def _directive(words: list[_Token], end: int) -> Directive:
    return Directive(name=words[0].value, args=[word.value for word in words[1:]],
                     start=words[0].start, end=end, line=words[0].line)


def parse_location_block(block_text: str, runbook_file: str) -> Directive:
    """Return the one location block of the runbook's 追加 text."""
    try:
        directives = parse_config(block_text)
    except ConfigSyntaxError as error:
        raise StepError("nginx.invalid_block", file=runbook_file, line=error.line, error=error.reason) from None
    if len(directives) != 1 or directives[0].name != "location" or directives[0].children is None:
        raise StepError("nginx.block_not_location", file=runbook_file)
    if not directives[0].args:
        raise StepError("nginx.invalid_block", file=runbook_file, line=directives[0].line,
                        error="location without a path")
    return directives[0]


def _parse_file(text: str, path: Path, runbook_file: str) -> list[Directive]:
    try:
        return parse_config(text)
    except ConfigSyntaxError as error:
        raise StepError("nginx.file_unparseable", path=str(path), file=runbook_file,
                        line=error.line, error=error.reason) from None


def _servers(directives: list[Directive]) -> list[Directive]:
    found = []
    for directive in directives:
        if directive.children is None:
            continue
        if directive.name == "server":
            found.append(directive)
        elif directive.name in ("http", "stream"):
            found.extend(_servers(directive.children))
    return found


def find_server(text: str, path: Path, runbook_file: str, server_name: str | None) -> Directive:
    servers = _servers(_parse_file(text, path, runbook_file))
    if not servers:
        raise StepError("nginx.no_server_block", path=str(path), file=runbook_file)
    if not server_name:
        return servers[0]
    for server in servers:
        for child in server.children or []:
            if child.name == "server_name" and server_name in child.args:
                return server
    raise StepError("nginx.server_not_found", path=str(path), file=runbook_file, server_name=server_name)


def find_location(server: Directive, args: list[str]) -> Directive | None:
    for child in server.children or []:
        if child.name == "location" and child.args == args:
            return child
    return None


def _contains_location(text: str, path: Path, runbook_file: str, args: list[str]) -> bool:
    return any(find_location(server, args) for server in _servers(_parse_file(text, path, runbook_file)))


def insert_block(text: str, server: Directive, block_text: str) -> tuple[str, int]:
    """Return the text with the block before the server's closing brace, and the block's first line."""
    newline = "\r\n" if "\r\n" in text else "\n"
    indent = _inner_indent(text, server)
    lines = textwrap.dedent(block_text.replace("\r\n", "\n")).strip("\n").split("\n")
    body = newline.join(indent + line if line.strip() else "" for line in lines) + newline

    close = server.close
    line_start = text.rfind("\n", 0, close) + 1
    if text[line_start:close].strip():
        # The closing brace shares its line with other text: start a new line.
        body = newline + body
        insert_at = close
    else:
        insert_at = line_start
    before = text[:insert_at]
    previous_line = before.rstrip("\r\n").rsplit("\n", 1)[-1]
    if previous_line.strip() and not previous_line.rstrip().endswith("{"):
        body = newline + body
    new_text = before + body + text[insert_at:]
    block_start = insert_at + len(body) - len(body.lstrip("\r\n"))
    return new_text, new_text.count("\n", 0, block_start) + 1


def _inner_indent(text: str, server: Directive) -> str:
    for child in server.children or []:
        line_start = text.rfind("\n", 0, child.start) + 1
        prefix = text[line_start:child.start]
        if not prefix.strip():
            return prefix
    line_start = text.rfind("\n", 0, server.start) + 1
    outer = text[line_start:server.start]
    return (outer if not outer.strip() else "") + "    "


def remove_location(text: str, path: Path, runbook_file: str, args: list[str]) -> str:
    """Remove every location with these arguments from the file's server blocks, with its lines."""
    while True:
        location = None
        for server in _servers(_parse_file(text, path, runbook_file)):
            location = find_location(server, args)
            if location is not None:
                break
        if location is None:
            return text
        start = text.rfind("\n", 0, location.start) + 1
        if text[start:location.start].strip():
            start = location.start
        end = location.end
        line_end = text.find("\n", end)
        if not text[end:line_end if line_end >= 0 else len(text)].strip():
            end = len(text) if line_end < 0 else line_end + 1
        # Drop the blank line that separated the block from the one before it.
        previous_end = start - 1
        previous_start = text.rfind("\n", 0, max(previous_end, 0)) + 1
        if start > 0 and not text[previous_start:previous_end].strip():
            following = text[end:].lstrip(" \t")
            if following.startswith(("}", "\n", "\r\n")) or not following:
                start = previous_start
        text = text[:start] + text[end:]


def _normalized(text: str) -> list[str]:
    return [token.value for token in tokenize(text)]


# -- files -------------------------------------------------------------------


def keep_backup(artifacts_dir: Path, path: Path, content: bytes) -> Path:
    """Keep the file as it was before this run first changed it, and return the copy's path.

    A copy already kept in this run's artifacts is never replaced, so a
    repeated step or a second insert into the same file keeps the first one.
    """
    directory = artifacts_dir / "nginx"
    index = read_backup_index(artifacts_dir)
    existing = index.get(str(path))
    if existing and Path(existing).is_file():
        return Path(existing)
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    backup = directory / f"{path.name}.{digest}.backup"
    _write_file(backup, content)
    index[str(path)] = str(backup)
    _write_file(directory / BACKUP_INDEX, json.dumps(index, indent=2, sort_keys=True).encode("utf-8"))
    return backup


def read_backup_index(artifacts_dir: Path) -> dict[str, str]:
    """Return the copies kept in this run: edited file's path -> copy's path."""
    try:
        data = json.loads((artifacts_dir / "nginx" / BACKUP_INDEX).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return {str(key): str(value) for key, value in data.items()} if isinstance(data, dict) else {}


def _write_file(path: Path, data: bytes) -> None:
    try:
        replace_file(path, data)
    except OSError as error:
        raise StepError("nginx.backup_failed", backup=str(path), error=_os_error(error)) from None


def write_atomically(path: Path, data: bytes, runbook_file: str) -> None:
    """Replace the file's content in one step, keeping its mode, owner and symlink (see replace_file)."""
    try:
        replace_file(path, data, new_file_mode=NEW_FILE_MODE)
    except OSError as error:
        raise StepError("nginx.write_failed", path=str(path), file=runbook_file, error=_os_error(error)) from None


def _read(path: Path, runbook_file: str, context: StepContext) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        mapped = runbook_file in _settings(context).files
        key = "nginx.mapped_file_not_found" if mapped else "nginx.file_not_found"
        raise StepError(key, path=str(path), file=runbook_file, environment=context.environment.name) from None
    except OSError as error:
        raise StepError("nginx.read_failed", file=str(path), error=_os_error(error)) from None


def _read_backup(backup: Path, path: Path) -> bytes:
    try:
        return backup.read_bytes()
    except OSError as error:
        raise StepError("nginx.backup_missing", backup=str(backup), path=str(path), error=_os_error(error)) from None


def _real_path(context: StepContext, runbook_file: str) -> Path:
    mapped = _settings(context).files.get(runbook_file)
    if mapped is not None:
        return Path(mapped)
    return context.environment.resolve(runbook_file)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _os_error(error: OSError) -> str:
    return f"{type(error).__name__}: {error.strerror or error}"


# -- commands ----------------------------------------------------------------


def _settings(context: StepContext) -> NginxSettings:
    return context.environment.nginx or NginxSettings()


def _action(step: Step) -> str:
    action = step.params.get("action") or "insert"
    if action not in ACTIONS:
        raise StepError("nginx.unknown_action", step=step.id, action=action, actions=", ".join(ACTIONS))
    return action


def _param(step: Step, name: str) -> str | None:
    value = step.params.get(name)
    return None if value is None else str(value)


def strip_sudo(argv: list[str]) -> list[str]:
    """Drop a leading `sudo` and its options: the step runs as the bot's own user."""
    if argv and argv[0] == "sudo":
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
    return argv


def validate_argv(context: StepContext) -> tuple[list[str], str]:
    """Return the config test command as an argument list and as text."""
    configured = _settings(context).test_command
    if configured:
        return _split(configured, context), configured
    written = _param(context.step, "validate") or DEFAULT_VALIDATE
    return _resolve_binary(strip_sudo(_split(written, context))), written


def reload_argv(context: StepContext) -> tuple[list[str], str]:
    """Return the reload command as an argument list and as text."""
    configured = _settings(context).reload_command
    if configured:
        return _split(configured, context), configured
    written = _param(context.step, "reload") or DEFAULT_RELOAD
    argv = strip_sudo(_split(written, context))
    if argv in SERVICE_RELOADS:
        argv = list(NGINX_RELOAD)
    return _resolve_binary(argv), written


def _split(command: str, context: StepContext) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as error:
        raise StepError("nginx.bad_command", step=context.step.id, command=command, error=str(error)) from None
    if not argv or any(word in ("&&", "||", ";", "|") for word in argv):
        raise StepError("nginx.bad_command", step=context.step.id, command=command,
                        error="one command without shell operators is expected")
    return argv


def _resolve_binary(argv: list[str]) -> list[str]:
    # /usr/sbin is not on every user's PATH, but Debian installs nginx there.
    if argv and argv[0] == "nginx" and shutil.which("nginx") is None:
        for candidate in NGINX_BINARIES:
            if os.access(candidate, os.X_OK):
                return [candidate, *argv[1:]]
    return argv


@dataclass
class ConfigTestFailure:
    """A failed config test: its exit code, command and nginx's error lines."""

    code: int
    command: str
    errors: str


async def check_config(context: StepContext) -> ConfigTestFailure | None:
    """Run the config test; return None when it passes."""
    argv, written = validate_argv(context)
    code, lines = await run_command(context, argv)
    if code == 0:
        return None
    errors = [line for line in lines if any(marker in line for marker in ERROR_MARKERS)] or lines
    return ConfigTestFailure(code=code, command=shlex.join(argv), errors=" / ".join(errors[-5:]) or "(no output)")


async def _validate(context: StepContext, path: Path | None, key: str = "nginx.validate_failed") -> None:
    failure = await check_config(context)
    if failure is not None:
        raise StepError(key, exit_code=failure.code, command=failure.command,
                        path=str(path) if path else "-", errors=failure.errors)


async def _reload(context: StepContext, path: Path | None) -> None:
    argv, written = reload_argv(context)
    code, lines = await run_command(context, argv)
    if code != 0:
        raise StepError("nginx.reload_failed", exit_code=code, command=shlex.join(argv),
                        path=str(path) if path else "-", errors=" / ".join(lines[-5:]) or "(no output)")


async def run_command(context: StepContext, argv: list[str]) -> tuple[int, list[str]]:
    """Run one command without a shell, write its output to the step and return its exit code and lines."""
    context.output.write(f"$ {shlex.join(argv)}")
    timeout = min(COMMAND_TIMEOUT_SECONDS, context.timeout_seconds)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise StepError("nginx.command_not_found", command=shlex.join(argv), program=argv[0]) from None
    except PermissionError as error:
        raise StepError("nginx.command_failed_to_start", command=shlex.join(argv), error=_os_error(error)) from None
    try:
        raw, _ = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        await _kill(process)
        raise StepError("nginx.command_timed_out", command=shlex.join(argv), seconds=round(timeout, 1)) from None
    except BaseException:
        await _kill(process)
        raise
    lines = [line for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    for line in lines:
        context.output.write(line)
    return process.returncode or 0, lines


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), KILL_WAIT_SECONDS)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        pass
