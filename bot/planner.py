"""Resolve a parsed runbook into a plan for one environment.

Each phase line is matched to a task deterministically, in tiers, and the
plan records which tier matched and why:

1. a task under Tasks whose title equals the line or is contained in it;
2. a Tasks category (`環境変数設定` expands to every Environment Variables task);
3. a Pre-execution Checklist or Verification item, the same way as tier 1;
4. the most similar task under Tasks (bigram or word overlap of at least 0.5);
5. the most similar checklist or verification item.

A line that matches nothing and has no command of its own becomes a manual
step and a warning.
"""

from __future__ import annotations

import json
import re
import unicodedata

from bot import system_steps
from bot.config import Environment, default_environment
from bot.durations import DurationError, parse_duration
from bot.model import Problem, Runbook, RollbackLine, Severity, Task
from bot.plan import Link, Plan, PlanPhase, RollbackGroupPlan, Step, TaskMatch

SIMILARITY_THRESHOLD = 0.5

CATEGORY_ALIASES = {
    "database migrations": ("データベースマイグレーション", "dbマイグレーション", "マイグレーション"),
    "environment variables": ("環境変数", "env", "環境変数の設定"),
    "deployment": ("デプロイメント",),
    "configuration": ("設定変更", "構成"),
    "external services": ("外部サービス",),
    "custom": ("カスタム",),
}
_GENERIC_SUFFIXES = ("スクリプト実行", "の実行", "実行", "の設定", "設定", "更新", "の確認", "確認", "チェック", "update", "setup", "run")

_TRAFFIC = re.compile(r"(?P<weight>-?\d{1,3})\s*[%％]")
_TRAFFIC_WORDS = re.compile(r"→|->|トラフィック|traffic|shift|切り替え", re.I)
_TO_OLD = re.compile(r"green|\(v1\)|（v1）|\bv1\b|旧", re.I)
_MONITOR = re.compile(r"^(?:監視|モニタリング|monitor(?:ing)?|watch)\s*[（(](?P<duration>[^）)]+)[）)]", re.I)
_APPROVAL_LINE = re.compile(r"^(?:承認|approval|approve|get approval)", re.I)
_SEND = re.compile(r"メール送信|通知送信|お知らせ送信|通知メール|send\b.*\b(?:e-?mail|notice|notification)|(?:e-?mail|notice|notification)\s+send|\bnotify\b", re.I)
_PLACEHOLDER = re.compile(r"<[A-Za-z_][\w-]*>")
_RERUN_PHASE = re.compile(r"phase\s*(?P<number>\d+)\s*を?\s*(?:再実行|やり直)|re-?run\s+(?:of\s+)?phase\s*(?P<english>\d+)",
                          re.I)
_DASHBOARD = re.compile(r"dashboard|ダッシュボード|grafana|kibana", re.I)
_URL = re.compile(r"https?://[^\s`)>]+")
_SIGNAL_RUNNING = re.compile(r"^kill\s+-(?:INT|TERM|SIGINT|SIGTERM|2|15)\s+<pid>$")
_SQL = re.compile(r"^\s*(?:select|with|show|explain)\b", re.I)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH_LIKE = re.compile(r"^(?:/|\./|~/)?[\w.*@-]+(?:/[\w.*@-]*)*/?$")

# Attribute keys whose command runs before the task, as part of it, or after it.
_BEFORE_KEYS = ("バックアップ", "backup", "事前", "before")
_PART_KEYS = ("再起動", "restart", "reload", "リロード")
_AFTER_KEYS = ("検証", "verify", "verification", "check", "デプロイ", "deploy", "アップロード", "upload")
_EXPECT_KEYS = ("期待値", "expected", "expect", "期待")
_TIMEOUT_KEYS = ("タイムアウト", "timeout")
_DURATION_KEYS = ("所要時間", "duration", "estimated time")
_LOCATION_KEYS = ("場所", "location", "file", "ファイル")
_VALUE_KEYS = ("値", "value")
_CONFIRM_KEYS = ("送信前確認", "confirm before sending", "before sending")
_ALERT_KEYS = ("アラート設定", "alert", "alerts")


def normalize(text: str) -> str:
    """Fold text for matching: NFKC, case, no spaces, punctuation or backticks."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(char for char in folded if char.isalnum())


def _bigrams(text: str) -> set[str]:
    if len(text) < 2:
        return {text} if text else set()
    return {text[index : index + 2] for index in range(len(text) - 1)}


def _words(text: str) -> set[str]:
    """Split into runs of one script: latin words, katakana words, kanji words."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    words = re.findall(r"[a-z0-9]+|[\u30a0-\u30ffー]+|[\u4e00-\u9fff]+", folded)
    return set(words)


def similarity(line: str, title: str) -> float:
    """Return the larger of the bigram and the word Dice coefficient."""
    scores = []
    for left, right in ((_bigrams(normalize(line)), _bigrams(normalize(title))), (_words(line), _words(title))):
        if left and right:
            scores.append(2 * len(left & right) / (len(left) + len(right)))
    return max(scores, default=0.0)


def _strip_generic(text: str) -> str:
    stripped = text
    changed = True
    while changed:
        changed = False
        for suffix in _GENERIC_SUFFIXES:
            if stripped.endswith(suffix) and len(stripped) > len(suffix):
                stripped = stripped[: -len(suffix)]
                changed = True
    return stripped


def _key_in(key: str, keys: tuple[str, ...]) -> bool:
    folded = key.strip().casefold()
    return any(candidate in folded for candidate in keys)


def _is_command(code: str) -> bool:
    """Tell a command from a path or a value: a command has a space or is a bare program name."""
    code = code.strip()
    if not code:
        return False
    if " " in code:
        return True
    if _PATH_LIKE.match(code) and ("/" in code or "." in code):
        # A path runs when it names a script or a program in a bin folder:
        # `/bin/true` and `./deploy.sh` run, `/etc/nginx/api.conf` does not.
        if re.search(r"\.(?:sh|bash|py|rb|pl)$", code):
            return True
        return bool(re.search(r"(?:^|/)s?bin/[^/.]+$", code)) or bool(re.match(r"^\./[^/.]+$", code))
    return bool(re.match(r"^[a-z][\w-]*$", code))


class Planner:
    def __init__(self, runbook: Runbook, environment: Environment | None = None) -> None:
        self.runbook = runbook
        self.environment = environment or default_environment()
        self.problems: list[Problem] = []
        self.thresholds = self._read_thresholds()
        # Set while rollback lines are planned: system steps there undo rather than apply.
        self._in_rollback = False

    def warning(self, line: int, key: str, /, **params: str | int | float) -> None:
        self.problems.append(Problem(line=line, severity=Severity.WARNING, key=key, params=params))

    def error(self, line: int, key: str, /, **params: str | int | float) -> None:
        self.problems.append(Problem(line=line, severity=Severity.ERROR, key=key, params=params))

    # -- entry point ------------------------------------------------------

    def plan(self) -> Plan:
        runbook = self.runbook
        plan = Plan(
            runbook=runbook.name,
            runbook_path=runbook.path,
            environment=self.environment.name,
            language=runbook.language,
            total_planned_seconds=runbook.total_planned_seconds,
        )
        for phase in runbook.phases:
            plan_phase = PlanPhase(
                number=phase.number,
                title=phase.title,
                planned_seconds=phase.planned_seconds,
                source_line=phase.line,
            )
            steps: list[Step] = []
            for line in phase.lines:
                steps.extend(self._resolve_phase_line(line.text, line.line, line.commands))
            plan_phase.steps = self._number(steps, f"p{phase.number}", phase.number)
            plan.phases.append(plan_phase)

        if plan.total_planned_seconds is None and all(phase.planned_seconds for phase in plan.phases):
            plan.total_planned_seconds = sum(phase.planned_seconds or 0 for phase in plan.phases) or None

        verification: list[Step] = []
        for task in runbook.verification:
            verification.extend(self._steps_for_task(task, None))
        plan.verification = self._number(verification, "v", None)

        for index, group in enumerate(runbook.rollback, start=1):
            steps = []
            rerun_phase = None
            for rollback_line in group.lines:
                rerun = _RERUN_PHASE.search(unicodedata.normalize("NFKC", rollback_line.text))
                if rerun and not rollback_line.commands:
                    # Not a step of the rollback: the incident offers a button that runs the phase again.
                    rerun_phase = int(rerun.group("number") or rerun.group("english"))
                    continue
                steps.append(self._rollback_step(rollback_line))
            plan.rollback.append(
                RollbackGroupPlan(
                    phases=group.phases,
                    title=group.title,
                    source_line=group.line,
                    steps=self._number(steps, f"r{index}", None),
                    rerun_phase=rerun_phase,
                )
            )
        plan.emergency = self._number([self._rollback_step(line) for line in runbook.emergency], "e", None)
        plan.links = self._links()
        return plan

    def _links(self) -> list[Link]:
        """Collect the dashboards the runbook names: every URL under 緊急時 first, then dashboard URLs of tasks."""
        links: list[Link] = []
        seen: set[str] = set()
        for line in self.runbook.emergency:
            for url in ([line.url] if line.url else _URL.findall(line.text)):
                if url not in seen:
                    seen.add(url)
                    title = re.split(r"[:：]", line.text.replace("`", ""), maxsplit=1)[0].strip() or url
                    links.append(Link(title=title, url=url, source_line=line.line, emergency=True))
        for task in self.runbook.tasks:
            for attribute in task.attributes:
                for url in _URL.findall(attribute.value):
                    if not _DASHBOARD.search(f"{url} {task.title} {task.text}"):
                        continue
                    if url not in seen:
                        seen.add(url)
                        links.append(Link(title=task.title, url=url, source_line=attribute.line))
        return links

    def _number(self, steps: list[Step], prefix: str, phase: int | None) -> list[Step]:
        ids: dict[int, str] = {}
        for index, step in enumerate(steps, start=1):
            ids[id(step)] = f"{prefix}.{index}"
        for step in steps:
            step.id = ids[id(step)]
            step.phase = phase
        for step in steps:
            if step.prerequisite_of is not None:
                for other in steps:
                    if other.prerequisite_of is None and other.source_line == int(step.prerequisite_of):
                        step.prerequisite_of = other.id
                        break
        return steps

    # -- thresholds -------------------------------------------------------

    def _read_thresholds(self) -> dict[str, float]:
        thresholds: dict[str, float] = {}
        for task in self.runbook.verification:
            text = unicodedata.normalize("NFKC", f"{task.title}: {task.text}")
            folded = text.casefold()
            latency = re.search(r"p(\d{2})\s*[<≤]\s*(\d+(?:\.\d+)?)\s*ms", folded)
            if latency:
                thresholds[f"p{latency.group(1)}_ms"] = float(latency.group(2))
                continue
            if re.search(r"エラーレート|エラー率|error rate", folded):
                rate = re.search(r"[<≤]\s*(\d+(?:\.\d+)?)\s*%", folded)
                if rate:
                    thresholds["error_rate_percent"] = float(rate.group(1))
                continue
            if re.search(r"スループット|throughput", folded):
                throughput = re.search(r"[>≥]\s*(\d+(?:\.\d+)?)\s*(?:req|rps|リクエスト)", folded)
                if throughput:
                    thresholds["throughput_rps"] = float(throughput.group(1))
        for task in self.runbook.tasks:
            for attribute in task.attributes:
                if _key_in(attribute.key, _ALERT_KEYS):
                    rate = re.search(r"[>≥]\s*(\d+(?:\.\d+)?)\s*%", unicodedata.normalize("NFKC", attribute.value))
                    if rate:
                        thresholds["abort_error_rate_percent"] = float(rate.group(1))
        return thresholds

    # -- phase lines ------------------------------------------------------

    def _resolve_phase_line(self, text: str, line: int, commands: list[str]) -> list[Step]:
        plain = text.replace("`", "")

        monitor = _MONITOR.match(unicodedata.normalize("NFKC", plain).strip())
        if monitor:
            return [self._monitor_step(plain, line, monitor.group("duration"))]

        traffic = self._traffic_step(plain, line, for_rollback=False)
        if traffic is not None:
            return [traffic]

        if _APPROVAL_LINE.match(plain.strip()):
            return [Step(id="", title=plain, kind="approval", source_line=line, requires_approval=True)]

        matched = self._match(plain)
        if matched is not None:
            tasks, match = matched
            steps: list[Step] = []
            for task in tasks:
                task_match = match if match.reason == "category" else match.model_copy(
                    update={"task": task.title, "task_line": task.line}
                )
                steps.extend(self._steps_for_task(task, task_match, line))
            return steps

        if commands:
            return [self._command_step(plain, line, commands, None)]

        scale_down = system_steps.green_scale_down(plain, self.environment)
        if scale_down is not None:
            scale_down.source_line = line
            return [self._finish_step(scale_down)]
        smoke_tests = system_steps.smoke_test_tasks(plain, self.runbook)
        if smoke_tests:
            steps = []
            for task in smoke_tests:
                match = TaskMatch(task=task.title, task_line=task.line, reason="smoke")
                for step in self._steps_for_task(task, match, line):
                    step.title = f"{plain}: {step.title}"
                    steps.append(step)
            return steps

        self.warning(line, "lint.unmatched_phase_line", text=plain)
        return [self._manual_step(plain, line, "manual.no_task")]

    def _match(self, line_text: str) -> tuple[list[Task], TaskMatch] | None:
        line_key = normalize(line_text)
        if not line_key:
            return None
        tasks = self.runbook.tasks
        others = self.runbook.checklist + self.runbook.verification

        for candidates, tier in ((tasks, "tasks"), (None, "category"), (others, "others")):
            if tier == "category":
                category = self._match_category(line_key)
                if category is not None:
                    members = [task for task in tasks if task.category == category]
                    if members:
                        return members, TaskMatch(task=category, task_line=members[0].line, reason="category")
                continue
            found = self._match_title(line_key, candidates)
            if found is not None:
                return found

        for candidates in (tasks, others):
            found = self._match_similar(line_text, candidates)
            if found is not None:
                return found
        return None

    def _match_title(self, line_key: str, candidates: list[Task]) -> tuple[list[Task], TaskMatch] | None:
        best: Task | None = None
        best_reason = ""
        best_length = -1
        for task in candidates:
            title_key = normalize(task.title)
            if not title_key:
                continue
            if title_key == line_key:
                return [task], TaskMatch(task=task.title, task_line=task.line, reason="exact")
            if title_key in line_key or (len(line_key) >= 4 and line_key in title_key):
                # The longest contained title is the most specific match.
                if len(title_key) > best_length:
                    best, best_reason, best_length = task, "contains", len(title_key)
        if best is None:
            return None
        return [best], TaskMatch(task=best.title, task_line=best.line, reason=best_reason)

    def _match_category(self, line_key: str) -> str | None:
        stripped = _strip_generic(line_key)
        for category in self.runbook.categories:
            names = {normalize(category)}
            names.update(normalize(alias) for alias in CATEGORY_ALIASES.get(category.casefold(), ()))
            if line_key in names or stripped in names:
                return category
        return None

    def _match_similar(self, line_text: str, candidates: list[Task]) -> tuple[list[Task], TaskMatch] | None:
        scored = sorted(
            ((similarity(line_text, task.title), index, task) for index, task in enumerate(candidates)),
            key=lambda entry: (-entry[0], entry[1]),
        )
        if not scored or scored[0][0] < SIMILARITY_THRESHOLD:
            return None
        score, _, task = scored[0]
        if len(scored) > 1 and scored[1][0] == score:
            self.warning(task.line, "lint.ambiguous_match", text=line_text, first=task.title, second=scored[1][2].title)
        return [task], TaskMatch(task=task.title, task_line=task.line, reason="similar", score=round(score, 2))

    # -- tasks ------------------------------------------------------------

    def _steps_for_task(self, task: Task, match: TaskMatch | None, line: int | None = None) -> list[Step]:
        source_line = line if line is not None else task.line
        if task.section == "checklist":
            step = self._manual_step(task.title, source_line, "manual.checklist")
            step.task, step.task_line, step.match = task.title, task.line, match
            step.instructions = [child.title for child in task.children] + [
                f"{attribute.key}: {attribute.value}" for attribute in task.attributes
            ]
            return [step]

        main = self._task_step(task, source_line)
        main.match = match
        steps: list[Step] = []

        for attribute in task.attributes:
            if _key_in(attribute.key, _BEFORE_KEYS) and attribute.commands:
                for command in attribute.commands:
                    before = self._command_step(f"{task.title}: {attribute.key}", attribute.line, [command], task)
                    before.prerequisite_of = str(source_line)
                    steps.append(before)
        steps.append(main)
        for attribute in task.attributes:
            if main.kind != "nginx" and _key_in(attribute.key, _PART_KEYS) and attribute.commands:
                for command in attribute.commands:
                    steps.append(self._command_step(f"{task.title}: {attribute.key}", attribute.line, [command], task))
            if _key_in(attribute.key, _AFTER_KEYS) and attribute.commands:
                for command in attribute.commands:
                    if _is_command(command):
                        steps.append(self._command_step(f"{task.title}: {attribute.key}", attribute.line, [command], task))
        return steps

    def _task_step(self, task: Task, line: int) -> Step:
        commands = [command for command in task.commands if _is_command(command)]
        for block in task.code_blocks:
            if block.language in ("", "bash", "sh", "shell", "console", "sql"):
                commands.append(block.text)

        if self._is_env_task(task):
            step = self._env_step(task, line)
        elif commands:
            step = self._command_step(task.title, line, commands, task)
        else:
            kind = self._kind_from_words(f"{task.title} {task.text}")
            if kind is None:
                step = self._manual_step(task.title, line, "manual.nothing_to_run")
            else:
                step = Step(id="", title=task.title, kind=kind, source_line=line)
            paths = [code for code in task.commands if not _is_command(code)]
            if step.kind == "nginx" and paths:
                step.file = paths[0]
            step.commands = [code for code in task.commands if _is_command(code)]

        step.task = task.title
        step.task_line = task.line
        self._apply_attributes(step, task)
        if step.kind == "nginx":
            for attribute in task.attributes:
                if _key_in(attribute.key, _PART_KEYS):
                    step.commands.extend(attribute.commands)
        return self._finish_step(step, task)

    def _is_env_task(self, task: Task) -> bool:
        category = (task.category or "").casefold()
        has_location = task.attribute(*_LOCATION_KEYS) is not None
        named_like_variable = bool(_ENV_NAME.match(task.title)) and task.title.upper() == task.title
        return named_like_variable and (has_location or "environment" in category or "環境変数" in category)

    def _env_step(self, task: Task, line: int) -> Step:
        value = task.value
        value_attribute = task.attribute(*_VALUE_KEYS)
        if value is None and value_attribute is not None:
            value = value_attribute.commands[0] if value_attribute.commands else value_attribute.value
        location = task.attribute(*_LOCATION_KEYS)
        file = None
        if location is not None:
            file = (location.commands[0] if location.commands else location.value).strip()
        step = Step(id="", title=f"{task.title}={value}", kind="env", source_line=line)
        if value is None:
            self.error(task.line, "lint.env_without_value", name=task.title)
            return self._manual_step(task.title, line, "manual.nothing_to_run")
        if not file:
            self.error(task.line, "lint.env_without_location", name=task.title)
            return self._manual_step(task.title, line, "manual.nothing_to_run")
        step.variables = {task.title: value}
        step.file = file
        step.commands = [f"{task.title}={value}"]
        return step

    def _apply_attributes(self, step: Step, task: Task) -> None:
        for attribute in task.attributes:
            key = attribute.key
            if _key_in(key, _TIMEOUT_KEYS):
                try:
                    step.timeout_seconds = parse_duration(attribute.value.replace("`", ""))
                except DurationError:
                    pass
            elif _key_in(key, _DURATION_KEYS):
                try:
                    step.planned_seconds = parse_duration(attribute.value.replace("`", ""))
                except DurationError:
                    pass
            elif _key_in(key, _CONFIRM_KEYS):
                step.requires_approval = True
                step.approval_note = attribute.value
            elif _key_in(key, _EXPECT_KEYS) or (key == "" and task.section == "verification"):
                self._apply_expectation(step, attribute.value, attribute.commands)
        if _SEND.search(f"{task.title} {' '.join(task.commands)}") and step.kind != "manual":
            step.requires_approval = True

    def _apply_expectation(self, step: Step, value: str, codes: list[str]) -> None:
        candidates = codes or [value]
        for candidate in candidates:
            text = candidate.strip()
            status = re.match(r"^(?:HTTP\s*)?([1-5]\d\d)\b", text, re.I)
            if step.kind == "http" and status:
                step.expect_status = int(status.group(1))
                continue
            if step.kind == "http" and text[:1] in "{[":
                try:
                    step.expect_json = json.loads(text)
                    continue
                except json.JSONDecodeError:
                    pass
            if step.kind == "shell" and codes:
                step.expect_output.append(text)
                continue
            step.unchecked_expectations.append(value.replace("`", ""))

    # -- commands ---------------------------------------------------------

    def _command_step(self, title: str, line: int, commands: list[str], task: Task | None) -> Step:
        command = commands[0].strip()
        step = Step(id="", title=title, kind="shell", source_line=line, commands=list(commands))
        if task is not None:
            step.task, step.task_line = task.title, task.line
        override = self.environment.commands.get(command)

        if override is not None:
            step.kind = "shell"
            step.run_command = override
        elif _SIGNAL_RUNNING.match(command):
            step.kind = "shell"
            step.run_command = command
        elif re.match(r"^(?:sudo\s+)?kubectl\b", command):
            step.kind = "kubernetes"
        elif re.match(r"^curl\b", command):
            self._http_from_curl(step, command, line)
        elif _SQL.match(command):
            step.kind = "sql"
            step.query = command
        elif re.search(r"\bnginx\b", command):
            step.kind = "nginx"
        elif _PLACEHOLDER.search(command):
            step.kind = "shell"
            step.automated = False
            step.manual_reason = "manual.placeholder"
        elif command == "pg_restore":
            # Without a file and a database, pg_restore reads standard input and prints SQL: it restores nothing.
            step.kind = "shell"
            step.automated = False
            step.manual_reason = "manual.pg_restore_bare"
        else:
            step.kind = "shell"
            step.run_command = command
        return self._finish_step(step, task)

    def _http_from_curl(self, step: Step, command: str, line: int) -> None:
        from steps.http import parse_curl

        try:
            request = parse_curl(command)
        except ValueError as error:
            self.warning(line, "lint.curl_unsupported", command=command.splitlines()[0], error=str(error))
            step.kind = "shell"
            step.run_command = command
            return
        step.kind = "http"
        step.url = request.url
        step.target_url = self.environment.rewrite_url(request.url)
        step.method = request.method
        step.headers = dict(request.headers)
        step.body = request.body
        step.fail_on_http_error = request.fail_on_http_error

    def _kind_from_words(self, text: str) -> str | None:
        # A URL is a link for people, not a statement of what the step touches.
        folded = re.sub(r"https?://\S+", "", text).casefold()
        if "nginx" in folded:
            return "nginx"
        if "cdn" in folded or "cloudflare" in folded:
            return "cdn"
        if "datadog" in folded:
            return "datadog"
        if "sentry" in folded:
            return "sentry"
        if "kubernetes" in folded or "kubectl" in folded:
            return "kubernetes"
        return None

    def _finish_step(self, step: Step, task: Task | None = None) -> Step:
        from steps import has_executor

        system_steps.configure(step, task, self.runbook, self.environment, rollback=self._in_rollback)
        if step.kind == "http" and step.timeout_seconds is None:
            step.timeout_seconds = self.environment.http_timeout_seconds
        if step.automated and not has_executor(step.kind):
            step.automated = False
            step.manual_reason = "manual.no_executor"
        if step.kind in ("manual", "approval"):
            step.automated = False
        return step

    def _manual_step(self, title: str, line: int, reason: str) -> Step:
        return Step(id="", title=title, kind="manual", source_line=line, automated=False, manual_reason=reason)

    # -- gates and traffic ------------------------------------------------

    def _monitor_step(self, text: str, line: int, duration_text: str) -> Step:
        try:
            duration = parse_duration(duration_text)
        except DurationError as error:
            key = "lint.negative_duration" if error.reason == "negative" else "lint.unreadable_duration"
            self.error(line, key, value=duration_text, what="monitor")
            duration = 0
        step = Step(
            id="",
            title=text,
            kind="monitor",
            source_line=line,
            duration_seconds=duration,
            thresholds=dict(self.thresholds),
        )
        return self._finish_step(step)

    def _traffic_step(self, text: str, line: int, for_rollback: bool) -> Step | None:
        normalized = unicodedata.normalize("NFKC", text)
        match = _TRAFFIC.search(normalized)
        if match is None or not _TRAFFIC_WORDS.search(normalized):
            return None
        weight = int(match.group("weight"))
        if not 0 <= weight <= 100:
            self.error(line, "lint.invalid_weight", value=weight)
            weight = max(0, min(100, weight))
        after_arrow = re.split(r"→|->", normalized, maxsplit=1)[-1]
        if _TO_OLD.search(after_arrow):
            weight = 100 - weight
        step = Step(
            id="",
            title=text,
            kind="traffic",
            source_line=line,
            weight=weight,
            requires_approval=not for_rollback,
        )
        return self._finish_step(step)

    # -- rollback plan ----------------------------------------------------

    def _rollback_step(self, rollback_line: RollbackLine) -> Step:
        self._in_rollback = True
        try:
            return self._plan_rollback_line(rollback_line)
        finally:
            self._in_rollback = False

    def _plan_rollback_line(self, rollback_line: RollbackLine) -> Step:
        plain = rollback_line.text.replace("`", "")
        title = re.split(r"[:：]", plain, maxsplit=1)[0].strip() if rollback_line.commands else plain
        traffic = self._traffic_step(plain, rollback_line.line, for_rollback=True)
        if traffic is not None:
            return traffic
        if rollback_line.commands:
            step = self._command_step(title, rollback_line.line, rollback_line.commands, None)
            if step.kind == "shell" and step.automated:
                kind = self._kind_from_words(title)
                if kind is not None:
                    step.kind = kind
                    step.run_command = None
                    step = self._finish_step(step)
            return step
        kind = self._kind_from_words(plain)
        if kind is not None:
            return self._finish_step(Step(id="", title=plain, kind=kind, source_line=rollback_line.line))
        step = self._manual_step(plain, rollback_line.line, "manual.nothing_to_run")
        if rollback_line.url:
            step.instructions = [rollback_line.url]
        return step


def build_plan(runbook: Runbook, environment: Environment | None = None) -> tuple[Plan, list[Problem]]:
    """Return the plan and the planner's problems (parser problems stay on the runbook)."""
    planner = Planner(runbook, environment)
    plan = planner.plan()
    return plan, sorted(planner.problems, key=lambda problem: problem.line)
