"""`postmerge lint`, and `plan`/`run` refusing an unsound runbook."""

from __future__ import annotations

import re

import pytest

from conftest import REAL_RUNBOOK, REPO, run_cli

BROKEN = """# Post-Merge Tasks: broken

## Tasks

### Custom
- [ ] empty: ` `
- [ ] slow: `sleep 1`
  - 所要時間: そこそこ
  - タイムアウト: -5秒
- [ ] stray: `echo a

## Execution Notes

### Execution Order

**Phase 1: a（5分）**
1. slow
2. nothing like this

**Phase 1: b（5分）**
1. slow

### Rollback Plan

**Phase 9 失敗（x）:**
1. undo: `echo undo`

```bash
echo never closed
"""

LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<message>.+)$")


def test_lint_sound_runbook_exits_zero(home):
    result = run_cli("lint", str(REAL_RUNBOOK), home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_lint_broken_runbook_lists_problems(home):
    path = home / "broken.md"
    path.write_text(BROKEN, encoding="utf-8")
    result = run_cli("lint", str(path), home=home)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert LINE.match(line), line
    text = result.stdout
    assert f"{path}:6: error:" in text  # empty command
    assert f"{path}:8: error:" in text  # unreadable duration
    assert f"{path}:9: error:" in text  # negative timeout
    assert f"{path}:10: error:" in text  # unterminated backtick
    assert f"{path}:20: error:" in text  # duplicate phase number
    assert f"{path}:25: error:" in text  # rollback for a missing phase
    assert f"{path}:28: error:" in text  # unterminated code block
    assert f"{path}:18: warning:" in text  # phase line with no task


def test_lint_not_a_runbook(home):
    path = home / "notes.md"
    path.write_text("# Shopping\n\n- milk\n", encoding="utf-8")
    result = run_cli("lint", str(path), home=home)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{path}:1: error: not a runbook")


def test_lint_missing_file(home):
    result = run_cli("lint", str(home / "missing.md"), home=home)
    assert result.returncode == 2
    assert "not found" in result.stdout
    assert "Traceback" not in result.stderr


def test_lint_japanese_by_default(home):
    path = home / "notes.md"
    path.write_text("# Shopping\n", encoding="utf-8")
    env = {key: value for key, value in __import__("os").environ.items() if key != "POSTMERGE_LOCALE"}
    env["POSTMERGE_HOME"] = str(home)
    result = run_cli("lint", str(path), home=home, env=env)
    assert "エラー: ランブックではありません" in result.stdout


def test_plan_and_run_refuse_unsound_runbook(home):
    path = home / "broken.md"
    path.write_text(BROKEN, encoding="utf-8")
    marker = home / "ran"
    path.write_text(BROKEN.replace("sleep 1", f"touch {marker}"), encoding="utf-8")
    plan = run_cli("plan", str(path), home=home)
    assert plan.returncode == 1
    assert "has errors" in plan.stderr
    run = run_cli("run", str(path), "--yes", home=home)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert not marker.exists()
    assert not (home / "postmerge.db").exists()


def test_plan_unknown_environment(home):
    result = run_cli("plan", str(REAL_RUNBOOK), "--env", "nowhere", home=home)
    assert result.returncode == 2
    assert "environment 'nowhere' not found" in result.stderr


def test_plan_table_in_english(home):
    result = run_cli("plan", str(REPO / "examples" / "english-cache-rollout.md"), home=home)
    assert result.returncode == 0
    assert "Plan: cache-rollout" in result.stdout


def test_common_options_before_or_after_command():
    from bot.cli import build_parser, parse_arguments

    parser = build_parser("en")
    for argv in (["--db", "sqlite:///x.db", "status"], ["status", "--db", "sqlite:///x.db"]):
        args = parse_arguments(parser, argv)
        assert args.db == "sqlite:///x.db", argv
        assert args.locale is None
    args = parse_arguments(parser, ["--locale", "en", "sandbox", "up"])
    assert args.locale == "en"
    assert args.config is None


def test_plan_piped_into_head_exits_zero(home):
    import subprocess
    import sys

    from conftest import cli_env

    command = f"{sys.executable} -m bot.cli plan {REAL_RUNBOOK} | head -n 1; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(command, shell=True,
                            env=cli_env(home), capture_output=True, text=True, executable="/bin/bash",
                            cwd=home)
    assert result.stdout.startswith("Plan: api-v2-migration")
    assert result.stderr == ""
    assert result.returncode == 0


def test_invalid_locale_variable_rejected(home):
    from conftest import cli_env

    result = run_cli("status", home=home, env=cli_env(home, POSTMERGE_LOCALE="fr"))
    assert result.returncode == 2
    assert "POSTMERGE_LOCALE must be ja or en, not 'fr'" in result.stderr


@pytest.mark.parametrize("locale", ["ja", "en"])
def test_every_help_page_renders(tmp_path, locale):
    for command in (["--help"], ["lint", "--help"], ["plan", "--help"], ["run", "--help"], ["status", "--help"],
                    ["resume", "--help"], ["abort", "--help"], ["rollback", "--help"], ["serve", "--help"],
                    ["sandbox", "--help"], ["sandbox", "switch", "--help"], ["sandbox", "up", "--help"]):
        result = run_cli(*command, "--locale", locale, home=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        assert "Traceback" not in result.stderr
        if locale == "ja":
            assert "このヘルプを表示して終了する" in result.stdout, command
