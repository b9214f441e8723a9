"""Measure the engine's overhead per step, and the start-up time of `postmerge plan`.

The engine runs a generated runbook of STEPS shell steps that each run
/bin/true, with the run stored in SQLite and in PostgreSQL. The baseline is a
bash script that runs /bin/true STEPS times. Overhead per step is
(engine time - baseline time) / STEPS, so it includes the engine's own
`bash -c` per step, its store writes and its events.

Usage: .venv/bin/python bench/engine_overhead.py [--steps 200] [--repeat 3]
Needs PostgreSQL at 127.0.0.1:5432 (POSTMERGE_TEST_PG_URL overrides it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.config import Environment  # noqa: E402 - after the path set-up above
from bot.engine import Engine  # noqa: E402
from bot.gates import GateAnswer  # noqa: E402
from bot.parser import parse_runbook  # noqa: E402
from bot.planner import build_plan  # noqa: E402
from storage import Store  # noqa: E402

PG_ADMIN_URL = os.environ.get("POSTMERGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def generated_runbook(steps: int) -> str:
    tasks = "\n".join(f"- [ ] step {index:03d}: `/bin/true`" for index in range(steps))
    lines = "\n".join(f"{index + 1}. step {index:03d}" for index in range(steps))
    return (f"# Post-Merge Tasks: bench\n\n## Tasks\n\n### Custom\n{tasks}\n\n## Execution Notes\n\n"
            f"### Execution Order\n\n**Phase 1: bench（10分）**\n{lines}\n")


class NoPrompt:
    async def answer(self, request):
        return GateAnswer("approved", "bench")


async def time_engine(store_url: str, steps: int, workdir: Path) -> float:
    environment = Environment(name="bench", workdir=workdir, writeback=False)
    runbook = parse_runbook(generated_runbook(steps), str(workdir / "bench.md"))
    plan, _ = build_plan(runbook, environment)
    store = await Store.open(store_url)
    try:
        engine = Engine(store, environment, NoPrompt(), [], home=workdir / "home", locale="en")
        run_id = await engine.start(plan, started_by="bench")
        started = time.perf_counter()
        outcome = await engine.drive(run_id)
        elapsed = time.perf_counter() - started
        assert outcome.status == "completed", outcome
        return elapsed
    finally:
        await store.close()


def time_bash(steps: int) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-c", f"for i in $(seq {steps}); do /bin/true; done"], check=True)
    return time.perf_counter() - started


async def create_pg_database() -> tuple[str, str]:
    name = f"postmerge_bench_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return name, f"{base}/{name}"


async def drop_pg_database(name: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def time_plan_command(repeat: int) -> tuple[float, bool]:
    """Return the median wall time of `postmerge plan` and whether heavy clients stayed unimported."""
    runbook = REPO / "examples" / "api-v2-migration.md"
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bot.cli", "plan", str(runbook), "--json"], check=True,
                       stdout=subprocess.DEVNULL, cwd=REPO)
        times.append(time.perf_counter() - started)
    probe = ("import sys; from bot.cli import main; main(['plan', 'examples/api-v2-migration.md', '--json']) if False "
             "else None; from bot.commands import load_and_plan; from pathlib import Path; "
             "load_and_plan(Path('examples/api-v2-migration.md'), None); "
             "print(any(name.split('.')[0] in ('kubernetes_asyncio', 'datadog_api_client', 'slack_bolt', "
             "'sqlalchemy', 'aiohttp') for name in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=REPO)
    return statistics.median(times), heavy.stdout.strip() == "False"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    bash = statistics.median(time_bash(args.steps) for _ in range(args.repeat))
    print(f"bash baseline: {bash * 1000:.0f} ms for {args.steps} x /bin/true")

    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        sqlite_times = []
        for attempt in range(args.repeat):
            url = f"sqlite+aiosqlite:///{workdir / f'bench-{attempt}.db'}"
            sqlite_times.append(await time_engine(url, args.steps, workdir))
        pg_times = []
        for _ in range(args.repeat):
            name, url = await create_pg_database()
            try:
                pg_times.append(await time_engine(url, args.steps, workdir))
            finally:
                await drop_pg_database(name)

    for label, times in (("sqlite", sqlite_times), ("postgresql", pg_times)):
        total = statistics.median(times)
        overhead = (total - bash) / args.steps * 1000
        print(f"engine on {label}: {total * 1000:.0f} ms total, {overhead:.2f} ms overhead per step "
              f"(runs: {', '.join(f'{value * 1000:.0f}' for value in times)} ms)")

    plan_time, light = time_plan_command(5)
    print(f"postmerge plan (real runbook): median {plan_time * 1000:.0f} ms of 5; "
          f"heavy clients imported while planning: {'no' if light else 'yes'}")


if __name__ == "__main__":
    asyncio.run(main())
