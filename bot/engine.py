"""The engine: carries out a stored plan step by step, durably.

Each transition (a step marked running, succeeded, failed) is committed with
its event before the effect it announces, so after a crash the store records
which effects may have happened. A step found `running` when a run is picked
up again was interrupted: it runs again if its executor reports that a
repeat is safe, and otherwise a person decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.config import Environment
from bot.errors import PostmergeError, RunConflict, StepError, UsageError
from bot.gates import CHOICES, GateAnswer, GateRequest, Interaction, Notifier, RunEvent
from bot.i18n import translate
from bot.plan import Plan, Step
from steps import GATE_KINDS, OutputBuffer, StepContext, load_executor
from steps.shell import group_alive
from storage import RunRecord, StepRecord, Store, owner_id

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
ABORT_POLL_SECONDS = 0.5
DONE_STEP_STATUSES = ("succeeded", "skipped", "approved")
OUTPUT_TAIL_LINES = 20


class RunAborted(Exception):
    def __init__(self, actor: str) -> None:
        super().__init__(actor)
        self.actor = actor


class RunPaused(Exception):
    """A gate received no decision: stdin closed, or --yes met a question it must not decide."""


class StepFailed(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class RunOutcome:
    run_id: str
    status: str
    error: str | None = None
    failed_step: str | None = None

    @property
    def exit_code(self) -> int:
        return {"completed": 0, "rolled_back": 0, "failed": 1}.get(self.status, 2)


@dataclass
class _Progress:
    phase_started: dict[int, float] = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        store: Store,
        environment: Environment,
        interaction: Interaction,
        notifiers: list[Notifier] | None = None,
        *,
        home: Path,
        locale: str = "ja",
        actor: str | None = None,
        on_interrupted: str | None = None,
    ) -> None:
        self.store = store
        self.environment = environment
        self.interaction = interaction
        self.notifiers = notifiers or []
        self.home = home
        self.locale = locale
        self.actor = actor
        self.on_interrupted = on_interrupted
        self.owner = owner_id()
        self._abort_actor: str | None = None
        self._drive_task: asyncio.Task | None = None
        self._interruptible = False
        self._failed_step: Step | None = None

    # -- starting ---------------------------------------------------------

    async def start(self, plan: Plan, *, started_by: str | None, kind: str = "run",
                    parent_run_id: str | None = None, steps: list[Step] | None = None) -> str:
        ordered = steps if steps is not None else plan.steps()
        return await self.store.create_run(
            plan.model_dump(mode="json"),
            [{"id": step.id, "kind": step.kind, "title": step.title, "phase": step.phase} for step in ordered],
            runbook=plan.runbook,
            runbook_path=plan.runbook_path,
            environment=plan.environment,
            started_by=started_by,
            kind=kind,
            parent_run_id=parent_run_id,
            # An emergency action must run even while another run of the runbook holds the lock.
            lock=kind != "emergency",
        )

    async def reopen(self, run_id: str, *, skip_failed: bool = False) -> bool:
        """Make a failed run resumable, so its failed step runs again; return whether it was failed.

        With skip_failed, the failed step is marked skipped instead, and the
        run goes on after it. A run or a rollback that failed is reopened,
        only while no other run of the same runbook and environment is active.
        """
        run = await self.store.get_run(run_id)
        if run.status != "failed" or run.kind not in ("run", "rollback"):
            return False
        await self.store.take_lock(run.id)
        if skip_failed and run.failed_step:
            await self.store.update_step(run.id, run.failed_step, status="skipped", decided_by=self.actor,
                                         event_type="step.skipped", actor=self.actor)
        await self.store.update_run(run.id, status="paused", error=None, failed_step=None, failed_phase=None,
                                    finished_at=None, event_type="run.reopened", actor=self.actor,
                                    event_data={"skipped": run.failed_step} if skip_failed else None)
        return True

    async def reopen_phase(self, run_id: str, phase: int) -> None:
        """Make every step of a phase pending again, so driving the run repeats the phase from its first step.

        This is "修正後、Phase 6を再実行": after a fix, the traffic shift starts
        again at its first weight. The run must have failed, been aborted or be
        paused, and no other run of its runbook and environment may be active.
        """
        run = await self.store.get_run(run_id)
        if run.kind != "run" or run.status not in ("failed", "aborted", "paused"):
            raise UsageError("engine.rerun_not_allowed", run_id=run.id,
                             status=translate(f"status.{run.status}", self.locale))
        plan = Plan.model_validate(run.plan)
        phase_steps = [step for step in plan.steps() if step.phase == phase]
        if not phase_steps:
            raise UsageError("engine.unknown_phase", run_id=run.id, phase=phase,
                             phases=", ".join(str(item.number) for item in plan.phases))
        if run.status != "paused":
            await self.store.take_lock(run.id)
        for step in phase_steps:
            await self.store.update_step(run.id, step.id, status="pending", finished_at=None, error=None,
                                         event_type="step.reopened", actor=self.actor)
        await self.store.update_run(run.id, status="paused", error=None, failed_step=None, failed_phase=None,
                                    finished_at=None, current_phase=None, abort_requested_by=None,
                                    event_type="run.phase_reopened", actor=self.actor, event_data={"phase": phase})

    def artifacts_dir(self, run: RunRecord) -> Path:
        # A rollback shares the artifacts of the run it undoes, such as its backup.
        return self.home / "runs" / (run.parent_run_id or run.id)

    # -- driving ----------------------------------------------------------

    async def drive(self, run_id: str) -> RunOutcome:
        """Carry a run forward until it completes, fails, is aborted or pauses for a decision."""
        run = await self.store.get_run(run_id)
        if run.status not in ("pending", "running", "waiting", "paused"):
            raise UsageError("engine.run_not_active", run_id=run.id, status=translate(f"status.{run.status}", self.locale))
        if not await self.store.claim(run.id, self.owner):
            raise RunConflict("engine.run_owned", run_id=run.id, owner=run.owner or "?")
        if run.status != "pending":
            await self.store.take_lock(run.id)

        plan = Plan.model_validate(run.plan)
        steps = {step.id: step for step in self._ordered_steps(run, plan)}
        self._drive_task = asyncio.current_task()
        watchers = [
            asyncio.create_task(self._heartbeat(run.id)),
            asyncio.create_task(self._watch_abort(run.id)),
        ]
        try:
            return await self._drive(run, plan, steps)
        finally:
            for watcher in watchers:
                watcher.cancel()
            for watcher in watchers:
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await self.store.release(run.id, self.owner)

    def _ordered_steps(self, run: RunRecord, plan: Plan) -> list[Step]:
        if run.kind in ("rollback", "emergency"):
            return [step for group in plan.rollback for step in group.steps]
        return plan.steps()

    async def _drive(self, run: RunRecord, plan: Plan, steps: dict[str, Step]) -> RunOutcome:
        now = time.time()
        if run.status == "pending":
            await self.store.update_run(run.id, status="running", started_at=now, owner=self.owner,
                                        event_type="run.started", actor=run.started_by)
            await self._emit("run.started", run.id, plan, data={"kind": run.kind, "started_at": now})
        records = {record.step_id: record for record in await self.store.steps(run.id)}
        if run.status != "pending":
            await self.store.update_run(run.id, status="running", event_type="run.resumed", actor=self.actor)
            await self._emit("run.resumed", run.id, plan, data=self._resume_state(run, steps, records))

        progress = _Progress()
        current_phase: int | None = run.current_phase
        try:
            for step_id, step in steps.items():
                record = records[step_id]
                if record.status in DONE_STEP_STATUSES:
                    continue
                if step.phase != current_phase:
                    if current_phase is not None:
                        await self._finish_phase(run, plan, current_phase, records)
                    current_phase = step.phase
                    progress.phase_started.setdefault(step.phase or 0, time.time())
                    await self.store.update_run(run.id, current_phase=step.phase, event_type="phase.started",
                                                event_data={"phase": step.phase})
                    await self._emit("phase.started", run.id, plan, phase=step.phase)
                self._check_abort()
                if record.status in ("running", "interrupted"):
                    record = await self._recover_interrupted(run, plan, step, record)
                    if record.status in DONE_STEP_STATUSES:
                        records[step_id] = record
                        continue
                record = await self._run_step(run, plan, step, record)
                records[step_id] = record
            if current_phase is not None:
                await self._finish_phase(run, plan, current_phase, records)
        except RunPaused:
            await self.store.update_run(run.id, status="paused", event_type="run.paused")
            await self._emit("run.paused", run.id, plan, data={"kind": run.kind})
            return RunOutcome(run_id=run.id, status="paused")
        except RunAborted as aborted:
            return await self._finish_run(run, plan, "aborted", error=translate(
                "engine.aborted_by", self.locale, actor=aborted.actor))
        except StepFailed as failure:
            failed = self._failed_step
            await self.store.update_run(run.id, failed_phase=failed.phase if failed else None,
                                        failed_step=failed.id if failed else None)
            return await self._finish_run(run, plan, "failed", error=failure.message,
                                          failed_step=failed.id if failed else None)

        return await self._finish_run(run, plan, "completed")

    def _resume_state(self, run: RunRecord, steps: dict[str, Step], records: dict[str, StepRecord]) -> dict:
        """Describe what a resumed run already did, so progress views start where it stopped."""
        done = [step_id for step_id, record in records.items() if record.status in DONE_STEP_STATUSES]
        finished_phases: dict[int, float] = {}
        started_phases: dict[int, float] = {}
        for number in {step.phase for step in steps.values() if step.phase is not None}:
            phase_records = [records[step.id] for step in steps.values() if step.phase == number]
            started = [record.started_at for record in phase_records if record.started_at]
            finished = [record.finished_at for record in phase_records if record.finished_at]
            if phase_records and all(record.status in DONE_STEP_STATUSES for record in phase_records):
                finished_phases[number] = (max(finished) - min(started)) if started and finished else 0.0
            elif started:
                started_phases[number] = time.time() - min(started)
        started_at = run.started_at or time.time()
        return {"kind": run.kind, "done_steps": done, "finished_phases": finished_phases,
                "started_phases": started_phases,
                "started_at": started_at, "elapsed_seconds": time.time() - started_at}

    async def _finish_phase(self, run: RunRecord, plan: Plan, phase: int | None, records: dict[str, StepRecord]) -> None:
        phase_steps = [records[step.id] for step in self._ordered_steps(run, plan) if step.phase == phase]
        started = [record.started_at for record in phase_steps if record.started_at]
        finished = [record.finished_at for record in phase_steps if record.finished_at]
        actual = (max(finished) - min(started)) if started and finished else 0.0
        await self.store.append_event(run.id, "phase.finished", data={"phase": phase, "actual_seconds": actual})
        await self._emit("phase.finished", run.id, plan, phase=phase, data={"actual_seconds": actual})

    async def _finish_run(self, run: RunRecord, plan: Plan, status: str, *, error: str | None = None,
                          failed_step: str | None = None) -> RunOutcome:
        await self.store.update_run(run.id, status=status, finished_at=time.time(), error=error,
                                    event_type=f"run.{status}", event_data={"error": error} if error else None)
        log.info("run %s finished: status=%s runbook=%s", run.id, status, run.runbook)
        if run.kind == "rollback" and run.parent_run_id and status == "completed":
            await self.store.update_run(run.parent_run_id, status="rolled_back", event_type="run.rolled_back",
                                        event_data={"rollback_run_id": run.id})
        incident_events = await self._update_incident(run, plan, status)
        await self._emit(f"run.{status}", run.id, plan, data={"error": error, "failed_step": failed_step,
                                                             "kind": run.kind, "parent_run_id": run.parent_run_id})
        for event_type, data in incident_events:
            await self._emit(event_type, run.id, plan, data=data)
        return RunOutcome(run_id=run.id, status=status, error=error, failed_step=failed_step)

    async def _update_incident(self, run: RunRecord, plan: Plan, status: str) -> list[tuple[str, dict]]:
        """Open, ask again or close the incident of a run that just ended; return the events to announce.

        The store changes here, before any notifier runs, so nothing reads a
        rolled-back run whose incident is still open.
        """
        from bot import incidents

        failed = self._failed_step
        events: list[tuple[str, dict]] = []
        try:
            if run.kind == "run" and status == "completed":
                incident = await self.store.incident_of_run(run.id)
                if incident is not None and incident.open:
                    actor = incident.action_by or self.actor
                    if await self.store.close_incident(incident.id, "retried", actor):
                        events.append(("incident.closed",
                                       {"incident": incident.id, "resolution": "retried", "actor": actor}))
            elif run.kind == "run" and (status == "failed" or (
                    status == "aborted"
                    and incidents.traffic_phase(plan, (await self.store.get_run(run.id)).current_phase))):
                incident, fresh = await incidents.open_for_run(self.store, run.id, status, failed)
                if fresh:
                    events.append(("incident.opened",
                                   {"incident": incident.id, "reason": incident.reason, "round": incident.round}))
            elif run.kind == "rollback" and run.parent_run_id:
                parent = await self.store.incident_of_run(run.parent_run_id)
                if parent is None or not parent.open:
                    return events
                if status == "completed":
                    if await self.store.close_incident(parent.id, "rolled_back", run.started_by):
                        events.append(("incident.closed",
                                       {"incident": parent.id, "resolution": "rolled_back", "actor": run.started_by,
                                        "parent_run_id": run.parent_run_id}))
                elif status in ("failed", "aborted"):
                    opened = await incidents.open_for_failed_rollback(self.store, run, failed)
                    if opened is not None and opened[1]:
                        events.append(("incident.opened",
                                       {"incident": opened[0].id, "reason": opened[0].reason,
                                        "round": opened[0].round, "parent_run_id": run.parent_run_id}))
        except PostmergeError:
            raise
        except Exception:  # noqa: BLE001 - the run's own state is committed; its incident is logged for a person
            log.exception("run %s: the incident could not be recorded", run.id)
        return events

    # -- one step ---------------------------------------------------------

    async def _run_step(self, run: RunRecord, plan: Plan, step: Step, record: StepRecord) -> StepRecord:
        # A gate that was waiting when the run paused keeps its attempt, so a decision
        # recorded while no process drove the run is found again.
        attempt = record.attempt if record.status == "waiting" and record.attempt else record.attempt + 1

        # A manual step's own confirmation is its approval, so the person is asked once.
        if step.requires_approval and step.kind != "approval" and step.automated:
            await self.store.update_step(run.id, step.id, status="waiting", event_type="step.waiting",
                                         run_values={"status": "waiting"})
            try:
                answer = await self._gate(run, plan, step, attempt, "approval")
            except RunAborted as aborted:
                await self.store.update_step(run.id, step.id, status="rejected", decided_by=aborted.actor,
                                             finished_at=time.time(), event_type="step.rejected", actor=aborted.actor)
                raise
            await self.store.update_run(run.id, status="running")
            if answer.decision != "approved":
                await self.store.update_step(run.id, step.id, status="rejected", decided_by=answer.actor,
                                             finished_at=time.time(), event_type="step.rejected", actor=answer.actor)
                raise RunAborted(answer.actor)

        if step.kind in GATE_KINDS or not step.automated:
            return await self._run_gate_step(run, plan, step, record, attempt)

        executor = load_executor(step.kind)
        started = time.time()
        await self.store.update_step(run.id, step.id, status="running", attempt=attempt, started_at=started,
                                     finished_at=None, exit_code=None, error=None,
                                     event_type="step.started", event_data={"attempt": attempt})
        await self._emit("step.started", run.id, plan, step=step, phase=step.phase)

        previous = dict(record.data or {})
        if step.undoes and run.parent_run_id:
            from bot.rollback import inverse_source

            previous = {**inverse_source(await self.store.steps(run.parent_run_id), step), **previous}

        output = OutputBuffer(self.environment.output_limit_bytes,
                              on_line=lambda line: self._output_line(run.id, step, line),
                              mask=self.environment.secret_values())
        context = StepContext(
            run_id=run.id,
            step=step,
            environment=self.environment,
            artifacts_dir=self.artifacts_dir(run),
            output=output,
            timeout_seconds=step.timeout_seconds or self.environment.default_timeout_seconds,
            locale=self.locale,
            previous_data=previous,
            checkpoint=lambda data: self.store.checkpoint_step(run.id, step.id, data),
            running_process_groups=lambda: self._running_groups(run),
        )
        status, error, exit_code, data = "succeeded", None, None, dict(record.data or {})
        self._interruptible = True
        try:
            async with asyncio.timeout(context.timeout_seconds):
                result = await self._execute(executor, context)
            exit_code = result.exit_code
            data.update(result.data)
        except TimeoutError:
            status = "timed_out"
            error = translate("engine.step_timed_out", self.locale, step=step.title,
                              seconds=_format_seconds(context.timeout_seconds))
        except StepError as failure:
            status, error, exit_code = "failed", failure.render(self.locale), failure.exit_code
            details = _failure_details(failure.params)
            if details:
                data["failure"] = details
        except asyncio.CancelledError:
            if self._abort_actor is None:
                raise
            _uncancel()
            status = "failed"
            error = translate("engine.aborted_by", self.locale, actor=self._abort_actor)
        finally:
            self._interruptible = False

        finished = time.time()
        log.info("run %s step %s finished: status=%s kind=%s seconds=%.3f exit_code=%s",
                 run.id, step.id, status, step.kind, finished - started, exit_code)
        await self.store.update_step(
            run.id, step.id, status=status, finished_at=finished, exit_code=exit_code, error=error,
            output=output.text(), data=data, event_type=f"step.{status}",
            event_data={"exit_code": exit_code, "seconds": round(finished - started, 3), "error": error},
        )
        await self._emit(f"step.{status}", run.id, plan, step=step, phase=step.phase,
                         data={"seconds": finished - started, "error": error, "exit_code": exit_code,
                               "tail": output.tail(OUTPUT_TAIL_LINES)})
        if step.kind in ("traffic", "monitor") and self._abort_actor is None:
            await self._record_traffic(run, step, succeeded=status == "succeeded")
        if self._abort_actor is not None:
            raise RunAborted(self._abort_actor)
        if status != "succeeded":
            self._failed_step = step
            raise StepFailed(status, error or status)
        return _replace(record, status=status, attempt=attempt, started_at=started, finished_at=finished,
                        exit_code=exit_code, data=data)

    async def _execute(self, executor, context: StepContext):
        if context.step.undoes:
            return await executor.rollback(context)
        return await executor.execute(context)

    async def _run_gate_step(self, run: RunRecord, plan: Plan, step: Step, record: StepRecord,
                             attempt: int) -> StepRecord:
        kind = "approval" if step.kind == "approval" else "manual"
        started = time.time()
        await self.store.update_step(run.id, step.id, status="waiting", attempt=attempt, started_at=started,
                                     event_type="step.waiting", run_values={"status": "waiting"})
        try:
            answer = await self._gate(run, plan, step, attempt, kind)
        except RunAborted as aborted:
            await self.store.update_step(run.id, step.id, status="rejected", decided_by=aborted.actor,
                                         finished_at=time.time(), event_type="step.rejected", actor=aborted.actor)
            raise
        status = {"approved": "approved", "done": "succeeded", "skipped": "skipped"}.get(answer.decision)
        finished = time.time()
        if status is None:
            await self.store.update_step(run.id, step.id, status="rejected", decided_by=answer.actor,
                                         finished_at=finished, event_type="step.rejected", actor=answer.actor,
                                         run_values={"status": "running"})
            raise RunAborted(answer.actor)
        await self.store.update_step(run.id, step.id, status=status, decided_by=answer.actor, finished_at=finished,
                                     event_type=f"step.{status}", actor=answer.actor,
                                     run_values={"status": "running"})
        await self._emit(f"step.{status}", run.id, plan, step=step, phase=step.phase,
                         data={"seconds": finished - started, "actor": answer.actor})
        return _replace(record, status=status, attempt=attempt, started_at=started, finished_at=finished,
                        decided_by=answer.actor)

    async def _gate(self, run: RunRecord, plan: Plan, step: Step, attempt: int, kind: str) -> GateAnswer:
        approval_id = await self.store.request_decision(run.id, step.id, attempt, kind)
        existing = await self.store.get_decision(approval_id)
        if existing["decision"] is not None:
            return GateAnswer(existing["decision"], existing["decided_by"])

        await self._emit(f"gate.{kind}", run.id, plan, step=step, phase=step.phase)
        choices = CHOICES[kind]
        if kind == "manual" and step.requires_approval:
            # A person carries out a gated step by hand: it may be done or the run stopped, never skipped.
            choices = ("done", "abort")
        request = GateRequest(
            run_id=run.id, kind=kind, step=step, attempt=attempt, approval_id=approval_id,
            started_by=run.started_by, locale=self.locale, choices=choices,
            details=self._gate_details(step, kind) + await self._readings_details(run, step),
        )
        self._interruptible = True
        try:
            answer = await self.interaction.answer(request)
        except asyncio.CancelledError:
            if self._abort_actor is None:
                raise
            _uncancel()
            raise RunAborted(self._abort_actor) from None
        finally:
            self._interruptible = False
        if answer.decision == "defer":
            raise RunPaused()
        won, row = await self.store.decide(approval_id, answer.decision, answer.actor)
        if not won:
            return GateAnswer(row["decision"], row["decided_by"])
        return answer

    async def _record_traffic(self, run: RunRecord, step: Step, *, succeeded: bool) -> None:
        """Record blue's share after a traffic or monitor step; after a failed shift, send all traffic to green first.

        A monitor step that fails has already sent traffic to green itself. An
        abort leaves traffic where it is, so a person can see it in `status`.
        """
        if self.environment.traffic is None:
            return
        from steps.traffic import current_weight, send_all_to_green

        if step.kind == "traffic" and succeeded:
            await self.store.append_event(run.id, "traffic.changed", step_id=step.id, data={"weight": step.weight})
            return
        if succeeded:
            return
        try:
            if step.kind == "traffic":
                seconds = await send_all_to_green(self.environment)
                self._output_line(run.id, step, translate("engine.traffic_reset", self.locale, seconds=f"{seconds:.2f}"))
                await self.store.append_event(run.id, "traffic.reset", step_id=step.id, data={"seconds": seconds})
            weight = await current_weight(self.environment)
        except Exception as error:  # noqa: BLE001 - the step already failed; this failure is reported beside it
            log.error("run %s: could not send traffic back to green after %s failed: %s", run.id, step.id, error)
            await self.store.append_event(run.id, "traffic.reset_failed", step_id=step.id, data={"error": str(error)})
            return
        await self.store.append_event(run.id, "traffic.changed", step_id=step.id, data={"weight": weight})

    async def _readings_details(self, run: RunRecord, step: Step) -> list[str]:
        """Describe the monitor window that just ended, for the approval of the next traffic shift."""
        if step.kind != "traffic":
            return []
        monitors = [record for record in await self.store.steps(run.id)
                    if record.kind == "monitor" and record.status == "succeeded" and record.finished_at]
        if not monitors:
            return []
        window = (max(monitors, key=lambda record: record.finished_at).data or {}).get("window") or {}
        if not window:
            return []

        def number(value, digits: int) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        return [translate("gate.readings", self.locale, p95=number(window.get("p95_ms"), 0),
                          error_rate=number(window.get("error_rate_percent"), 2),
                          throughput=number(window.get("throughput_rps"), 1),
                          requests=window.get("requests", "-"), seconds=number(window.get("seconds"), 0))]

    def _gate_details(self, step: Step, kind: str) -> list[str]:
        details: list[str] = []
        if step.commands:
            details.extend(step.commands)
        if step.approval_note:
            details.append(translate("gate.approval_note", self.locale, note=step.approval_note))
        if step.manual_reason:
            details.append(translate(step.manual_reason, self.locale, **step.reason_params()))
        details.extend(step.instructions)
        return details

    # -- interruptions ----------------------------------------------------

    async def _recover_interrupted(self, run: RunRecord, plan: Plan, step: Step, record: StepRecord) -> StepRecord:
        """Decide what to do with a step that was running when its process died."""
        if record.status == "running":
            await self.store.update_step(run.id, step.id, status="interrupted", event_type="step.interrupted",
                                         event_data={"attempt": record.attempt})
        pgid = (record.data or {}).get("pgid")
        if pgid and group_alive(pgid, (record.data or {}).get("pid_start")):
            # The step's process outlived the engine: stop it before anything runs again.
            from steps.shell import stop_group

            await stop_group(int(pgid), self.environment.kill_grace_seconds)
            await self.store.append_event(run.id, "step.orphan_stopped", step_id=step.id, data={"pgid": pgid})

        if step.kind in GATE_KINDS or not step.automated or load_executor(step.kind).repeat_safe(step):
            return _replace(record, status="pending")

        if self.on_interrupted is not None:
            answer = GateAnswer(self.on_interrupted, self.actor or "cli")
            approval_id = await self.store.request_decision(run.id, step.id, record.attempt, "interrupted")
            won, row = await self.store.decide(approval_id, answer.decision, answer.actor)
            if not won:
                answer = GateAnswer(row["decision"], row["decided_by"])
        else:
            if run.kind == "run":
                await self._open_interrupted_incident(run, plan, step, record)
            answer = await self._gate(run, plan, step, record.attempt, "interrupted")

        if answer.decision == "retry":
            return _replace(record, status="pending")
        if answer.decision in ("done", "skipped"):
            status = "succeeded" if answer.decision == "done" else "skipped"
            await self.store.update_step(run.id, step.id, status=status, decided_by=answer.actor,
                                         finished_at=time.time(), event_type=f"step.{status}", actor=answer.actor)
            return _replace(record, status=status)
        raise RunAborted(answer.actor)

    async def _open_interrupted_incident(self, run: RunRecord, plan: Plan, step: Step, record: StepRecord) -> None:
        """Open an incident for an interrupted step that a person must decide, unless it was decided already."""
        from bot import incidents

        approval_id = await self.store.request_decision(run.id, step.id, record.attempt, "interrupted")
        if (await self.store.get_decision(approval_id))["decision"] is not None:
            return
        incident, fresh = await incidents.open_for_interrupted(self.store, run.id, step, approval_id)
        if fresh:
            await self._emit("incident.opened", run.id, plan,
                             data={"incident": incident.id, "reason": incident.reason, "round": incident.round})

    async def _running_groups(self, run: RunRecord) -> list[int]:
        """Return live process groups of steps of this run (or of the run it rolls back)."""
        target = run.parent_run_id or run.id
        groups = []
        for record in await self.store.steps(target):
            pgid = (record.data or {}).get("pgid")
            if record.status in ("running", "interrupted") and pgid and group_alive(pgid, record.data.get("pid_start")):
                groups.append(int(pgid))
        return groups

    # -- background -------------------------------------------------------

    async def _heartbeat(self, run_id: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self.store.heartbeat(run_id, self.owner)
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried on the next beat
                log.warning("run %s: heartbeat failed", run_id, exc_info=True)

    async def _watch_abort(self, run_id: str) -> None:
        """Poll for an abort requested from elsewhere and cancel the step or gate in progress."""
        while True:
            await asyncio.sleep(ABORT_POLL_SECONDS)
            try:
                actor = await self.store.abort_requested(run_id)
            except Exception:  # noqa: BLE001 - the next poll tries again
                log.warning("run %s: abort poll failed", run_id, exc_info=True)
                continue
            if actor:
                self._abort_actor = actor
                if self._interruptible and self._drive_task is not None:
                    self._drive_task.cancel()
                return

    def _check_abort(self) -> None:
        if self._abort_actor is not None:
            raise RunAborted(self._abort_actor)

    # -- notifications ----------------------------------------------------

    async def _emit(self, event_type: str, run_id: str, plan: Plan, *, step: Step | None = None,
                    phase: int | None = None, data: dict | None = None) -> None:
        event = RunEvent(type=event_type, run_id=run_id, plan=plan, step=step, phase=phase, data=data or {})
        for notifier in self.notifiers:
            try:
                await notifier.notify(event)
            except PostmergeError:
                raise
            except Exception:  # noqa: BLE001 - a broken notifier must never stop a run
                log.warning("run %s: notifier failed on %s", run_id, event_type, exc_info=True)

    def _output_line(self, run_id: str, step: Step, line: str) -> None:
        for notifier in self.notifiers:
            try:
                notifier.output_line(run_id, step, line)
            except Exception:  # noqa: BLE001 - a broken notifier must never stop a run
                log.debug("run %s: output notifier failed", run_id, exc_info=True)


async def abort_unowned(store: Store, run: RunRecord, actor: str, locale: str,
                        on_stop=None) -> None:
    """Abort a run that no live process drives: stop step processes that outlived their engine, then mark it aborted.

    on_stop(step_id, pgid) is called before each process group is stopped, so a caller can say so.
    """
    from steps.shell import stop_group

    for record in await store.steps(run.id):
        pgid = (record.data or {}).get("pgid")
        if record.status in ("running", "interrupted") and pgid and group_alive(pgid, record.data.get("pid_start")):
            if on_stop is not None:
                on_stop(record.step_id, pgid)
            await stop_group(int(pgid), 10.0)
            await store.update_step(run.id, record.step_id, status="interrupted", event_type="step.orphan_stopped",
                                    actor=actor, event_data={"pgid": pgid})
    await store.update_run(run.id, status="aborted", finished_at=time.time(),
                           error=translate("engine.aborted_by", locale, actor=actor),
                           event_type="run.aborted", actor=actor)


def _uncancel() -> None:
    # The abort was handled here, so later awaits of this task must not see it again.
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _replace(record: StepRecord, **values) -> StepRecord:
    from dataclasses import replace

    return replace(record, **values)


def _failure_details(params: dict) -> dict:
    """Keep the readings a failed step reported, for its incident; values that are not plain data are dropped."""
    import json

    details = {}
    for key in ("readings", "window_readings", "thresholds", "traffic_reset_seconds"):
        value = params.get(key)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        if value is not None:
            details[key] = value
    return details


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}"
