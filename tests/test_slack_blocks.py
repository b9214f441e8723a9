"""Block Kit messages stay within Slack's limits, whatever the run produces."""

from __future__ import annotations

import time

from bot.parser import read_runbook
from bot.planner import build_plan
from bot.slack.blocks import (
    MAX_BLOCKS,
    MAX_BUTTON_CHARS,
    MAX_HEADER_CHARS,
    MAX_MESSAGE_BLOCK_CHARS,
    MAX_SECTION_CHARS,
    PhaseView,
    RunView,
    StepReport,
    block_chars,
    output_block,
    phase_reply,
    root_message,
)
from bot.slack.text import cut_end, mask_secrets, tail_lines
from bot.slack.views import build_run_view
from conftest import REAL_RUNBOOK
from storage import RunRecord, StepRecord


def assert_within_limits(text: str, blocks: list[dict]) -> None:
    assert len(text) <= 4000
    assert len(blocks) <= MAX_BLOCKS
    assert block_chars(blocks) <= MAX_MESSAGE_BLOCK_CHARS
    for block in blocks:
        assert "type" in block
        if block["type"] == "section":
            assert len(block["text"]["text"]) <= MAX_SECTION_CHARS
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= MAX_HEADER_CHARS
        if block["type"] == "context":
            assert len(block["elements"]) <= 10
        for element in block.get("elements", []):
            if element.get("type") == "button":
                assert len(element["text"]["text"]) <= MAX_BUTTON_CHARS


def real_plan():
    plan, _ = build_plan(read_runbook(REAL_RUNBOOK))
    return plan


def record(run_id: str, step, status: str, started: float | None, finished: float | None,
           output: str = "") -> StepRecord:
    return StepRecord(run_id=run_id, step_id=step.id, position=0, phase=step.phase, kind=step.kind, title=step.title,
                      status=status, attempt=1, started_at=started, finished_at=finished, exit_code=0,
                      output=output, error=None, data={}, decided_by=None)


def test_root_message_of_real_runbook():
    plan = real_plan()
    now = time.time()
    steps = plan.steps()
    records = [record("r1", step, "succeeded", now - 1500, now - 600) for step in steps[:8]]
    records.append(record("r1", steps[8], "running", now - 250, None))
    records += [record("r1", step, "pending", None, None) for step in steps[9:]]
    run = RunRecord(id="r1", kind="run", parent_run_id=None, runbook=plan.runbook, runbook_path="x",
                    environment="production", status="running", plan={}, started_by="U123", created_at=now - 1500,
                    started_at=now - 1500, finished_at=None, current_phase=3, failed_phase=None, failed_step=None,
                    error=None, abort_requested_by=None, owner=None, heartbeat_at=None)
    view = build_run_view(run, plan, records, now)
    text, blocks = root_message(view, "ja")
    assert_within_limits(text, blocks)
    rendered = "\n".join(str(block) for block in blocks)
    assert "🚀 api-v2-migration を実行中" in rendered
    assert "✅ Phase 1 準備" in rendered
    assert "Phase 2 データベース" in rendered
    assert "⚠ +5分" in rendered  # phase 3 started 25 minutes ago against 20 planned
    assert blocks[-1]["elements"][0]["action_id"] == "postmerge:abort"


def test_root_message_growing_stays_within_limits():
    phases = [PhaseView(number=index, title="とても長いフェーズの名前😀" * 20, status="done", planned_seconds=600,
                        elapsed_seconds=1200, steps_done=3, steps_total=3) for index in range(1, 400)]
    view = RunView(run_id="r1", runbook="r" * 500, environment="production", status="running",
                   started_by="U1", phases=phases, current_step="p1.1 " + "x" * 5000)
    text, blocks = root_message(view, "ja")
    assert_within_limits(text, blocks)


def test_output_tail_of_5000_lines():
    lines = [f"row {index}: デプロイ完了😀 " + "x" * 40 for index in range(5000)]
    block = output_block(lines)
    text = block["text"]["text"]
    assert len(text) <= MAX_SECTION_CHARS
    assert text.startswith("```")
    assert text.endswith("```")
    assert "row 4999" in text
    assert "lines above" in text


def test_phase_reply_with_huge_outputs():
    steps = [StepReport(step_id=f"p2.{index}", title="データ移行 " * 50, status="failed" if index == 3 else "succeeded",
                        seconds=1.5, output_lines=[f"line {line}" for line in range(5000)],
                        error="exit 1: " + "e" * 4000 if index == 3 else None) for index in range(1, 60)]
    phase = PhaseView(number=2, title="データベース", status="failed", planned_seconds=900, elapsed_seconds=1500)
    text, blocks = phase_reply(phase, steps, "ja")
    assert_within_limits(text, blocks)


def test_secrets_masked_in_output():
    block = output_block(["connecting to postgresql://app:hunter2@db/app", "SLACK_BOT_TOKEN=xoxb-1234567890-abc"])
    text = block["text"]["text"]
    assert "hunter2" not in text
    assert "xoxb-1234567890" not in text
    assert mask_secrets("Authorization: Bearer abcdefghijkl") == "Authorization: Bearer ****"


def test_cut_by_code_points():
    assert cut_end("デプロイ完了😀です", 7) == "デプロイ完了…"
    assert cut_end("😀" * 10, 3) == "😀😀…"
    assert tail_lines(["a" * 50], 10) == "…" + "a" * 9
