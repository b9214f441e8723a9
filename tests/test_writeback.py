"""Write-back into the runbook: only the lines it must change, atomically."""

from __future__ import annotations

import difflib
import shutil

import pytest

from bot.gates import RunEvent
from bot.parser import read_runbook
from bot.planner import build_plan
from bot.writeback import RunbookWriteback
from conftest import REAL_RUNBOOK


@pytest.fixture
def copy(tmp_path):
    path = tmp_path / "runbook.md"
    shutil.copyfile(REAL_RUNBOOK, path)
    return path


def plan_of(path):
    plan, _ = build_plan(read_runbook(path))
    return plan


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


async def test_writeback_run_lifecycle(copy):
    before = copy.read_text(encoding="utf-8")
    plan = plan_of(copy)
    writeback = RunbookWriteback(copy, "ja")
    migration = next(step for step in plan.steps() if step.commands == ["npm run migrate:data:v1-to-v2"])
    backup = next(step for step in plan.steps() if step.commands == ["npm run backup:api-data"])

    await writeback.notify(RunEvent("run.started", "r1", plan, data={"kind": "run"}))
    assert "## Status: in-progress" in copy.read_text(encoding="utf-8")

    await writeback.notify(RunEvent("step.succeeded", "r1", plan, step=backup, phase=2))
    await writeback.notify(RunEvent("step.succeeded", "r1", plan, step=migration, phase=2))
    await writeback.notify(RunEvent("phase.finished", "r1", plan, phase=2, data={"actual_seconds": 1500}))
    await writeback.notify(RunEvent("run.completed", "r1", plan, data={"kind": "run"}))

    after = copy.read_text(encoding="utf-8")
    assert "## Status: completed" in after
    assert "- [x] データ移行: `npm run migrate:data:v1-to-v2`" in after
    assert "- データベース: 所要時間 25分（予定 15分）" in after
    assert "- 予定より10分超過" in after
    assert "全タスク完了" in after
    removed = [line for line in changed_lines(before, after) if line.startswith("-")]
    # Only the status, the two merge fields and the ticked task changed; the rest was added at the end.
    assert removed == ["-## Status: pending", "-- Merged: (未マージ)", "-- Completed: (未完了)",
                       "-- [ ] データ移行: `npm run migrate:data:v1-to-v2`"]
    assert after.startswith(before.split("## Status")[0])
    assert after.endswith("\n")


async def test_writeback_keeps_crlf_and_missing_newline(tmp_path):
    path = tmp_path / "crlf.md"
    text = REAL_RUNBOOK.read_text(encoding="utf-8").replace("\n", "\r\n").rstrip("\r\n")
    path.write_bytes(text.encode("utf-8"))
    plan = plan_of(path)
    writeback = RunbookWriteback(path, "ja")
    await writeback.notify(RunEvent("run.failed", "r1", plan, data={"kind": "run", "error": "boom\nsecond line"}))
    raw = path.read_bytes().decode("utf-8")
    assert "\n" not in raw.replace("\r\n", "")
    assert "## Status: failed" in raw
    assert "- 原因: boom second line" in raw


async def test_writeback_rollback_unticks_tasks(copy):
    plan = plan_of(copy)
    writeback = RunbookWriteback(copy, "ja")
    migration = next(step for step in plan.steps() if step.commands == ["npm run migrate:data:v1-to-v2"])
    await writeback.notify(RunEvent("step.succeeded", "r1", plan, step=migration, phase=2))
    assert "- [x] データ移行" in copy.read_text(encoding="utf-8")

    rollback_plan = plan.model_copy(update={"undo_task_lines": [migration.task_line]})
    await writeback.notify(RunEvent("run.completed", "r2", rollback_plan, data={"kind": "rollback"}))
    text = copy.read_text(encoding="utf-8")
    assert "- [ ] データ移行" in text
    assert "## Status: rolled-back" in text
    assert "ロールバック完了" in text


async def test_writeback_finds_moved_task(copy):
    plan = plan_of(copy)
    migration = next(step for step in plan.steps() if step.commands == ["npm run migrate:data:v1-to-v2"])
    # Someone added two lines at the top while the run was going.
    copy.write_text("<!-- reviewed -->\n\n" + copy.read_text(encoding="utf-8"), encoding="utf-8")
    await RunbookWriteback(copy, "ja").notify(RunEvent("step.succeeded", "r1", plan, step=migration, phase=2))
    text = copy.read_text(encoding="utf-8")
    assert "- [x] データ移行: `npm run migrate:data:v1-to-v2`" in text
    assert text.startswith("<!-- reviewed -->\n\n# Post-Merge Tasks")
