"""The `taskqueue` command: migrate, flags over environment, JSON logs, and the
worker process exiting 0 after a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from queue_service.cli import JsonFormatter, app, load_settings
from queue_service.db.engine import create_engine
from queue_service.settings import Settings

pytestmark = pytest.mark.integration

TASKQUEUE = str(Path(sys.executable).parent / "taskqueue")


def test_migrate_builds_the_schema(database_url: str, run_blocking: Any) -> None:
    result = CliRunner().invoke(app, ["migrate", "--log-level", "warning"], env={"DATABASE_URL": database_url})
    assert result.exit_code == 0, result.output
    assert "database schema at revision" in result.output

    async def tables() -> set[str]:
        engine = create_engine(Settings(database_url=database_url))
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
                return {r.tablename for r in rows}
        finally:
            await engine.dispose()

    assert {"jobs", "job_dependencies", "job_events", "nodes", "dispatch_control"} <= run_blocking(tables())


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKQUEUE_NODE_CPU_UNITS", "16")
    monkeypatch.setenv("TASKQUEUE_NODE_MEMORY_MB", "2048")
    settings = load_settings(node_cpu_units=4, node_memory_mb=None, node_id="n-7")
    assert (settings.node_cpu_units, settings.node_memory_mb, settings.node_id) == (4, 2048, "n-7")


def test_log_lines_are_json_with_job_context() -> None:
    record = logging.LogRecord("queue_service.worker", logging.WARNING, __file__, 1, "attempt %d failed", (2,), None)
    record.job_id = "job_1"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning"
    assert line["message"] == "attempt 2 failed"
    assert line["job_id"] == "job_1"
    assert line["ts"].endswith("Z")


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_worker_process_stops_gracefully_and_exits_0(migrated_url: str, sig: signal.Signals) -> None:
    env = {**os.environ, "DATABASE_URL": migrated_url, "TASKQUEUE_SHUTDOWN_GRACE_SECONDS": "1"}
    process = subprocess.Popen(
        [TASKQUEUE, "worker", "--node-id", f"cli-{sig.name}", "--cpu-units", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Its own session, so a Ctrl+C at the terminal stops pytest, not the process under test.
        start_new_session=True,
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while not any("service ready" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(process.stderr.readline())
        process.send_signal(sig)
        _, rest = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, rest
    events = [json.loads(line)["message"] for line in rest.splitlines() if line.startswith("{")]
    assert any(f"{sig.name} received" in message for message in events)
    assert any(message == f"node cli-{sig.name} stopped" for message in events)
