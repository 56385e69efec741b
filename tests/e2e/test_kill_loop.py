"""kill -9 of worker nodes in a loop while 2,000 jobs with dependencies and retries run
across three `taskqueue worker` processes.

Every job ends as its `simulate` block implies (all complete: the failures asked
for are fewer than the attempts allowed), no attempt of a job overlaps another,
and no node ever ran more than its capacity, checked from the attempt rows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.api.submission import parse_one
from queue_service.core.model import Resources
from queue_service.db import jobs
from queue_service.db.engine import create_engine
from queue_service.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TASKQUEUE = str(Path(sys.executable).parent / "taskqueue")
JOBS = 2000
CHAIN = 10  # each job depends on the one before it, in chains of ten
NODES = {"kill-a": 8, "kill-b": 8, "kill-c": 4}  # CPU units
KILLS = 6
KILL_EVERY_SECONDS = 1.5
LEASE_SECONDS = 2.0


class Worker:
    def __init__(self, url: str, node_id: str, cpu: int, **environment: str) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "TASKQUEUE_LEASE_SECONDS": str(LEASE_SECONDS),
            "TASKQUEUE_POLL_INTERVAL_SECONDS": "0.3",
            "TASKQUEUE_LEADER_INTERVAL_SECONDS": "0.5",
            **environment,
        }
        self.process = subprocess.Popen(
            [TASKQUEUE, "worker", "--node-id", node_id, "--cpu-units", str(cpu), "--memory-mb", str(cpu * 512)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def document(i: int) -> dict[str, Any]:
    simulate: dict[str, Any] = {"duration_seconds": 0.01 + (i % 5) * 0.01}
    if i % 7 == 0:
        simulate["fail_attempts"] = 1  # a retry asked for
    body: dict[str, Any] = {
        "job_id": f"k{i:04d}",
        "type": "kill_loop",
        "payload": {"simulate": simulate},
        "resource_requirements": {"cpu_units": 1 + i % 3, "memory_mb": 128},
        "retry_config": {"max_attempts": 6, "initial_delay_seconds": 0.1, "max_delay_seconds": 0.5},
    }
    if i % CHAIN:
        body["depends_on"] = [f"k{i - 1:04d}"]
    return body


async def submit(engine: AsyncEngine, documents: list[dict[str, Any]]) -> None:
    settings = Settings()
    for start in range(0, len(documents), 500):
        pairs = [parse_one(body) for body in documents[start : start + 500]]
        async with engine.begin() as conn:
            await jobs.submit(
                conn,
                [s for s, _ in pairs],
                [h for _, h in pairs],
                datetime.now(UTC),
                settings.policy_config(),
                [Resources(8, 4096)],
            )


async def statuses_when_settled(engine: AsyncEngine, timeout: float = 120) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT status, count(*) FROM jobs GROUP BY status"))).all()
        statuses: dict[str, int] = {status: count for status, count in rows}
        if set(statuses) <= {"completed", "failed", "cancelled"} or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.5)


async def test_kill_9_in_a_loop_loses_nothing_and_overlaps_nothing(migrated_url: str) -> None:
    engine = create_engine(Settings(database_url=migrated_url))
    workers: dict[str, Worker] = {}
    try:
        await submit(engine, [document(i) for i in range(JOBS)])
        workers = {node: Worker(migrated_url, node, cpu) for node, cpu in NODES.items()}
        names = list(NODES)
        for kill in range(KILLS):
            await asyncio.sleep(KILL_EVERY_SECONDS)
            victim = names[kill % len(names)]
            workers[victim].kill()  # mid-attempt: its leases lapse, the leader returns its jobs
            workers[victim] = Worker(migrated_url, victim, NODES[victim])  # and it comes back

        statuses = await statuses_when_settled(engine)
        async with engine.connect() as conn:
            lost = (
                await conn.execute(sa.text("SELECT count(*) FROM job_attempts WHERE outcome = 'worker_lost'"))
            ).scalar_one()
            overlapping = (
                await conn.execute(
                    sa.text(
                        "SELECT count(*) FROM job_attempts a JOIN job_attempts b"
                        " ON a.job_id = b.job_id AND b.attempt = a.attempt + 1"
                        " WHERE a.ended_at IS NULL OR a.ended_at > b.started_at"
                    )
                )
            ).scalar_one()
            # The most CPU any node held at once: a sweep over its attempts' start and end instants.
            peaks: dict[str, int] = dict(
                (
                    await conn.execute(
                        sa.text(
                            """
                            WITH edges AS (
                                SELECT a.node_id, a.started_at AS at, j.cpu_units AS change
                                FROM job_attempts a JOIN jobs j USING (job_id)
                                UNION ALL
                                SELECT a.node_id, a.ended_at, -j.cpu_units
                                FROM job_attempts a JOIN jobs j USING (job_id)
                            ), running AS (
                                SELECT node_id, sum(change) OVER (
                                    PARTITION BY node_id ORDER BY at, change ROWS UNBOUNDED PRECEDING
                                ) AS cpu
                                FROM edges
                            )
                            SELECT node_id, max(cpu) FROM running GROUP BY node_id
                            """
                        )
                    )
                ).all()
            )
    finally:
        for worker in workers.values():
            worker.stop()
        await engine.dispose()
    print(f"\nkill -9 loop: {KILLS} kills, {JOBS} jobs {statuses}, {lost} attempts lost and retried, peaks {peaks}")
    assert statuses == {"completed": JOBS}
    assert lost > 0  # the kills did hit running attempts
    assert overlapping == 0
    for node, cpu in NODES.items():
        assert peaks[node] <= cpu, (node, peaks[node])


async def test_sigterm_under_load_finishes_or_requeues_and_loses_nothing(migrated_url: str) -> None:
    engine = create_engine(Settings(database_url=migrated_url))
    leaving: Worker | None = None
    staying: Worker | None = None
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, nodes CASCADE"))
        slow = [
            {
                "job_id": f"t{i:03d}",
                "type": "sigterm",
                "payload": {"simulate": {"duration_seconds": 0.2 + (i % 4) * 0.4}},
            }
            for i in range(200)
        ]
        await submit(engine, slow)
        leaving = Worker(migrated_url, "term-a", 8, TASKQUEUE_SHUTDOWN_GRACE_SECONDS="0.5")
        await asyncio.sleep(3)  # well into the load: attempts of every length are running
        leaving.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(leaving.process.wait, 20)
        staying = Worker(migrated_url, "term-b", 8)
        statuses = await statuses_when_settled(engine)
        async with engine.connect() as conn:
            outcomes: dict[str, int] = dict(
                (
                    await conn.execute(
                        sa.text("SELECT outcome, count(*) FROM job_attempts WHERE node_id = 'term-a' GROUP BY outcome")
                    )
                ).all()
            )
    finally:
        for worker in (leaving, staying):
            if worker is not None:
                worker.stop()
        await engine.dispose()
    print(f"\nSIGTERM under load: exit {exit_code}, the stopped node's attempts {outcomes}, then {statuses}")
    assert exit_code == 0
    assert outcomes.get("interrupted", 0) > 0  # the grace ran out for the long ones: back to the queue
    assert outcomes.get("succeeded", 0) > 0  # the short ones finished
    assert set(outcomes) <= {"succeeded", "interrupted"}  # nothing lost, nothing failed by the stop
    assert statuses == {"completed": 200}
