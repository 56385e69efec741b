"""Leader election with a PostgreSQL advisory lock (SPEC §10, §11): one leader at a
time, its duties run under it, and when the leader dies another takes over
within a few seconds, in-process and as `taskqueue worker` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.core.model import Resources
from queue_service.db import attempts, insight, jobs, tables
from queue_service.db.engine import asyncpg_dsn, autocommit, create_engine
from queue_service.settings import Settings, normalize_database_url
from queue_service.worker.leader import LEADER_APPLICATION_PREFIX, LEADER_LOCK_KEY, Leader

pytestmark = pytest.mark.integration

TASKQUEUE = str(Path(sys.executable).parent / "taskqueue")
TAKEOVER_LIMIT_SECONDS = 5.0


def leader_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "leader_interval_seconds": 0.2,
        "lease_seconds": 2,
        "db_pool_size": 2,
        "db_max_overflow": 0,
    }
    return Settings(**(values | overrides))


@pytest.fixture
async def pair(migrated_url: str) -> AsyncIterator[tuple[list[Leader], list[AsyncEngine]]]:
    settings = leader_settings(migrated_url)
    engines = [create_engine(settings) for _ in range(2)]
    leaders = [Leader(engine, migrated_url, settings, f"candidate-{i}") for i, engine in enumerate(engines)]
    for leader in leaders:
        await leader.start()
    try:
        yield leaders, engines
    finally:
        for leader in leaders:
            await leader.stop()
        for engine in engines:
            await engine.dispose()


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> float:
    """Seconds until `condition()` holds."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def lock_holder(url: str) -> str | None:
    """The application name of the session holding the leader lock."""
    connection = await asyncpg.connect(asyncpg_dsn(normalize_database_url(url)))
    try:
        name: str | None = await connection.fetchval(
            """
            SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
            """,
            LEADER_LOCK_KEY,
        )
        return name
    finally:
        await connection.close()


async def dead_rows_and_vacuums(engine: AsyncEngine, table: str) -> tuple[int, int]:
    """A table's dead row versions and the VACUUMs run on it (not autovacuum's), as the
    statistics view counts them."""
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT n_dead_tup, vacuum_count FROM pg_stat_user_tables "
                    "WHERE schemaname = current_schema() AND relname = :table"
                ),
                {"table": table},
            )
        ).one()
    return int(row.n_dead_tup), int(row.vacuum_count)


async def test_exactly_one_leads(pair: tuple[list[Leader], list[AsyncEngine]], migrated_url: str) -> None:
    leaders, _ = pair
    await wait_for(lambda: any(leader.is_leader for leader in leaders))
    await asyncio.sleep(1)  # the other keeps trying, and keeps failing
    assert [leader.is_leader for leader in leaders].count(True) == 1
    current = next(leader for leader in leaders if leader.is_leader)
    assert await lock_holder(migrated_url) == LEADER_APPLICATION_PREFIX + current.node_id


async def test_the_other_takes_over_when_the_leader_connection_dies(
    pair: tuple[list[Leader], list[AsyncEngine]], migrated_url: str
) -> None:
    leaders, _ = pair
    await wait_for(lambda: any(leader.is_leader for leader in leaders))
    old = next(leader for leader in leaders if leader.is_leader)
    new = next(leader for leader in leaders if leader is not old)
    # Killed from the server side, as a crashed or partitioned leader's session would end.
    connection = await asyncpg.connect(asyncpg_dsn(normalize_database_url(migrated_url)))
    try:
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            LEADER_APPLICATION_PREFIX + old.node_id,
        )
    finally:
        await connection.close()
    seconds = await wait_for(lambda: new.is_leader)
    assert seconds < TAKEOVER_LIMIT_SECONDS
    await asyncio.sleep(0.5)
    assert not old.is_leader  # it noticed, and stands again as a follower
    assert await lock_holder(migrated_url) == LEADER_APPLICATION_PREFIX + new.node_id
    # And back: the new leader's connection dropped client-side this time.
    await new.drop_connection()
    await wait_for(lambda: old.is_leader)
    assert (old.terms, new.terms) == (2, 1)


async def test_the_leader_reaps_expired_leases(
    pair: tuple[list[Leader], list[AsyncEngine]], make_job: Callable[..., dict[str, Any]]
) -> None:
    leaders, engines = pair
    await wait_for(lambda: any(leader.is_leader for leader in leaders))
    expired = datetime.now(UTC) - timedelta(seconds=30)
    job_id = f"lost_{uuid.uuid4().hex[:8]}"
    async with engines[0].begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, cpu_used, memory_used) "
                "VALUES (:n, 8, 4096, 1, 128) ON CONFLICT DO NOTHING"
            ),
            {"n": "dead-node"},
        )
        row = make_job(job_id, "running", worker_id="dead-node", lease_expires_at=expired)
        await conn.execute(sa.insert(tables.jobs).values(row | {"started_at": datetime.now(UTC)}))
        await conn.execute(
            sa.text(
                "INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token) "
                "VALUES (:id, 1, 'dead-node', now(), :token)"
            ),
            {"id": job_id, "token": row["lease_token"]},
        )

    async def status() -> str:
        async with engines[1].begin() as conn:
            value = (await conn.execute(sa.text("SELECT status FROM jobs WHERE job_id = :id"), {"id": job_id})).scalar()
            return str(value)

    deadline = time.monotonic() + 10
    while await status() == "running" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await status() == "retrying"  # worker_lost counts as a failed attempt; two remain


async def test_a_silent_node_is_marked_lost_and_its_heartbeat_brings_it_back(
    pair: tuple[list[Leader], list[AsyncEngine]],
) -> None:
    leaders, engines = pair
    await wait_for(lambda: any(leader.is_leader for leader in leaders))
    async with engines[0].begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, status, heartbeat_at) "
                "VALUES ('silent-node', 64, 65536, 'active', now() - interval '1 minute'), "
                "       ('beating-node', 4, 2048, 'active', now() + interval '1 minute')"
            )
        )

    async def statuses() -> dict[str, str]:
        async with engines[1].begin() as conn:
            rows = await conn.execute(
                sa.text("SELECT node_id, status FROM nodes WHERE node_id IN ('silent-node', 'beating-node')")
            )
            return {node: status for node, status in rows}

    deadline = time.monotonic() + 10
    while (await statuses())["silent-node"] == "active" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await statuses() == {"silent-node": "lost", "beating-node": "active"}
    async with engines[0].begin() as conn:  # no longer offered as capacity to new jobs
        assert Resources(64, 65536) not in await jobs.live_capacities(conn)
        await attempts.renew_leases(conn, "silent-node", [], datetime.now(UTC), 2)
    assert (await statuses())["silent-node"] == "active"


class WorkerProcess:
    """One `taskqueue worker` process."""

    def __init__(self, url: str, node_id: str, cpu: int, memory: int) -> None:
        self.node_id = node_id
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "TASKQUEUE_LEADER_INTERVAL_SECONDS": "0.5",
            "TASKQUEUE_POLL_INTERVAL_SECONDS": "0.5",
        }
        self.process = subprocess.Popen(
            [TASKQUEUE, "worker", "--node-id", node_id, "--cpu-units", str(cpu), "--memory-mb", str(memory)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.mark.e2e
async def test_kill_9_the_leader_process_and_the_other_worker_takes_over(migrated_url: str) -> None:
    workers = [WorkerProcess(migrated_url, "proc-a", 8, 4096), WorkerProcess(migrated_url, "proc-b", 4, 2048)]
    try:
        deadline = time.monotonic() + 30
        holder = None
        while holder is None and time.monotonic() < deadline:
            holder = await lock_holder(migrated_url)
            await asyncio.sleep(0.1)
        assert holder is not None, [w.stderr() for w in workers]
        leader = next(w for w in workers if holder == LEADER_APPLICATION_PREFIX + w.node_id)
        survivor = next(w for w in workers if w is not leader)
        leader.process.kill()  # SIGKILL: no shutdown code runs; the kernel closes its sockets
        killed_at = time.monotonic()
        leader.process.wait()
        new_holder = None
        while time.monotonic() - killed_at < 15:
            new_holder = await lock_holder(migrated_url)
            # The killed process's server session holds the lock until the server notices
            # the closed socket: a moment, longer on a loaded machine.
            if new_holder not in (None, LEADER_APPLICATION_PREFIX + leader.node_id):
                break
            await asyncio.sleep(0.05)
        takeover = time.monotonic() - killed_at
        assert new_holder == LEADER_APPLICATION_PREFIX + survivor.node_id, survivor.stderr()
        assert takeover < TAKEOVER_LIMIT_SECONDS
        print(f"fail-over after kill -9: {takeover:.2f}s")
    finally:
        for worker in workers:
            worker.stop()


async def test_the_leader_compacts_the_queue_counters_and_vacuums_them(
    migrated_url: str, seed: Callable[..., Any]
) -> None:
    settings = leader_settings(migrated_url)
    engine = create_engine(settings)
    leader = Leader(engine, migrated_url, settings, "compactor")
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
            for first in range(1, 3001, 10):  # 300 statements: hundreds of delta rows
                await seed(conn, 10, first)

        async def counter_rows() -> int:
            async with engine.begin() as conn:
                return int((await conn.execute(sa.text("SELECT count(*) FROM queue_counters"))).scalar_one())

        async def vacuums() -> int:
            return (await dead_rows_and_vacuums(engine, "queue_rank_deltas"))[1]

        assert await counter_rows() > 256
        vacuumed_before = await vacuums()
        await leader.start()  # a new leader runs every duty at once
        deadline = time.monotonic() + 10
        while (await counter_rows() > 28 or await vacuums() == vacuumed_before) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await counter_rows() <= 28  # one row per (status, priority)
        assert await vacuums() > vacuumed_before  # what the fold deleted is vacuumed, not left for a minute
    finally:
        await leader.stop()
        await engine.dispose()


async def test_the_leader_vacuums_the_dead_rows_running_jobs_leave(migrated_url: str) -> None:
    """Each status change of a job leaves a dead row version (status is indexed, so no
    update is in place), kept in the partial indexes claims walk until a vacuum; a server
    whose autovacuum is off (or waits for a fifth of the table to be dead) lets them pile
    up. Past its threshold, and only then, the leader vacuums the table."""
    settings = leader_settings(migrated_url)
    engine = create_engine(settings)
    leader = Leader(engine, migrated_url, settings, "vacuumer")

    async def run_and_complete(first: int, count: int) -> None:
        """`count` jobs that ran and completed: two dead row versions each."""
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    """
                    INSERT INTO jobs (job_id, type, priority, status, cpu_units, memory_mb, max_attempts,
                                      backoff_multiplier, initial_delay_seconds, max_delay_seconds, jitter,
                                      timeout_seconds, request_hash, attempt_budget, ready_at, sort_key)
                    SELECT 'churned_' || g, 'work', 'normal', 'ready', 1, 128, 3, 2.0, 1.0, 60.0, 0.0, 30.0, 'h', 3,
                           now(), 1767225600 + g
                    FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g
                    """
                ),
                {"first": first, "last": first + count - 1},
            )
        for change in (
            "status = 'running', attempts = 1, worker_id = 'gone', started_at = now(), "
            "lease_token = gen_random_uuid(), lease_expires_at = now() + interval '1 hour'",
            "status = 'completed', finished_at = now(), lease_token = NULL, lease_expires_at = NULL",
        ):
            async with engine.begin() as conn:
                await conn.execute(sa.text(f"UPDATE jobs SET {change} WHERE status IN ('ready', 'running')"))

    async def dead_rows_seen(at_least: int) -> int:
        deadline = time.monotonic() + 10
        while (dead := (await dead_rows_and_vacuums(engine, "jobs"))[0]) < at_least and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # the statistics view sees a commit within a second or so
        return dead

    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
            # Whatever autovacuum this server runs must not do the leader's work meanwhile.
            await conn.execute(sa.text("ALTER TABLE jobs SET (autovacuum_enabled = false)"))
        await run_and_complete(1, 5_000)
        assert await dead_rows_seen(10_000) >= 10_000
        async with autocommit(engine) as conn:
            assert await insight.vacuum_churned(conn) == []  # 10,000 dead rows: below the threshold

        await run_and_complete(5_001, 6_000)
        assert await dead_rows_seen(22_000) >= 22_000
        _, vacuumed_before = await dead_rows_and_vacuums(engine, "jobs")
        await leader.start()  # a new leader runs every duty at once
        deadline = time.monotonic() + 10
        while (await dead_rows_and_vacuums(engine, "jobs"))[1] == vacuumed_before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        dead_after, vacuumed_after = await dead_rows_and_vacuums(engine, "jobs")
        assert vacuumed_after == vacuumed_before + 1
        assert dead_after == 0
    finally:
        await leader.stop()
        async with engine.begin() as conn:
            # Nothing left behind for the server's autovacuum to work on beside later tests.
            await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
            await conn.execute(sa.text("ALTER TABLE jobs RESET (autovacuum_enabled)"))
        await engine.dispose()
