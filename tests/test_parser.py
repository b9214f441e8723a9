"""Parser tests on the real runbook and on the other shapes users write."""

from __future__ import annotations

import pytest

from bot.durations import DurationError, parse_duration
from bot.parser import parse_runbook, read_runbook
from conftest import REAL_RUNBOOK, REPO


@pytest.fixture(scope="module")
def runbook():
    return read_runbook(REAL_RUNBOOK)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("約30秒", 30), ("約10分", 600), ("（15分）", 900), ("約95分", 5700), ("1時間30分", 5400),
     ("~10 min", 600), ("90s", 90), ("about 2 hours", 7200), ("30秒", 30), ("１５分", 900), ("1.5分", 90)],
)
def test_parse_duration_forms(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "reason"), [("十分", "unreadable"), ("-5分", "negative"), ("", "unreadable"),
                                              ("5 parsecs", "unreadable")])
def test_parse_duration_rejects(text, reason):
    with pytest.raises(DurationError) as raised:
        parse_duration(text)
    assert raised.value.reason == reason


def test_real_runbook_header(runbook):
    assert runbook.name == "api-v2-migration"
    assert runbook.language == "ja"
    assert runbook.status == "pending"
    assert runbook.status_line == 3
    assert runbook.merge_info.pr == "#456"
    assert runbook.merge_info.branch == "feature/api-v2-migration"


def test_real_runbook_has_no_problems(runbook):
    assert runbook.problems == []


def test_real_runbook_phases(runbook):
    assert [phase.title for phase in runbook.phases] == [
        "準備", "データベース", "デプロイ", "設定変更", "外部サービス", "トラフィック切り替え", "後処理"]
    assert [phase.planned_seconds // 60 for phase in runbook.phases] == [15, 15, 20, 10, 10, 10, 15]
    assert runbook.total_planned_seconds == 95 * 60
    assert runbook.phases[0].line == 116


def test_real_runbook_tasks_keep_lines(runbook):
    by_title = {task.title: task for task in runbook.tasks}
    assert by_title["スキーママイグレーション"].line == 16
    assert by_title["スキーママイグレーション"].commands == ["npm run migrate:schema"]
    assert by_title["データ移行"].attribute("バックアップ").commands == ["npm run backup:api-data"]
    assert by_title["API_VERSION"].value == "v2"
    assert by_title["API_VERSION"].category == "Environment Variables"


def test_fenced_block_inside_task(runbook):
    nginx = next(task for task in runbook.tasks if task.title == "Nginx設定更新")
    block = nginx.attribute("追加").code_blocks[0]
    assert block.language == "nginx"
    assert "location /api/v2" in block.text
    assert block.line == 56


def test_nested_checklist(runbook):
    dependencies = next(task for task in runbook.checklist if task.title == "依存タスクの完了確認")
    assert [child.title for child in dependencies.children] == [
        "v2エンドポイントのE2Eテスト通過", "セキュリティスキャン完了", "パフォーマンステスト通過"]
    resources = next(task for task in runbook.checklist if task.title == "実行環境の確認")
    assert resources.children[1].title == "十分なリソース (CPU: 50%, Memory: 60%)"


def test_rollback_groups_and_emergency(runbook):
    assert [group.phases for group in runbook.rollback] == [[1, 2], [3], [4, 5], [6]]
    assert runbook.rollback[0].title == "データベース"
    assert runbook.emergency[0].commands == ["kubectl set image deployment/api api=api:v1"]
    assert runbook.emergency[1].url == "https://app.datadoghq.com/dashboard/emergency"


def test_verification_curl_block(runbook):
    endpoint = next(task for task in runbook.verification if task.title == "v2エンドポイントテスト")
    assert endpoint.code_blocks[0].text.startswith("curl -X POST https://api.example.com/v2/users")
    assert endpoint.category == "エンドポイント"


def test_flat_shape_parses():
    runbook = read_runbook(REPO / "examples" / "flat-config-change.md")
    assert runbook.phased is False
    assert len(runbook.phases) == 1
    assert len(runbook.phases[0].lines) == 4
    assert [group.title for group in runbook.rollback] == ["マイグレーション失敗時", "再構築失敗時"]
    assert runbook.rollback[0].phases == [1]
    variable = next(task for task in runbook.tasks if task.title == "SEARCH_INDEX_VERSION")
    assert variable.attribute("値").commands == ["v3"]
    assert runbook.errors == []


def test_english_runbook_parses():
    runbook = read_runbook(REPO / "examples" / "english-cache-rollout.md")
    assert runbook.language == "en"
    assert [phase.planned_seconds for phase in runbook.phases] == [300, 600, 300]
    assert runbook.rollback[1].phases == [2, 3]
    assert runbook.errors == []


def _keys(text: str) -> list[tuple[int, str]]:
    return [(problem.line, problem.key) for problem in parse_runbook(text, "broken.md").problems]


HEAD = "# Post-Merge Tasks: broken\n\n## Tasks\n\n### Custom\n"


def test_unterminated_fence_reported():
    text = HEAD + "- [ ] a: `echo a`\n  ```bash\n  echo b\n"
    assert (7, "lint.unterminated_fence") in _keys(text)


def test_unterminated_backtick_reported():
    assert (6, "lint.unterminated_backtick") in _keys(HEAD + "- [ ] a: `echo a\n")


def test_empty_command_reported():
    assert (6, "lint.empty_command") in _keys(HEAD + "- [ ] a: ` `\n")


def test_bad_durations_reported():
    text = HEAD + "- [ ] a: `echo a`\n  - 所要時間: そこそこ\n  - タイムアウト: -3秒\n"
    keys = _keys(text)
    assert (7, "lint.unreadable_duration") in keys
    assert (8, "lint.negative_duration") in keys


def test_duplicate_phase_reported():
    text = HEAD + "- [ ] a: `echo a`\n\n## Execution Notes\n\n### Execution Order\n\n**Phase 1: x（5分）**\n1. a\n\n**Phase 1: y（5分）**\n1. a\n"
    assert (15, "lint.duplicate_phase") in _keys(text)


def test_rollback_unknown_phase_reported():
    text = (HEAD + "- [ ] a: `echo a`\n\n## Execution Notes\n\n### Execution Order\n\n**Phase 1: x（5分）**\n1. a\n\n"
            "### Rollback Plan\n\n**Phase 2 失敗（x）:**\n1. b: `echo b`\n")
    assert (17, "lint.rollback_unknown_phase") in _keys(text)


def test_not_a_runbook_reported():
    assert _keys("# Shopping list\n\n- milk\n") == [(1, "lint.not_a_runbook")]


def test_stray_fence_swallowing_sections_reported():
    text = (HEAD + "- [ ] a: `echo a`\n\n```bash\n\n## Execution Notes\n\n### Execution Order\n\n"
            "**Phase 1: x（5分）**\n1. a\n\n```\n")
    keys = _keys(text)
    assert (8, "lint.fence_swallows_section") in keys
    assert (1, "lint.no_execution_order") not in keys


def test_missing_execution_order_reported():
    assert (1, "lint.no_execution_order") in _keys(HEAD + "- [ ] a: `echo a`\n")
