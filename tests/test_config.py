"""postmerge.toml errors: each broken file gives one line naming the file and exit 2, never a traceback."""

from __future__ import annotations

import pytest

from conftest import REAL_RUNBOOK, run_cli


@pytest.mark.parametrize(("content", "expected"), [
    (None, "Is a directory"),
    (b"\xff\xfe", "cannot read config file"),
    (b"[environments.x\n", "cannot read config file"),
    (b"environments = 1\n", "environments must be a table, such as [environments.staging]"),
    (b"[environments]\nstaging = 3\n", "environments.staging must be a table"),
    (b"[environments.staging]\nunknown = 1\n", "unknown of environment staging is invalid"),
    (b"[environments.prod]\nprotected = true\n[environments.prod.monitor]\ntime_scale = 0.5\n",
     "time_scale must be 1 in a protected environment"),
    (b"[environments.prod]\nslack_incidents_channel = \"#incidents\"\n", "'#incidents' is not a Slack channel ID"),
    (b"[environments.prod]\noncall = [\"@alice\"]\n", "'@alice' is not a Slack user ID"),
])
def test_broken_config_one_line(tmp_path, content, expected):
    config = tmp_path / "postmerge.toml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    result = run_cli("plan", str(REAL_RUNBOOK), "--config", str(config), "--locale", "en", home=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
