"""Shell steps: one command in its own process group, with streamed output.

A timeout or an abort sends SIGINT to the whole group, then SIGKILL after the
environment's grace period. The group id is stored with the step before the
output is read, so a resumed run or a rollback can find a process that
outlived the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from pathlib import Path

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult

_SIGNAL_RUNNING = re.compile(r"^kill\s+-(?P<signal>INT|TERM|SIGINT|SIGTERM|2|15)\s+<pid>$")
_SIGNALS = {"INT": signal.SIGINT, "SIGINT": signal.SIGINT, "2": signal.SIGINT,
            "TERM": signal.SIGTERM, "SIGTERM": signal.SIGTERM, "15": signal.SIGTERM}
_READ_CHUNK = 65536


def read_dotenv(path: Path) -> dict[str, str]:
    """Read KEY=VALUE lines of a dotenv file; comments, blanks and `export ` prefixes are allowed."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def process_start_time(pid: int) -> str | None:
    """Return the kernel's start time of pid, to tell it from a later process with the same id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) follows the command name, which may contain spaces.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def group_alive(pgid: int, start_time: str | None) -> bool:
    if start_time is not None and process_start_time(pgid) not in (None, start_time):
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def stop_group(pgid: int, grace_seconds: float, first_signal: int = signal.SIGINT) -> bool:
    """Signal a process group, then SIGKILL it after the grace period; return whether it ended."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, first_signal)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if not group_alive(pgid, None):
            return True
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    await asyncio.sleep(0.05)
    return not group_alive(pgid, None)


class ShellExecutor(BaseExecutor):
    kind = "shell"

    async def execute(self, context: StepContext) -> StepResult:
        step = context.step
        command = step.run_command or (step.commands[0] if step.commands else "")
        if not command.strip():
            raise StepError("shell.empty_command", step=step.title)

        signal_match = _SIGNAL_RUNNING.match(command.strip())
        if signal_match:
            return await self._signal_running(context, _SIGNALS[signal_match.group("signal")])

        environment = context.environment
        workdir = environment.workdir
        if not workdir.is_dir():
            raise StepError("shell.workdir_missing", path=str(workdir), environment=environment.name)

        variables = dict(os.environ)
        for env_file in environment.env_files:
            variables.update(read_dotenv(environment.resolve(env_file)))
        variables.update(environment.variables)
        # Variables the planner sets for this step, such as the Sentry release of its task.
        variables.update({str(name): str(value) for name, value in (step.params.get("env") or {}).items()})
        variables.update(
            POSTMERGE_RUN_ID=context.run_id,
            POSTMERGE_STEP_ID=step.id,
            POSTMERGE_ARTIFACTS_DIR=str(context.artifacts_dir),
            PYTHONUNBUFFERED="1",
        )
        context.artifacts_dir.mkdir(parents=True, exist_ok=True)

        shell = shutil.which("bash") or "/bin/sh"
        try:
            process = await asyncio.create_subprocess_exec(
                shell,
                "-c",
                command,
                cwd=str(workdir),
                env=variables,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            raise StepError("shell.start_failed", command=command, error=str(error)) from None

        pgid = process.pid
        await context.save({"pgid": pgid, "pid_start": process_start_time(pgid), **context.previous_data})

        try:
            await self._pump(process, context)
            exit_code = await process.wait()
        except asyncio.CancelledError:
            await stop_group(pgid, environment.kill_grace_seconds)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise

        if exit_code != 0:
            raise StepError(
                "shell.exit_code",
                exit_code=exit_code,
                command=_first_line(command),
                code=exit_code,
                last_line=context.output.last_line or "-",
            )
        output_text = context.output.text()
        for expected in step.expect_output:
            if expected not in output_text:
                raise StepError("shell.expected_output_missing", exit_code=exit_code, expected=expected,
                                command=_first_line(command))
        return StepResult(ok=True, exit_code=exit_code, data={"pgid": pgid})

    async def _pump(self, process: asyncio.subprocess.Process, context: StepContext) -> None:
        assert process.stdout is not None
        pending = b""
        while True:
            chunk = await process.stdout.read(_READ_CHUNK)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                context.output.write(line.decode("utf-8", "replace"))
        if pending:
            context.output.write(pending.decode("utf-8", "replace"))

    async def _signal_running(self, context: StepContext, signum: int) -> StepResult:
        """Carry out `kill -INT <pid>`: signal the step processes of the run that still run."""
        groups = await context.running_process_groups() if context.running_process_groups else []
        if not groups:
            context.output.write(translate("shell.signal_nothing", context.locale))
            return StepResult(ok=True, summary="nothing running")
        for pgid in groups:
            context.output.write(translate("shell.signal_sending", context.locale, signal=signal.Signals(signum).name,
                                           pgid=pgid))
            ended = await stop_group(pgid, context.environment.kill_grace_seconds, signum)
            context.output.write(translate("shell.signal_ended" if ended else "shell.signal_still_running",
                                           context.locale, pgid=pgid))
        return StepResult(ok=True, summary=f"signalled {len(groups)} process group(s)")

    def repeat_safe(self, step: Step) -> bool:
        return False


def _first_line(command: str) -> str:
    lines = command.strip().splitlines()
    return lines[0] + (" …" if len(lines) > 1 else "")
