"""Retention: old completed and cancelled jobs are deleted, with their attempts and
log; failed jobs (the dead-letter queue), recent jobs and jobs others depend on stay."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.cli import parse_duration
from queue_service.db.retention import purge_finished
from queue_service.settings import Settings
from queue_service.worker.leader import Leader

pytestmark = pytest.mark.integration

LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


async def _finished(engine: AsyncEngine, job_id: str, status: str, finished_at: datetime) -> None:
    reason = {"completed": {}, "cancelled": {"cancel_reason": "user"}, "failed": {"failure_reason": "permanent_error"}}
    columns = {
        "job_id": job_id,
        "type": "work",
        "priority": "normal",
        "status": status,
        "cpu_units": 1,
        "memory_mb": 128,
        "max_attempts": 3,
        "backoff_multiplier": 2.0,
        "initial_delay_seconds": 1.0,
        "max_delay_seconds": 60.0,
        "jitter": 0.0,
        "timeout_seconds": 30.0,
        "request_hash": "h",
        "attempt_budget": 3,
        "finished_at": finished_at,
        **reason[status],
    }
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"),
            columns,
        )
        await conn.execute(
            sa.text("INSERT INTO job_events (job_id, event, message) VALUES (:id, 'submitted', '')"), {"id": job_id}
        )


async def _ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.execute(sa.text("SELECT job_id FROM jobs"))).scalars())


async def test_only_old_finished_jobs_nobody_depends_on_are_purged(engine: AsyncEngine) -> None:
    await _finished(engine, "old-done", "completed", LONG_AGO)
    await _finished(engine, "old-cancelled", "cancelled", LONG_AGO)
    await _finished(engine, "old-failed", "failed", LONG_AGO)
    await _finished(engine, "recent-done", "completed", datetime.now(UTC))
    await _finished(engine, "old-parent", "completed", LONG_AGO)
    await _finished(engine, "recent-child", "completed", datetime.now(UTC))
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("INSERT INTO job_dependencies (job_id, depends_on_job_id) VALUES ('recent-child', 'old-parent')")
        )
        purged = await purge_finished(conn, datetime.now(UTC) - timedelta(days=1))
    assert purged == 2
    assert await _ids(engine) == {"old-failed", "recent-done", "old-parent", "recent-child"}
    async with engine.connect() as conn:
        orphans = (
            await conn.execute(sa.text("SELECT count(*) FROM job_events WHERE job_id IN ('old-done', 'old-cancelled')"))
        ).scalar()
    assert orphans == 0


def test_the_purge_command_deletes_in_batches(migrated_url: str) -> None:
    taskqueue = str(Path(sys.executable).parent / "taskqueue")
    result = subprocess.run(
        [taskqueue, "purge", "--older-than", "7d"],
        env={**os.environ, "DATABASE_URL": migrated_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("purged ")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), ("1.5h", 5400)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "d", "-1h", "0", "soon"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(Exception, match="duration"):
        parse_duration(text)


async def test_the_leader_purges_when_retention_is_set(engine: AsyncEngine, migrated_url: str) -> None:
    await _finished(engine, "leader-old", "completed", LONG_AGO)
    settings = Settings(database_url=migrated_url, retention_seconds=86_400, leader_interval_seconds=0.2)
    leader = Leader(engine, migrated_url, settings, "retention-node")
    await leader.start()
    try:
        for _ in range(100):
            if "leader-old" not in await _ids(engine):
                break
            await asyncio.sleep(0.05)
    finally:
        await leader.stop()
    assert "leader-old" not in await _ids(engine)
