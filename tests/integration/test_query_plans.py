"""Every hot path is an index scan, not a scan of jobs (SPEC §7).

The module's database holds 20,000 jobs in a realistic mix of statuses, with
dependency edges and log entries, analysed as production statistics would be;
each query the service runs on a hot path is EXPLAINed and must name the index
built for it and contain no sequential scan.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from nested_plans import nested_plans
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from queue_service.core.model import Resources
from queue_service.core.policy import PolicyConfig
from queue_service.core.validation import parse_job_spec
from queue_service.db import attempts, driver, insight, jobs, migrate, tables
from queue_service.db.engine import asyncpg_dsn
from queue_service.settings import normalize_database_url

pytestmark = pytest.mark.integration

JOB_COUNT = 20_000
CURSOR = "(timestamptz '2026-01-01 00:00:00+00' + interval '10000 seconds', 'job_10000')"

# name -> (query as the service would send it, the index it must use)
HOT_PATHS = {
    "dispatch window": (
        "SELECT job_id, sort_key, cpu_units, memory_mb, timeout_seconds FROM jobs"
        " WHERE status = 'ready' ORDER BY sort_key, job_id LIMIT 256 FOR UPDATE SKIP LOCKED",
        "ix_jobs_ready_queue",
    ),
    "position in queue": (
        # The jobs of the job's own second; the rest of a position comes from bucket counts.
        "SELECT count(*) FROM jobs WHERE status = 'ready' AND sort_key >= 1767225600.0"
        " AND (sort_key, job_id) < (1767225600.5, 'job_5')",
        "ix_jobs_ready_queue",
    ),
    "retry wake-up": (
        "SELECT job_id FROM jobs WHERE status = 'retrying' AND next_attempt_at <= now()"
        " ORDER BY next_attempt_at LIMIT 100 FOR UPDATE SKIP LOCKED",
        "ix_jobs_retry_due",
    ),
    "lease expiry": (
        "SELECT job_id FROM jobs WHERE status = 'running' AND lease_expires_at < now()"
        " ORDER BY lease_expires_at LIMIT 100 FOR UPDATE SKIP LOCKED",
        "ix_jobs_lease_expiry",
    ),
    "get a job (the statement GET /jobs/{id} runs)": (
        jobs.PUBLIC_ONE_SQL.sql.replace("$1::VARCHAR", "'job_42'"),
        "pk_jobs",
    ),
    "get jobs by id (a batch's replays)": (
        jobs.PUBLIC_BY_ID_SQL.sql.replace("$1::TEXT[]", "ARRAY['job_42', 'job_43']"),
        "pk_jobs",
    ),
    "list, first page": (
        "SELECT * FROM jobs ORDER BY created_at DESC, job_id DESC LIMIT 51",
        "ix_jobs_created",
    ),
    "list, next page": (
        f"SELECT * FROM jobs WHERE (created_at, job_id) < {CURSOR} ORDER BY created_at DESC, job_id DESC LIMIT 51",
        "ix_jobs_created",
    ),
    # A common status, asked as jobs.list_query asks it (a range, the status first in the order).
    "list by status": (
        f"SELECT * FROM jobs WHERE status >= 'completed' AND status <= 'completed' AND (created_at, job_id) < {CURSOR}"
        " ORDER BY status, created_at DESC, job_id DESC LIMIT 51",
        "ix_jobs_status_created",
    ),
    # A rare type, where filtering ix_jobs_created would read most of it to fill a page.
    "list by type": (
        "SELECT * FROM jobs WHERE type = 'rare_report' ORDER BY created_at DESC, job_id DESC LIMIT 51",
        "ix_jobs_type_created",
    ),
    "dead-letter queue": (
        "SELECT * FROM jobs WHERE status = 'failed' ORDER BY finished_at DESC, job_id DESC LIMIT 51",
        "ix_jobs_dead_letter",
    ),
    "dependants of a completed job": (
        "SELECT job_id FROM job_dependencies WHERE depends_on_job_id = 'job_77'",
        "ix_job_dependencies_depends_on_job_id",
    ),
    "job log": (
        "SELECT * FROM job_log WHERE job_id = 'job_42' ORDER BY at, step, seq",
        "pk_job_events",
    ),
}


async def populate(url: str, seed: Callable[..., Coroutine[Any, Any, None]]) -> None:
    engine = create_async_engine(normalize_database_url(url), poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await seed(connection, JOB_COUNT)
            await connection.execute(sa.text("UPDATE jobs SET type = 'rare_report' WHERE job_id LIKE 'job_%77'"))
            # Each blocked job waits on the job before it; three log entries per job.
            await connection.execute(
                sa.text(
                    "INSERT INTO job_dependencies (job_id, depends_on_job_id)"
                    " SELECT job_id, 'job_' || (substring(job_id FROM 5)::int - 1) FROM jobs"
                    " WHERE status = 'blocked'"
                )
            )
            await connection.execute(
                sa.text(
                    "INSERT INTO job_events (job_id, event, attempt) SELECT job_id, event, 1"
                    " FROM jobs CROSS JOIN unnest(ARRAY['submitted', 'ready', 'started']) AS event"
                )
            )
    finally:
        await engine.dispose()
    # Statistics (and the visibility map for index-only scans) as a live database has them.
    raw = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await raw.execute("VACUUM ANALYZE jobs, job_dependencies, job_events")
    finally:
        await raw.close()


@pytest.fixture(scope="module")
def populated_url(
    migrated_url: str,
    seed: Callable[..., Coroutine[Any, Any, None]],
    run_blocking: Callable[[Coroutine[Any, Any, None]], None],
) -> str:
    run_blocking(populate(migrated_url, seed))
    return migrated_url


async def explain(url: str, query: str) -> str:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await connection.fetch(f"EXPLAIN {query}")
    finally:
        await connection.close()
    return "\n".join(row[0] for row in rows)


async def submit_burst(url: str, numbers: range) -> None:
    """Jobs `burst_<number>` (five digits), as a burst arrives: batches of 1000 through
    the submission path, payload, log rows and all."""
    engine = create_async_engine(normalize_database_url(url), poolclass=NullPool)
    try:
        for first in range(numbers.start, numbers.stop, 1000):
            ids = [f"burst_{i:05}" for i in range(first, min(first + 1000, numbers.stop))]
            specs = [parse_job_spec({"type": "noop"}, default_job_id=job_id) for job_id in ids]
            async with engine.begin() as conn:
                await jobs.submit(
                    conn, specs, ["h"] * len(specs), datetime.now(UTC), PolicyConfig(), [Resources(8, 4096)]
                )
    finally:
        await engine.dispose()


async def test_the_data_is_a_realistic_mix(populated_url: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(populated_url))
    try:
        rows = await connection.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        statuses: dict[str, int] = {row["status"]: row["n"] for row in rows}
    finally:
        await connection.close()
    assert sum(statuses.values()) == JOB_COUNT
    assert statuses["ready"] == JOB_COUNT * 15 // 100
    assert statuses["running"] == JOB_COUNT * 3 // 100


@pytest.mark.parametrize("path", sorted(HOT_PATHS))
async def test_hot_path_uses_its_index(populated_url: str, path: str) -> None:
    query, index = HOT_PATHS[path]
    plan = await explain(populated_url, query)
    assert index in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_a_claim_reads_the_window_in_index_order_before_any_statistics(
    create_database: Callable[[], Coroutine[Any, Any, str]],
) -> None:
    """A queue a burst has just filled has no statistics yet (autovacuum analyses it up to
    a minute later): the planner then took the window for a few rows and fetched every
    ready job by bitmap to sort them. A claim must still read only the first K, in order."""
    url = await create_database()
    await migrate.upgrade(url)
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await submit_burst(url, range(5000))
        plain = (
            "SELECT job_id, type, priority, attempts, sort_key, cpu_units, memory_mb, timeout_seconds, ready_at"
            " FROM jobs WHERE status = 'ready' ORDER BY sort_key, job_id LIMIT 16"
        )
        trap = "\n".join(r[0] for r in await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {plain}"))
        await connection.fetch("SELECT * FROM ready_window(16)")  # its plan is made: only the read counts below
        explained = await connection.fetch("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM ready_window(16)")
        window = "\n".join(r[0] for r in explained)
    finally:
        await connection.close()
    assert "Bitmap" in trap  # the trap is real on this server: a stale plan sorts the whole queue
    # The function's own reads count in its scan's buffers: the first rows of the index, not the queue.
    assert _buffers(window) * 10 < _buffers(trap), (window, trap)


async def test_a_page_of_a_common_status_reads_only_that_page_beside_newer_jobs(
    create_database: Callable[[], Coroutine[Any, Any, str]],
) -> None:
    """30,000 old completed jobs and 3,000 newer ready ones, analysed: asked as
    `status = 'completed'`, the planner filters ix_jobs_created and reads past every
    newer job first. The lists the service sends read a page's worth (jobs.list_query)."""
    url = await create_database()
    await migrate.upgrade(url)
    connection = await asyncpg.connect(asyncpg_dsn(url))
    columns = (
        "job_id, type, priority, status, payload, cpu_units, memory_mb, max_attempts, backoff_multiplier,"
        " initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, request_hash, attempt_budget,"
        " unfinished_deps, created_at, updated_at"
    )
    common = "'normal', {status}, '{{}}', 1, 1, 3, 2, 1, 60, 0, 30, 'h', 3, 0, {created}, now()"
    try:
        await connection.execute(
            f"INSERT INTO jobs ({columns}, finished_at, attempts, counted_attempts)"
            f" SELECT 'old_' || g, CASE WHEN g % 1000 = 7 THEN 'rare' ELSE 'email' END, "
            + common.format(status="'completed'", created="timestamptz '2026-01-01' + g * interval '1 ms'")
            + ", now(), 1, 1 FROM generate_series(1, 30000) AS g"
        )
        await connection.execute(
            f"INSERT INTO jobs ({columns}, ready_at, sort_key) SELECT 'new_' || g, 'email', "
            + common.format(status="'ready'", created="timestamptz '2026-02-01' + g * interval '1 ms'")
            + ", now(), g FROM generate_series(1, 3000) AS g"
        )
        await connection.execute("VACUUM ANALYZE jobs")
        cursor = jobs.encode_cursor(datetime(2026, 1, 1, 0, 0, 20, tzinfo=UTC), "old_20000")
        lists = {
            "completed": jobs.list_query(jobs.JobListing(50, statuses=["completed"])),
            "completed, next page": jobs.list_query(jobs.JobListing(50, statuses=["completed"], cursor=cursor)),
            "completed or failed": jobs.list_query(jobs.JobListing(50, statuses=["completed", "failed"])),
            "completed of a rare type": jobs.list_query(jobs.JobListing(50, statuses=["completed"], job_type="rare")),
        }
        dialect = PGDialect()  # type: ignore[no-untyped-call]  # SQLAlchemy leaves it untyped
        plans = {}
        for name, query in lists.items():
            sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
            plans[name] = "\n".join(r[0] for r in await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"))
        equality = "SELECT * FROM jobs WHERE status = 'completed' ORDER BY created_at DESC, job_id DESC LIMIT 51"
        trap = "\n".join(r[0] for r in await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {equality}"))
    finally:
        await connection.close()
    assert "Rows Removed by Filter: 3000" in trap, trap  # the trap is real on this server
    rare = plans.pop("completed of a rare type")
    for name, plan in plans.items():
        assert "ix_jobs_status_created" in plan, (name, plan)
        assert _jobs_scan_buffers(plan) * 5 < _jobs_scan_buffers(trap), (name, plan, trap)
    # A type keeps its own index: it reads that type's jobs, none of the others.
    assert "ix_jobs_type_created" in rare, rare
    assert "Rows Removed by Filter" not in rare, rare


def _jobs_scan_buffers(plan: str) -> int:
    """Shared buffers the plan's index scan of jobs touched itself: less those of the
    subplan under it that looks up each listed job's dependencies."""
    scan = re.search(
        r"Index (?:Only )?Scan using \w+ on jobs\b.*?Buffers: shared hit=(\d+)(?: read=(\d+))?", plan, re.S
    )
    assert scan is not None, plan
    dependencies = re.search(r"SubPlan \d+.*?Buffers: shared hit=(\d+)(?: read=(\d+))?", plan[scan.end() :], re.S)
    subplan = int(dependencies[1]) + int(dependencies[2] or 0) if dependencies else 0
    return int(scan[1]) + int(scan[2] or 0) - subplan


def _buffers(plan: str) -> int:
    """Shared buffers an EXPLAIN (ANALYZE, BUFFERS) says its top node touched."""
    found = re.search(r"Buffers: shared hit=(\d+)(?: read=(\d+))?", plan)
    assert found is not None, plan
    return int(found[1]) + int(found[2] or 0)


async def test_the_leader_analyses_what_a_burst_left_stale(
    create_database: Callable[[], Coroutine[Any, Any, str]],
) -> None:
    """After a burst, `insight.refresh_statistics` analyses the changed queue tables (so
    the planner knows them for what they are) and, once fresh, leaves them alone."""
    url = await create_database()
    await migrate.upgrade(url)
    engine = create_async_engine(normalize_database_url(url), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            assert await insight.refresh_statistics(conn) == []  # an empty queue is not stale
        specs = [parse_job_spec({"type": "noop"}, default_job_id=f"burst_{i}") for i in range(3000)]
        async with engine.begin() as conn:
            await jobs.submit(conn, specs, ["h"] * len(specs), datetime.now(UTC), PolicyConfig(), [Resources(8, 4096)])
        analysed: list[str] = []
        for _ in range(50):  # the statistics view sees a commit within a second or so
            async with engine.begin() as conn:
                analysed = await insight.refresh_statistics(conn)
            if analysed:
                break
            await asyncio.sleep(0.1)
        assert analysed == ["jobs"]  # job_events is left to autovacuum
        async with engine.connect() as conn:
            estimate = (
                await conn.execute(sa.text("SELECT reltuples FROM pg_class WHERE relname = 'jobs'"))
            ).scalar_one()
            assert estimate == 3000
        async with engine.begin() as conn:
            assert await insight.refresh_statistics(conn) == []
    finally:
        await engine.dispose()


async def test_recording_endings_locks_by_primary_key_past_a_drains_dead_entries(
    create_database: Callable[[], Coroutine[Any, Any, str]],
) -> None:
    """Recording a batch of endings first locks the ended jobs. Asked as `job_id = ANY(ids)
    AND status = 'running'`, a generic plan made from statistics that call running jobs
    rare took the status index and walked every dead 'running' entry a drain leaves behind
    (8-17 ms for 64 jobs after 10,000). It must look each job up by its key."""
    url = await create_database()
    await migrate.upgrade(url)
    engine = create_async_engine(normalize_database_url(url), poolclass=NullPool)
    try:
        specs = [parse_job_spec({"type": "noop"}, default_job_id=f"drained_{i:05}") for i in range(3000)]
        async with engine.begin() as conn:
            await jobs.submit(conn, specs, ["h"] * len(specs), datetime.now(UTC), PolicyConfig(), [Resources(8, 4096)])
    finally:
        await engine.dispose()
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute("ANALYZE jobs")  # as the leader left it: a full queue, nothing running
        # A drain since: every job ran and completed; the last 64 still run.
        await connection.execute(
            "UPDATE jobs SET status = 'running', attempts = 1, started_at = now(), worker_id = 'n',"
            " lease_token = gen_random_uuid(), lease_expires_at = now() + interval '30 seconds'"
        )
        await connection.execute(
            "UPDATE jobs SET status = 'completed', finished_at = now(), lease_token = NULL, lease_expires_at = NULL"
            " WHERE job_id < 'drained_02936'"
        )
        running = [f"drained_{i:05}" for i in range(2936, 3000)]
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        await connection.execute(f"PREPARE heads AS {attempts._RUNNING_ROWS_SQL.sql}")
        async with connection.transaction():
            ids = "ARRAY[" + ", ".join(f"'{job_id}'" for job_id in running) + "]"  # ours: no quoting needed
            explained = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE heads({ids})")
            rows = await connection.fetch(f"EXECUTE heads({ids})")
    finally:
        await connection.close()
    plan = "\n".join(r[0] for r in explained)
    assert [row["job_id"] for row in rows] == running  # in id order, as every writer locks jobs
    assert "pk_jobs" in plan, plan
    assert "ix_jobs_status_created" not in plan, plan
    assert _buffers(plan) < 10 * len(running), plan  # a few pages per job, not the whole drain's entries


async def test_starting_a_job_looks_it_up_by_key_whatever_the_statistics(
    create_database: Callable[[], Coroutine[Any, Any, str]],
) -> None:
    """The start keeps one generic plan per connection (`start_attempts`), made from the
    statistics of the moment: here those of a queue with nothing ready, analysed before
    a burst of 10,000 jobs (the ready-queue index then looks empty, so reading all of it
    looked as cheap as a key lookup). Starting one of them must still find it, and update it, by its key,
    not by a scan of the table or of the ready-queue index."""
    url = await create_database()
    await migrate.upgrade(url)
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await submit_burst(url, range(1000))
        # They ran: a queue with nothing ready, analysed so. Then the burst.
        await connection.execute(
            "UPDATE jobs SET status = 'completed', attempts = 1, finished_at = now(); ANALYZE jobs"
        )
        await submit_burst(url, range(1000, 11_000))
        await connection.execute(
            "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, cpu_used, memory_used, status, started_at,"
            " heartbeat_at) VALUES ('n', 8, 4096, 0, 0, 'active', now(), now())"
        )
        start = (
            "SELECT * FROM start_attempts(ARRAY[$1], ARRAY[gen_random_uuid()], ARRAY[1], ARRAY[1], ARRAY[1],"
            " ARRAY[NULL], now(), 'at', 'n', now() + interval '30 seconds', 'jobs')"
        )
        started = await connection.fetchrow(start, "burst_05000")  # the plan is made here, then kept
        async with nested_plans(connection) as plans:
            await connection.fetchrow(start, "burst_09999")
        running = await connection.fetch("SELECT job_id, attempts FROM jobs WHERE status = 'running' ORDER BY job_id")
    finally:
        await connection.close()
    assert started is not None
    assert set(json.loads(started["started_payloads"])) == {"burst_05000"}  # json, as text
    assert [(r["job_id"], r["attempts"]) for r in running] == [("burst_05000", 1), ("burst_09999", 1)]
    [plan] = [message for message in plans if "WITH planned" in message]
    assert "Index Scan using pk_jobs on jobs" in plan, plan  # the lock, and the update
    assert "Seq Scan on jobs" not in plan, plan
    assert "ix_jobs_ready_queue" not in plan, plan  # it holds ids after sort keys: a scan of all of it
    assert "Hash Join" not in plan, plan
    assert "Merge Join" not in plan, plan


async def test_ready_queue_reads_keep_to_its_index_whatever_the_statistics(
    create_database: Callable[[], Coroutine[Any, Any, str]],
) -> None:
    """A claim's window, a lone job's position and several jobs' positions each keep one
    generic plan per connection, made from the statistics of the moment: here those of a
    new queue's first ten jobs, analysed before a burst of 10,000, under which the plain
    count of a second's ready jobs reads the whole table (and others, through
    ix_jobs_status_created, every ready job). Each read must take the ready-queue index
    in queue order, unsorted."""
    url = await create_database()
    await migrate.upgrade(url)
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await submit_burst(url, range(10))
        await connection.execute("ANALYZE jobs")
        await submit_burst(url, range(10, 10_010))
        count_of_second = (
            "SELECT count(*) FROM jobs AS j WHERE j.status = 'ready' AND (j.sort_key, j.job_id) >= ($1, $2)"
            " AND j.sort_key < floor($1) + 1"
        )
        await connection.execute(f"SET plan_cache_mode = force_generic_plan; PREPARE trap AS {count_of_second}")
        trap = "\n".join(r[0] for r in await connection.fetch("EXPLAIN EXECUTE trap(0, 'job')"))
        await connection.execute("RESET plan_cache_mode")
        asked = await connection.fetch(
            "SELECT job_id, sort_key FROM jobs WHERE job_id IN ('burst_10000', 'burst_10009') ORDER BY job_id",
            record_class=driver.Row,  # columns as attributes, as positions_parameters reads them
        )
        last = asked[-1]
        ranges = [*jobs.bucket_ranges(last["sort_key"]), jobs.own_second(last["sort_key"])]
        lone = "SELECT queue_position($1, $2, $3, $4, $5)"
        lone_arguments = (
            last["sort_key"],
            last["job_id"],
            [level for level, _, _ in ranges],
            [low for _, low, _ in ranges],
            [high for _, _, high in ranges],
        )
        several = jobs.POSITIONS_SQL.sql
        several_arguments = jobs.POSITIONS_SQL.arguments(jobs.positions_parameters(asked))
        # Each connection's plans are made at its first call: these, after the burst.
        await connection.fetch("SELECT * FROM ready_window(16)")
        await connection.fetchval(lone, *lone_arguments)
        await connection.fetch(several, *several_arguments)
        async with nested_plans(connection) as plans:
            window = await connection.fetch("SELECT job_id FROM ready_window(16)")
            lone_position = await connection.fetchval(lone, *lone_arguments)
            positions = await connection.fetch(several, *several_arguments)
    finally:
        await connection.close()
    assert "ix_jobs_ready_queue" not in trap, trap  # the trap is real on this server
    assert [r["job_id"] for r in window] == [f"burst_{i:05}" for i in range(16)]
    assert lone_position == 10_009
    assert sorted((r["job_id"], r["position"]) for r in positions) == [("burst_10000", 10_000), ("burst_10009", 10_009)]
    reads = {
        "window": [p for p in plans if "LIMIT size" in p],
        "lone position": [p for p in plans if "floor(key)" in p and "queue_position(" not in p],
        "several positions": [p for p in plans if "numbered" in p],
    }
    for name, found in reads.items():
        [plan] = found
        assert "ix_jobs_ready_queue" in plan, (name, plan)
        assert "ix_jobs_status_created" not in plan, (name, plan)
        assert "Seq Scan on jobs" not in plan, (name, plan)
        assert "Sort Key: j" not in plan, (name, plan)
    # The asked ids are matched by hash: a generic plan cannot hash `= ANY(array)`, and
    # searched the whole array for each row, 1000 ids by 1000 rows for a batch.
    assert "= ANY ($" not in reads["several positions"][0], reads["several positions"][0]


async def test_the_replay_check_finds_ids_and_keys_by_index_in_a_generic_plan(populated_url: str) -> None:
    """The key's unique index holds only the jobs that have one (migration 0008); the replay
    check, a prepared statement with arrays it cannot see into, must still use it."""
    connection = await asyncpg.connect(asyncpg_dsn(populated_url))
    try:
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        await connection.execute(f"PREPARE replays AS {jobs._REPLAYS_SQL.sql}")
        explained = await connection.fetch("EXPLAIN EXECUTE replays(ARRAY['job_42'], ARRAY['some-key'])")
    finally:
        await connection.close()
    plan = "\n".join(r[0] for r in explained)
    assert "pk_jobs" in plan, plan
    assert tables.JOBS_IDEMPOTENCY_KEY_UNIQUE in plan, plan
    assert "Seq Scan" not in plan, plan
