"""EnvExecutor on real dotenv files in a temporary directory."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from bot.config import Environment
from bot.errors import StepError
from bot.plan import Step
from steps.base import OutputBuffer, StepContext
from steps.env import EnvExecutor, quote_value

RUNBOOK_VARIABLES = {
    "API_VERSION": "v2",
    "API_V1_DEPRECATION_DATE": "2025-03-31",
    "FEATURE_V2_RATE_LIMIT": "1000",
}


def make_context(
    tmp_path: Path,
    variables: dict[str, str],
    file: str = ".env.production",
    previous_data: dict[str, Any] | None = None,
) -> StepContext:
    step = Step(id="s1", title="environment variables", kind="env", source_line=1, variables=variables, file=file)
    return StepContext(
        run_id="run-1",
        step=step,
        environment=Environment(name="test", workdir=tmp_path),
        artifacts_dir=tmp_path,
        output=OutputBuffer(limit_bytes=1_000_000),
        timeout_seconds=10,
        previous_data=previous_data or {},
    )


def loaded(path: Path) -> dict[str, str | None]:
    return dict(dotenv_values(stream=io.StringIO(path.read_text()), interpolate=False))


async def test_env_replace_in_place(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    path.write_bytes(b"# API settings\nAPI_VERSION=v1\nexport API_V1_DEPRECATION_DATE='2025-06-30'\nOTHER=1\n")

    result = await EnvExecutor().execute(make_context(tmp_path, RUNBOOK_VARIABLES))

    assert path.read_bytes() == (
        b"# API settings\nAPI_VERSION=v2\nexport API_V1_DEPRECATION_DATE=2025-03-31\nOTHER=1\n"
        b"FEATURE_V2_RATE_LIMIT=1000\n"
    )
    assert result.data["file"] == str(path)
    assert result.data["existed"] is True
    assert result.data["previous"] == {
        "API_VERSION": "v1",
        "API_V1_DEPRECATION_DATE": "2025-06-30",
        "FEATURE_V2_RATE_LIMIT": None,
    }


async def test_env_append_without_final_newline(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    path.write_bytes(b"OTHER=1")

    result = await EnvExecutor().execute(make_context(tmp_path, {"API_VERSION": "v2"}))

    assert path.read_bytes() == b"OTHER=1\nAPI_VERSION=v2\n"
    assert result.data["added_newline"] is True


async def test_env_create_missing_file(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"

    result = await EnvExecutor().execute(make_context(tmp_path, RUNBOOK_VARIABLES))

    assert path.read_bytes() == b"API_VERSION=v2\nAPI_V1_DEPRECATION_DATE=2025-03-31\nFEATURE_V2_RATE_LIMIT=1000\n"
    assert result.data["existed"] is False
    assert set(result.data["previous"].values()) == {None}
    assert os.listdir(tmp_path) == [".env.production"]


async def test_env_keeps_comments_blank_lines_crlf(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    original = (
        b"# production settings\r\n"
        b"\r\n"
        b"DATABASE_URL=\"postgresql://app@db/app\" # primary\r\n"
        b"  API_VERSION = v1  # old default\r\n"
        b"\r\n"
        b"# trailing comment\r\n"
    )
    path.write_bytes(original)

    await EnvExecutor().execute(make_context(tmp_path, {"API_VERSION": "v2", "NEW_KEY": "a b"}))

    assert path.read_bytes() == (
        b"# production settings\r\n"
        b"\r\n"
        b"DATABASE_URL=\"postgresql://app@db/app\" # primary\r\n"
        b"  API_VERSION=v2\r\n"
        b"\r\n"
        b"# trailing comment\r\n"
        b"NEW_KEY='a b'\r\n"
    )


async def test_env_keeps_file_mode(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    path.write_bytes(b"API_VERSION=v1\n")
    path.chmod(0o640)

    await EnvExecutor().execute(make_context(tmp_path, {"API_VERSION": "v2"}))

    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_env_replaces_last_duplicate(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    path.write_bytes(b"API_VERSION=v0\nAPI_VERSION=v1\n")

    result = await EnvExecutor().execute(make_context(tmp_path, {"API_VERSION": "v2"}))

    assert path.read_bytes() == b"API_VERSION=v0\nAPI_VERSION=v2\n"
    assert result.data["previous"] == {"API_VERSION": "v1"}


async def test_env_replaces_multiline_value(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    path.write_bytes(b"CERT=\"line one\nline two\"\nAPI_VERSION=v1\n")

    await EnvExecutor().execute(make_context(tmp_path, {"CERT": "none"}))

    assert path.read_bytes() == b"CERT=none\nAPI_VERSION=v1\n"


async def test_env_repeat_keeps_original_previous(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    path.write_bytes(b"API_VERSION=v1\n")
    saved: list[dict[str, Any]] = []
    first = make_context(tmp_path, {"API_VERSION": "v2", "FEATURE_V2_RATE_LIMIT": "1000"})

    async def checkpoint(data: dict[str, Any]) -> None:
        saved.append(data)

    first.checkpoint = checkpoint
    await EnvExecutor().execute(first)
    # The first attempt was interrupted after its write, so the file already
    # has the new values and the repeat gets only the checkpointed data.
    repeat = make_context(tmp_path, {"API_VERSION": "v2", "FEATURE_V2_RATE_LIMIT": "1000"}, previous_data=saved[0])

    result = await EnvExecutor().execute(repeat)

    assert result.data["previous"] == {"API_VERSION": "v1", "FEATURE_V2_RATE_LIMIT": None}
    assert result.data["existed"] is True
    assert path.read_bytes() == b"API_VERSION=v2\nFEATURE_V2_RATE_LIMIT=1000\n"


async def test_env_rollback_restores_bytes(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    original = (
        b"# API\r\n"
        b"export API_VERSION=\"v1\"  # default\r\n"
        b"\r\n"
        b"  API_V1_DEPRECATION_DATE='2025-06-30'\r\n"
        b"OTHER=1"
    )
    path.write_bytes(original)
    executor = EnvExecutor()
    result = await executor.execute(make_context(tmp_path, RUNBOOK_VARIABLES))
    assert path.read_bytes() != original

    await executor.rollback(make_context(tmp_path, RUNBOOK_VARIABLES, previous_data=result.data))

    assert path.read_bytes() == original


async def test_env_rollback_deletes_created_file(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    executor = EnvExecutor()
    result = await executor.execute(make_context(tmp_path, RUNBOOK_VARIABLES))

    await executor.rollback(make_context(tmp_path, RUNBOOK_VARIABLES, previous_data=result.data))

    assert not path.exists()


async def test_env_rollback_after_repeat(tmp_path: Path) -> None:
    path = tmp_path / ".env.production"
    original = b"API_VERSION=v1\n"
    path.write_bytes(original)
    executor = EnvExecutor()
    first = await executor.execute(make_context(tmp_path, {"API_VERSION": "v2"}))
    repeat = await executor.execute(make_context(tmp_path, {"API_VERSION": "v2"}, previous_data=first.data))

    await executor.rollback(make_context(tmp_path, {"API_VERSION": "v2"}, previous_data=repeat.data))

    assert path.read_bytes() == original


@pytest.mark.parametrize("key", ["1API", "API-VERSION", "API VERSION", "", "API_VERSION=v2"])
async def test_env_invalid_key(tmp_path: Path, key: str) -> None:
    path = tmp_path / ".env.production"
    path.write_bytes(b"API_VERSION=v1\n")

    with pytest.raises(StepError) as caught:
        await EnvExecutor().execute(make_context(tmp_path, {key: "v2"}))

    assert caught.value.key == "env.invalid_key"
    assert caught.value.params["name"] == key
    assert caught.value.params["file"] == str(path)
    assert path.read_bytes() == b"API_VERSION=v1\n"


async def test_env_value_with_newline(tmp_path: Path) -> None:
    with pytest.raises(StepError) as caught:
        await EnvExecutor().execute(make_context(tmp_path, {"API_VERSION": "v2\nEVIL=1"}))

    assert caught.value.key == "env.value_has_newline"
    assert not (tmp_path / ".env.production").exists()


async def test_env_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StepError) as caught:
        await EnvExecutor().execute(make_context(tmp_path, {"API_VERSION": "v2"}, file="absent/.env"))

    assert caught.value.key == "env.write_failed"
    assert "absent/.env" in caught.value.render("en")


async def test_env_keeps_symlink(tmp_path: Path) -> None:
    target = tmp_path / "shared.env"
    target.write_bytes(b"API_VERSION=v1\n")
    (tmp_path / ".env.production").symlink_to(target)

    await EnvExecutor().execute(make_context(tmp_path, {"API_VERSION": "v2"}))

    assert (tmp_path / ".env.production").is_symlink()
    assert target.read_bytes() == b"API_VERSION=v2\n"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("v2", "v2"),
        ("", ""),
        ("postgresql://app@db:5432/app", "postgresql://app@db:5432/app"),
        ("two words", "'two words'"),
        ("a#b", "'a#b'"),
        ("it's", '"it\'s"'),
        ('say "hi" \\o/', '"say \\"hi\\" \\\\o/"'),
        ("C:\\app", '"C:\\\\app"'),
        ("日本語", "'日本語'"),
    ],
)
def test_env_quote_value_round_trip(tmp_path: Path, value: str, written: str) -> None:
    quoted = quote_value(value)
    path = tmp_path / ".env"
    path.write_text(f"KEY={quoted}\n")

    assert quoted == written
    assert loaded(path)["KEY"] == value
