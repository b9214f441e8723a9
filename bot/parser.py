"""Parse a Markdown runbook into the typed model with markdown-it-py.

The parser accepts Japanese and English headings and keys, a phased or flat
Execution Order and a phased or bulleted Rollback Plan. It never guesses
silently: anything it cannot read becomes a Problem with its source line.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

from bot.durations import DurationError, looks_like_duration, parse_duration
from bot.errors import RunbookError
from bot.model import (
    Attribute,
    CodeBlock,
    MergeInfo,
    Phase,
    PhaseLine,
    Problem,
    RollbackGroup,
    RollbackLine,
    Runbook,
    Severity,
    Task,
)

_TITLE = re.compile(r"^(?:post-merge tasks|postmerge tasks|マージ後タスク|ポストマージタスク)\s*[:：]\s*(?P<name>.+)$", re.I)
_STATUS = re.compile(r"^(?:status|ステータス|状態)\s*[:：]\s*(?P<value>.*)$", re.I)
_PHASE = re.compile(r"^(?:phase|フェーズ)\s*(?P<number>-?\d+)\s*[:：.]?\s*(?P<rest>.*)$", re.I)
_PARENTHETICAL = re.compile(r"^(?P<title>.*?)\s*[（(](?P<inner>[^（）()]*)[）)]\s*$")
_TOTAL = re.compile(r"^(?:合計所要時間|合計|所要時間合計|total(?: duration| time)?)\s*[:：]\s*(?P<value>.+)$", re.I)
_ROLLBACK_PHASES = re.compile(r"(?:phases?|フェーズ)\s*(?P<spec>\d+(?:\s*(?:[-–~〜]|to)\s*\d+)?(?:\s*[,、]\s*\d+(?:\s*[-–~〜]\s*\d+)?)*)", re.I)
_EMERGENCY = re.compile(r"^(?:緊急時|緊急対応|emergency|in an emergency)\b", re.I)
_URL = re.compile(r"https?://\S+")
_CHECKBOX = re.compile(r"^\[(?P<mark>[ xX])\]\s*")

STATUS_VALUES = ("pending", "in-progress", "completed", "failed", "rolled-back")

SECTION_ALIASES = {
    "status": ("status", "ステータス", "状態"),
    "merge_info": ("merge info", "マージ情報"),
    "tasks": ("tasks", "タスク", "タスク一覧"),
    "execution_notes": ("execution notes", "実行メモ", "実行ノート"),
    "checklist": ("pre-execution checklist", "実行前チェックリスト", "事前チェックリスト"),
    "execution_order": ("execution order", "実行順序", "実行手順"),
    "rollback": ("rollback plan", "ロールバック計画", "ロールバック手順"),
    "verification": ("verification", "検証", "検証項目"),
    "notes": ("notes", "メモ", "ノート", "実行ログ"),
}

MERGE_KEYS = {
    "branch": ("branch", "ブランチ"),
    "base": ("base", "ベース", "ベースブランチ"),
    "created": ("created", "作成日", "作成"),
    "pr": ("pr", "pull request", "プルリクエスト"),
    "merged": ("merged", "マージ日", "マージ"),
    "completed": ("completed", "完了日", "完了"),
}


def _section_of(title: str) -> str | None:
    folded = title.strip().rstrip(":：").casefold()
    for section, aliases in SECTION_ALIASES.items():
        if folded in aliases:
            return section
    if _STATUS.match(title.strip()):
        return "status"
    return None


class _Inline:
    """Plain text of an inline node, with code spans kept in backticks."""

    def __init__(self, node: SyntaxTreeNode) -> None:
        self.parts: list[tuple[str, str]] = []
        self._collect(node)

    def _collect(self, node: SyntaxTreeNode) -> None:
        for child in node.children:
            if child.type == "text":
                self.parts.append(("text", child.content))
            elif child.type == "code_inline":
                self.parts.append(("code", child.content))
            elif child.type in ("softbreak", "hardbreak"):
                self.parts.append(("text", " "))
            elif child.type in ("html_inline",):
                self.parts.append(("text", child.content))
            else:
                self._collect(child)

    @property
    def text(self) -> str:
        return "".join(f"`{value}`" if kind == "code" else value for kind, value in self.parts).strip()

    @property
    def plain(self) -> str:
        return "".join(value for _, value in self.parts).strip()

    @property
    def codes(self) -> list[str]:
        return [value for kind, value in self.parts if kind == "code"]

    @property
    def has_stray_backtick(self) -> bool:
        return any(kind == "text" and "`" in value for kind, value in self.parts)

    def split_key(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
        """Split at the first colon outside a code span into key parts and value parts."""
        depth = 0
        for index, (kind, value) in enumerate(self.parts):
            if kind != "text":
                continue
            for offset, char in enumerate(value):
                if char in "(（":
                    depth += 1
                elif char in ")）":
                    depth = max(0, depth - 1)
                elif char in ":：" and depth == 0:
                    before = self.parts[:index] + [("text", value[:offset])]
                    after = [("text", value[offset + 1:])] + self.parts[index + 1:]
                    return before, after
        return None


def _join(parts: list[tuple[str, str]], keep_code: bool = True) -> str:
    text = "".join(f"`{value}`" if kind == "code" and keep_code else value for kind, value in parts)
    return text.strip()


def _codes(parts: list[tuple[str, str]]) -> list[str]:
    return [value for kind, value in parts if kind == "code"]


class RunbookParser:
    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.lines = text.splitlines()
        self.problems: list[Problem] = []
        self.runbook = Runbook(name=Path(path).stem, path=path, language="en")

    # -- problems ---------------------------------------------------------

    def error(self, line: int, key: str, /, **params: str | int | float) -> None:
        self.problems.append(Problem(line=line, severity=Severity.ERROR, key=key, params=params))

    def warning(self, line: int, key: str, /, **params: str | int | float) -> None:
        self.problems.append(Problem(line=line, severity=Severity.WARNING, key=key, params=params))

    # -- entry point ------------------------------------------------------

    def parse(self) -> Runbook:
        self._check_fences()
        tokens = MarkdownIt("commonmark").parse(self.text)
        tree = SyntaxTreeNode(tokens)

        sections_seen: set[str] = set()
        h1_seen = False
        section: str | None = None
        category: str | None = None
        block: list[SyntaxTreeNode] = []
        blocks: list[tuple[str | None, str | None, list[SyntaxTreeNode]]] = []

        for node in tree.children:
            if node.type == "heading":
                blocks.append((section, category, block))
                block = []
                title = _Inline(node.children[0]).plain if node.children else ""
                line = node.map[0] + 1
                if node.tag == "h1":
                    h1_seen = True
                    self._read_title(title, line)
                    section, category = None, None
                elif node.tag == "h2":
                    section = _section_of(title)
                    category = None
                    if section == "status":
                        self._read_status(title, line)
                    if section:
                        sections_seen.add(section)
                else:
                    nested = _section_of(title)
                    if nested and nested not in ("status",):
                        section = nested
                        sections_seen.add(nested)
                        category = None
                    elif section == "tasks":
                        category = title.strip()
                        self.runbook.categories.append(category)
                    else:
                        category = title.strip()
                continue
            block.append(node)
        blocks.append((section, category, block))

        for section_name, category_name, nodes in blocks:
            self._read_block(section_name, category_name, nodes)

        title_ok = h1_seen and not any(problem.key == "lint.bad_title" for problem in self.problems)
        if not title_ok and "tasks" not in sections_seen:
            self.problems = [problem for problem in self.problems if problem.key != "lint.bad_title"]
            self.error(1, "lint.not_a_runbook")
        elif not h1_seen:
            self.warning(1, "lint.missing_title", name=self.runbook.name)
        elif "tasks" not in sections_seen and "execution_order" not in sections_seen:
            self.error(1, "lint.no_tasks")
        elif "execution_order" not in sections_seen:
            # A fence that swallowed the Execution Order is the cause; report only that.
            if not any(problem.key == "lint.fence_swallows_section" for problem in self.problems):
                self.error(1, "lint.no_execution_order")
        elif not any(phase.lines for phase in self.runbook.phases):
            self.error(1, "lint.empty_execution_order")

        self._finish()
        self.runbook.problems = sorted(self.problems, key=lambda problem: problem.line)
        return self.runbook

    # -- whole-file checks -------------------------------------------------

    def _check_fences(self) -> None:
        """Report a fenced code block that is never closed, or that swallows a runbook section.

        A stray fence pairs with the next block's closing fence, so the
        sections between them become code: a section heading inside a code
        block is reported at the fence that opened it.
        """
        opening: tuple[int, str, int] | None = None
        reported: set[int] = set()
        for number, raw in enumerate(self.lines, start=1):
            stripped = raw.lstrip(" ")
            indent = len(raw) - len(stripped)
            if opening is not None and indent < 4 and re.match(r"^#{1,3}\s+\S", stripped):
                heading = stripped.lstrip("#").strip()
                if (_section_of(heading) or _TITLE.match(heading)) and opening[0] not in reported:
                    reported.add(opening[0])
                    self.error(opening[0], "lint.fence_swallows_section", heading=stripped.strip(), heading_line=number)
            if opening is None:
                match = re.match(r"(`{3,}|~{3,})(.*)$", stripped)
                if match and indent < 4 and not ("`" in match.group(2) and match.group(1)[0] == "`"):
                    opening = (number, match.group(1)[0], len(match.group(1)))
                continue
            fence_char, fence_length = opening[1], opening[2]
            match = re.match(r"(`{3,}|~{3,})\s*$", stripped)
            closes = match and indent < 4 and match.group(1)[0] == fence_char and len(match.group(1)) >= fence_length
            if closes:
                opening = None
        if opening is not None:
            self.error(opening[0], "lint.unterminated_fence")

    # -- headings ---------------------------------------------------------

    def _read_title(self, title: str, line: int) -> None:
        match = _TITLE.match(title.strip())
        if match is None:
            self.error(line, "lint.bad_title", title=title)
            return
        self.runbook.name = match.group("name").strip()

    def _read_status(self, title: str, line: int) -> None:
        match = _STATUS.match(title.strip())
        value = match.group("value").strip() if match else ""
        self.runbook.status = value
        self.runbook.status_line = line
        if value and value not in STATUS_VALUES:
            self.warning(line, "lint.unknown_status", value=value, allowed=", ".join(STATUS_VALUES))

    # -- sections ---------------------------------------------------------

    def _read_block(self, section: str | None, category: str | None, nodes: list[SyntaxTreeNode]) -> None:
        if section == "merge_info":
            self._read_merge_info(nodes)
        elif section == "tasks":
            for node in nodes:
                if node.type in ("bullet_list", "ordered_list"):
                    self.runbook.tasks.extend(self._read_tasks(node, "tasks", category))
        elif section == "checklist":
            for node in nodes:
                if node.type in ("bullet_list", "ordered_list"):
                    self.runbook.checklist.extend(self._read_tasks(node, "checklist", category))
        elif section == "verification":
            self._read_verification(nodes)
        elif section == "execution_order":
            self._read_execution_order(nodes)
        elif section == "rollback":
            self._read_rollback(nodes)
        else:
            self._check_inline_nodes(nodes)

    def _check_inline_nodes(self, nodes: list[SyntaxTreeNode]) -> None:
        for node in nodes:
            for inline in _inline_descendants(node):
                self._check_inline(inline)

    def _check_inline(self, inline: SyntaxTreeNode) -> _Inline:
        parsed = _Inline(inline)
        if parsed.has_stray_backtick:
            self.error(self._line_of(inline, "`"), "lint.unterminated_backtick")
        return parsed

    def _line_of(self, node: SyntaxTreeNode, needle: str) -> int:
        start, end = node.map or (0, 1)
        for index in range(start, min(end, len(self.lines))):
            if needle in self.lines[index]:
                return index + 1
        return start + 1

    def _read_merge_info(self, nodes: list[SyntaxTreeNode]) -> None:
        info = MergeInfo()
        for node in nodes:
            for item in _list_items(node):
                inline = _first_inline(item)
                if inline is None:
                    continue
                parsed = self._check_inline(inline)
                split = parsed.split_key()
                if split is None:
                    continue
                key = _join(split[0], keep_code=False).casefold()
                value = _join(split[1], keep_code=False)
                for field, aliases in MERGE_KEYS.items():
                    if key in aliases:
                        setattr(info, field, value)
        self.runbook.merge_info = info

    # -- tasks ------------------------------------------------------------

    def _read_tasks(self, list_node: SyntaxTreeNode, section: str, category: str | None) -> list[Task]:
        tasks = []
        for item in _list_items(list_node):
            task = self._read_task(item, section, category)
            if task is not None:
                tasks.append(task)
        return tasks

    def _read_task(self, item: SyntaxTreeNode, section: str, category: str | None) -> Task | None:
        inline = _first_inline(item)
        if inline is None:
            return None
        parsed = self._check_inline(inline)
        line = item.map[0] + 1
        checked = False
        parts = list(parsed.parts)
        if parts and parts[0][0] == "text":
            match = _CHECKBOX.match(parts[0][1])
            if match:
                checked = match.group("mark") in "xX"
                parts[0] = ("text", parts[0][1][match.end():])
            elif section == "tasks":
                self.warning(line, "lint.no_checkbox", text=parsed.text)

        holder = _Inline.__new__(_Inline)
        holder.parts = parts
        split = holder.split_key()
        value: str | None = None
        if split is None:
            title = _join(parts, keep_code=False)
            commands = _codes(parts)
            description = ""
        else:
            key_parts, value_parts = split
            key_codes = _codes(key_parts)
            key_text = _join(key_parts, keep_code=False)
            if key_codes and key_text == "".join(key_codes).strip():
                # `API_VERSION`: `v2` names an environment variable and its value.
                title = key_codes[0]
                value_codes = _codes(value_parts)
                value = value_codes[0] if value_codes else _join(value_parts, keep_code=False) or None
                commands = []
            else:
                title = key_text
                commands = _codes(value_parts)
            description = _join(value_parts)

        for command in commands:
            if not command.strip():
                self.error(line, "lint.empty_command", task=title)
        commands = [command.strip() for command in commands if command.strip()]

        task = Task(
            title=title.strip(),
            text=description,
            line=line,
            section=section,
            category=category,
            checked=checked,
            commands=commands,
            value=value,
        )

        for child in item.children[1:]:
            if child.type == "fence":
                self._add_code_block(task.code_blocks, child, task.title)
            elif child.type in ("bullet_list", "ordered_list"):
                for sub in _list_items(child):
                    self._read_task_child(task, sub, section, category)

        timeout = task.attribute("タイムアウト", "timeout")
        if timeout is not None:
            self._check_duration(timeout.value, timeout.line, "timeout")
        duration = task.attribute("所要時間", "duration", "estimated time")
        if duration is not None:
            self._check_duration(duration.value, duration.line, "duration")
        return task

    def _read_task_child(self, task: Task, item: SyntaxTreeNode, section: str, category: str | None) -> None:
        inline = _first_inline(item)
        if inline is None:
            return
        parsed = _Inline(inline)
        if parsed.parts and parsed.parts[0][0] == "text" and _CHECKBOX.match(parsed.parts[0][1]):
            child = self._read_task(item, section, category)
            if child is not None:
                task.children.append(child)
            return

        self._check_inline(inline)
        line = item.map[0] + 1
        split = parsed.split_key()
        if split is None:
            attribute = Attribute(key="", value=parsed.text, line=line, commands=parsed.codes)
        else:
            key = _join(split[0], keep_code=False)
            attribute = Attribute(
                key=key,
                value=_join(split[1]),
                line=line,
                commands=[code.strip() for code in _codes(split[1]) if code.strip()],
            )
            if any(not code.strip() for code in _codes(split[1])):
                self.error(line, "lint.empty_command", task=task.title)
        for child in item.children[1:]:
            if child.type == "fence":
                self._add_code_block(attribute.code_blocks, child, task.title)
            elif child.type in ("bullet_list", "ordered_list"):
                for sub in _list_items(child):
                    sub_inline = _first_inline(sub)
                    if sub_inline is not None:
                        attribute.items.append(self._check_inline(sub_inline).text)
        task.attributes.append(attribute)

    def _add_code_block(self, blocks: list[CodeBlock], fence: SyntaxTreeNode, title: str) -> None:
        line = fence.map[0] + 1
        text = fence.content
        if not text.strip():
            self.error(line, "lint.empty_command", task=title)
        blocks.append(CodeBlock(language=(fence.info or "").strip(), text=text.rstrip("\n"), line=line))

    def _check_duration(self, text: str, line: int, what: str) -> int | None:
        plain = text.replace("`", "")
        try:
            return parse_duration(plain)
        except DurationError as error:
            key = "lint.negative_duration" if error.reason == "negative" else "lint.unreadable_duration"
            self.error(line, key, value=plain, what=what)
            return None

    # -- verification -----------------------------------------------------

    def _read_verification(self, nodes: list[SyntaxTreeNode]) -> None:
        group: str | None = None
        for node in nodes:
            if node.type == "paragraph":
                label = _strong_label(node)
                if label is not None:
                    group = label.rstrip(":：").strip()
            elif node.type in ("bullet_list", "ordered_list"):
                self.runbook.verification.extend(self._read_tasks(node, "verification", group))

    # -- execution order --------------------------------------------------

    def _read_execution_order(self, nodes: list[SyntaxTreeNode]) -> None:
        phases = self.runbook.phases
        current: Phase | None = None
        seen_numbers: dict[int, int] = {}

        for node in nodes:
            if node.type == "paragraph":
                inline = _first_inline(node)
                parsed = self._check_inline(inline) if inline is not None else None
                text = (_strong_label(node) or (parsed.plain if parsed else "")).strip()
                line = node.map[0] + 1
                total = _TOTAL.match(text.rstrip(":："))
                if total:
                    self.runbook.total_planned_seconds = self._check_duration(total.group("value"), line, "total")
                    continue
                phase_match = _PHASE.match(text)
                if phase_match:
                    current = self._read_phase_heading(phase_match, line, seen_numbers)
                    phases.append(current)
                continue

            if node.type in ("bullet_list", "ordered_list"):
                if current is None:
                    self.runbook.phased = False
                    current = Phase(number=1, title="", planned_seconds=None, line=node.map[0] + 1)
                    phases.append(current)
                for item in _list_items(node):
                    current.lines.append(self._read_phase_line(item))

    def _read_phase_heading(self, match: re.Match, line: int, seen: dict[int, int]) -> Phase:
        number = int(match.group("number"))
        rest = match.group("rest").strip().rstrip(":：").strip()
        title = rest
        planned: int | None = None
        paren = _PARENTHETICAL.match(rest)
        if paren and looks_like_duration(paren.group("inner")):
            title = paren.group("title").strip()
            planned = self._check_duration(paren.group("inner"), line, "phase")
        if number in seen:
            self.error(line, "lint.duplicate_phase", number=number, first=seen[number])
        else:
            seen[number] = line
        if number < 1:
            self.error(line, "lint.invalid_phase_number", number=number)
        return Phase(number=number, title=title, planned_seconds=planned, line=line)

    def _read_line_item(self, item: SyntaxTreeNode) -> tuple[_Inline | None, int, list[str]]:
        """Read one numbered or bulleted line: its inline text, line number and commands."""
        inline = _first_inline(item)
        line = item.map[0] + 1
        if inline is None:
            return None, line, []
        parsed = self._check_inline(inline)
        if any(not code.strip() for code in parsed.codes):
            self.error(line, "lint.empty_command", task=parsed.plain)
        return parsed, line, [code.strip() for code in parsed.codes if code.strip()]

    def _read_phase_line(self, item: SyntaxTreeNode) -> PhaseLine:
        parsed, line, commands = self._read_line_item(item)
        if parsed is None:
            return PhaseLine(text="", line=line)
        return PhaseLine(text=parsed.text, line=line, commands=commands)

    # -- rollback plan ----------------------------------------------------

    def _read_rollback(self, nodes: list[SyntaxTreeNode]) -> None:
        current: RollbackGroup | None = None
        emergency = False
        for node in nodes:
            if node.type == "paragraph":
                label = _strong_label(node)
                inline = _first_inline(node)
                if inline is not None:
                    self._check_inline(inline)
                text = (label or (_Inline(inline).plain if inline else "")).strip().rstrip(":：").strip()
                line = node.map[0] + 1
                if _EMERGENCY.match(text):
                    emergency = True
                    current = None
                    continue
                emergency = False
                current = RollbackGroup(phases=self._rollback_phases(text, line), title=_group_title(text), line=line)
                self.runbook.rollback.append(current)
                continue

            if node.type not in ("bullet_list", "ordered_list"):
                continue
            for item in _list_items(node):
                rollback_line = self._read_rollback_line(item)
                if emergency:
                    self.runbook.emergency.append(rollback_line)
                elif current is not None:
                    current.lines.append(rollback_line)
                else:
                    # Bulleted shape: `マイグレーション失敗時: \`cmd\`` is a group of its own.
                    title, _, _ = rollback_line.text.partition(":")
                    if "：" in title:
                        title = title.partition("：")[0]
                    group = RollbackGroup(phases=[], title=title.strip().strip("`"), line=rollback_line.line)
                    group.lines.append(rollback_line)
                    self.runbook.rollback.append(group)

    def _rollback_phases(self, text: str, line: int) -> list[int]:
        match = _ROLLBACK_PHASES.search(text)
        if match is None:
            return []
        numbers: list[int] = []
        for part in re.split(r"[,、]", match.group("spec")):
            bounds = re.split(r"\s*(?:[-–~〜]|to)\s*", part.strip())
            low = int(bounds[0])
            high = int(bounds[-1])
            if high < low:
                self.error(line, "lint.invalid_phase_range", text=part.strip())
                continue
            numbers.extend(range(low, high + 1))
        return numbers

    def _read_rollback_line(self, item: SyntaxTreeNode) -> RollbackLine:
        parsed, line, commands = self._read_line_item(item)
        if parsed is None:
            return RollbackLine(text="", line=line)
        url_match = _URL.search(parsed.plain)
        return RollbackLine(text=parsed.text, line=line, commands=commands,
                            url=url_match.group(0) if url_match else None)

    # -- cross checks -----------------------------------------------------

    def _finish(self) -> None:
        runbook = self.runbook
        numbers = {phase.number for phase in runbook.phases}
        for group in runbook.rollback:
            if not group.phases:
                group.phases = sorted(numbers)
                continue
            for number in group.phases:
                if number not in numbers:
                    self.error(group.line, "lint.rollback_unknown_phase", number=number, title=group.title)
        for phase in runbook.phases:
            if not phase.title:
                phase.title = "実行" if _has_japanese(self.text) else "Execution"
        for phase in runbook.phases:
            if not phase.lines:
                self.warning(phase.line, "lint.empty_phase", number=phase.number)
        runbook.language = "ja" if _has_japanese(self.text) else "en"


def _group_title(text: str) -> str:
    paren = _PARENTHETICAL.match(text)
    if paren:
        return paren.group("inner").strip()
    return text.strip()


def _has_japanese(text: str) -> bool:
    return any(
        unicodedata.name(char, "").startswith(("CJK UNIFIED", "HIRAGANA", "KATAKANA")) for char in text[:20000]
    )


def _list_items(node: SyntaxTreeNode) -> list[SyntaxTreeNode]:
    return [child for child in node.children if child.type == "list_item"]


def _first_inline(node: SyntaxTreeNode) -> SyntaxTreeNode | None:
    for child in node.children:
        if child.type == "paragraph" and child.children:
            return child.children[0]
        if child.type == "inline":
            return child
    return None


def _inline_descendants(node: SyntaxTreeNode):
    if node.type == "inline":
        yield node
        return
    for child in node.children:
        yield from _inline_descendants(child)


def _strong_label(paragraph: SyntaxTreeNode) -> str | None:
    """Return the text of a paragraph that is one bold label, like `**Phase 1: 準備（15分）**`."""
    inline = _first_inline(paragraph)
    if inline is None:
        return None
    meaningful = [child for child in inline.children if not (child.type == "text" and not child.content.strip())]
    if len(meaningful) == 1 and meaningful[0].type == "strong":
        return _Inline(meaningful[0]).plain
    return None


def parse_runbook(text: str, path: str) -> Runbook:
    return RunbookParser(text, path).parse()


def read_runbook(path: str | Path) -> Runbook:
    """Read and parse a runbook file; unreadable files raise RunbookError."""
    file_path = Path(path)
    try:
        raw = file_path.read_bytes()
    except FileNotFoundError:
        raise RunbookError("runbook.not_found", path=str(path)) from None
    except IsADirectoryError:
        raise RunbookError("runbook.is_directory", path=str(path)) from None
    except PermissionError:
        raise RunbookError("runbook.permission_denied", path=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise RunbookError("runbook.not_utf8", path=str(path), line=line) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return parse_runbook(text, str(path))
