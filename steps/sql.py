"""The sql step: one read-only query against the environment's database.

The query runs in a READ ONLY transaction on a session that also starts with
`default_transaction_read_only` on, so PostgreSQL rejects any write. Rows
are written to the step output as an aligned text table.
"""

from __future__ import annotations

import asyncio
import decimal
import unicodedata
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from bot.errors import StepError
from bot.i18n import translate
from bot.plan import Step
from steps.base import BaseExecutor, StepContext, StepResult

if TYPE_CHECKING:
    import asyncpg

# Rows shown in the output; the rest are counted and reported as left out.
MAX_OUTPUT_ROWS = 200
# Longer cell values are cut to this many characters in the table.
MAX_CELL_CHARS = 200
# Rows fetched from the server per round trip while counting.
CURSOR_PREFETCH = 500
# Maximum seconds to wait for the connection before the query, below the step's timeout.
MAX_CONNECT_SECONDS = 30.0
CLOSE_TIMEOUT_SECONDS = 5.0
# The query ends this much (at most 10% of the timeout) before the step's timeout.
FINISH_MARGIN_SECONDS = 0.25

_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


def finish_margin(timeout_seconds: float) -> float:
    """Return how long before the step's timeout the query must end.

    The engine cancels the step at its timeout, so the executor stops a bit
    earlier to raise its own error, which names the query.
    """
    return min(FINISH_MARGIN_SECONDS, timeout_seconds * 0.1)


class SqlExecutor(BaseExecutor):
    kind = "sql"

    def repeat_safe(self, step: Step) -> bool:
        return True

    async def execute(self, context: StepContext) -> StepResult:
        import asyncpg

        step = context.step
        query = (step.query or "").strip()
        if not query:
            raise StepError("sql.missing_query", step=step.id, title=step.title)
        dsn = _database_url(context)
        redacted_url = redact_url(dsn)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + context.timeout_seconds - finish_margin(context.timeout_seconds)
        try:
            connection = await asyncpg.connect(
                dsn,
                timeout=max(min(deadline - loop.time(), MAX_CONNECT_SECONDS), 0.001),
                server_settings={"application_name": "postmerge", "default_transaction_read_only": "on"},
            )
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise StepError(
                "sql.connection_failed",
                url=redacted_url,
                environment=context.environment.name,
                query=query,
                error=_describe_error(error),
            ) from None

        query_params = {"query": query, "url": redacted_url}
        started = loop.time()
        statement_timeout = max(deadline - started, 0.001)
        try:
            columns, first_rows, row_count = await _run_query(connection, query, statement_timeout)
        except asyncpg.ReadOnlySQLTransactionError as error:
            raise StepError("sql.write_rejected", error=_describe_error(error), **query_params) from None
        except asyncpg.QueryCanceledError as error:
            # The server also cancels a query on pg_cancel_backend(). The elapsed
            # time distinguishes that from statement_timeout without parsing the
            # message, which the server may have translated.
            if loop.time() - started < statement_timeout * 0.9:
                raise StepError("sql.query_failed", error=_describe_error(error), **query_params) from None
            raise StepError(
                "sql.timed_out",
                timeout=context.timeout_seconds,
                error=_describe_error(error),
                **query_params,
            ) from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise StepError("sql.query_failed", error=_describe_error(error), **query_params) from None
        finally:
            await _close(connection)

        for line in format_table(columns, first_rows):
            context.output.write(line)
        if row_count > len(first_rows):
            context.output.write(f"... {row_count - len(first_rows)} more rows not shown")
        context.output.write(f"({row_count} rows)")

        summary = translate("sql.summary", context.locale, rows=row_count)
        return StepResult(ok=True, summary=summary, data={"rows": row_count, "columns": columns})


async def _run_query(
    connection: asyncpg.Connection, query: str, statement_timeout: float
) -> tuple[list[str], list[tuple[Any, ...]], int]:
    """Run the query in a READ ONLY transaction and return its columns, first rows and row count."""
    first_rows: list[tuple[Any, ...]] = []
    count = 0
    async with connection.transaction(readonly=True):
        # The server stops the query by itself, and the step reports that as
        # sql.timed_out, before the engine's timeout cancels the whole step.
        await connection.execute(f"SET LOCAL statement_timeout = {max(1, round(statement_timeout * 1000))}")
        statement = await connection.prepare(query)
        columns = [attribute.name for attribute in statement.get_attributes()]
        if not columns:
            # A statement that returns no rows, such as SET, cannot open a cursor.
            await statement.fetch()
            return columns, first_rows, count
        async for record in statement.cursor(prefetch=CURSOR_PREFETCH):
            count += 1
            if len(first_rows) < MAX_OUTPUT_ROWS:
                first_rows.append(tuple(record.values()))
    return columns, first_rows, count


async def _close(connection: asyncpg.Connection) -> None:
    # close() first waits for a cancelled query's cancel request to reach the
    # server, so the query stops there too. The shield lets it finish even when
    # this task is cancelled again meanwhile.
    try:
        await asyncio.shield(connection.close(timeout=CLOSE_TIMEOUT_SECONDS))
    except Exception:  # noqa: BLE001 - close() has aborted the connection, and its error must not replace the query's
        pass


def _database_url(context: StepContext) -> str:
    url = context.environment.database_url
    if not url:
        raise StepError("sql.missing_database_url", environment=context.environment.name)
    if not url.startswith(_SCHEMES):
        raise StepError(
            "sql.invalid_database_url",
            environment=context.environment.name,
            url=redact_url(url),
        )
    if url.startswith("postgresql+asyncpg://"):
        url = "postgresql://" + url[len("postgresql+asyncpg://") :]
    return url


def redact_url(url: str) -> str:
    """Return the URL with its password replaced by ***, for messages and output."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _describe_error(error: BaseException) -> str:
    """Return PostgreSQL's message with its detail and hint, or the error's own text."""
    import asyncpg

    if isinstance(error, asyncpg.PostgresError):
        text = f"{error.sqlstate}: {error}" if error.sqlstate else str(error)
        position = getattr(error, "position", None)
        if position:
            text += f" (at character {position})"
        detail = getattr(error, "detail", None)
        if detail:
            text += f". DETAIL: {detail}"
        hint = getattr(error, "hint", None)
        if hint:
            text += f". HINT: {hint}"
        return text
    if isinstance(error, asyncio.TimeoutError):
        return "connection timed out"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def format_table(columns: list[str], rows: list[tuple[Any, ...]]) -> list[str]:
    """Format rows as an aligned text table: header, rule, then one line per row.

    Numbers are right-aligned like psql does. Widths count East Asian wide
    characters as two columns, so Japanese text stays aligned in a terminal.
    """
    if not columns:
        return []
    cells = [[_cell_text(value) for value in row] for row in rows]
    numeric = [
        bool(rows) and all(_is_number(row[index]) or row[index] is None for row in rows)
        for index in range(len(columns))
    ]
    widths = [
        max([display_width(name)] + [display_width(row[index]) for row in cells])
        for index, name in enumerate(columns)
    ]

    lines = [_format_line(columns, widths, [False] * len(columns))]
    lines.append("-+-".join("-" * width for width in widths))
    for row in cells:
        lines.append(_format_line(row, widths, numeric))
    return lines


def _format_line(values: list[str], widths: list[int], right_align: list[bool]) -> str:
    padded = []
    for value, width, right in zip(values, widths, right_align):
        padding = " " * (width - display_width(value))
        padded.append(padding + value if right else value + padding)
    return " | ".join(padded).rstrip()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool)


def _cell_text(value: Any) -> str:
    if value is None:
        return "NULL"
    text = str(value).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    if len(text) > MAX_CELL_CHARS:
        text = text[: MAX_CELL_CHARS - 1] + "…"
    return text


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in text)
