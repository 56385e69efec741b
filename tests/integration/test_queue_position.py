"""`position_in_queue` from bucket counts equals counting the ready jobs ahead.

The position is summed from per-second/minute/hour/day counts the triggers keep
(see queue_service.db.tables.RANK_LEVEL_WIDTHS), so every way a job enters or
leaves the ready queue must move them: inserts, status changes, a new sort key,
deletes, truncation, and the leader's folding must not change any answer. Each
check compares every ready job's position with a plain count.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import pytest
import sqlalchemy as sa
from nested_plans import nested_plans
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from queue_service.core.model import Priority, Resources
from queue_service.core.policy import PolicyConfig
from queue_service.core.validation import parse_job_spec
from queue_service.db import driver, insight, jobs, tables
from queue_service.db.engine import asyncpg_dsn, autocommit, create_engine
from queue_service.settings import Settings

pytestmark = pytest.mark.integration

DAY = 86_400.0
# Keys on and just either side of every level's boundaries, negative ones, and ties.
EDGE_KEYS = [
    0.0,
    -0.5,
    -1.0,
    -DAY - 0.25,
    59.999999,
    60.0,
    3599.9999999,
    3600.0,
    DAY - 1e-6,
    DAY,
    DAY + 0.5,
    1_767_225_599.999,
    1_767_225_600.0,
    1_767_225_600.0,
]


def _random_key(rng: random.Random) -> float:
    base = 1_767_225_600.0  # 2026-01-01; the live service's keys are epoch seconds minus head starts
    return rng.choice(EDGE_KEYS) if rng.random() < 0.1 else base + rng.uniform(-3 * DAY, 3 * DAY)


async def _insert(conn: AsyncConnection, make_job: Any, rows: list[tuple[str, float]]) -> None:
    values = [make_job(job_id, sort_key=key) for job_id, key in rows]
    await conn.execute(sa.insert(tables.jobs), values)


async def _ready_with_expected_positions(conn: AsyncConnection) -> list[Any]:
    """Every ready job (job_id, sort_key) with its position by a plain count (`expected`)."""
    return list(
        await conn.execute(
            sa.text(
                "SELECT job_id, sort_key, row_number() OVER (ORDER BY sort_key, job_id) - 1 AS expected"
                " FROM jobs WHERE status = 'ready'"
            )
        )
    )


async def _assert_positions_exact(conn: AsyncConnection) -> int:
    ready = await _ready_with_expected_positions(conn)
    positions = await jobs.queue_positions(conn, ready)
    wrong = {r.job_id: (positions.get(r.job_id), r.expected) for r in ready if positions.get(r.job_id) != r.expected}
    assert not wrong, f"{len(wrong)} of {len(ready)} positions wrong (got, expected): {list(wrong.items())[:5]}"
    return len(ready)


@pytest.mark.parametrize("seed_value", [1, 2, 3])
async def test_positions_follow_every_change_and_folding(engine: AsyncEngine, make_job: Any, seed_value: int) -> None:
    rng = random.Random(seed_value)
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
    counter = 0

    def fresh(n: int) -> list[tuple[str, float]]:
        nonlocal counter
        counter += n
        return [(f"j{counter - i:05d}", _random_key(rng)) for i in range(n)]

    checked = 0
    for round_number in range(6):
        async with engine.begin() as conn:
            await _insert(conn, make_job, fresh(rng.randint(20, 120)))  # one statement: a batch
            for job_id, key in fresh(5):  # single submissions
                await _insert(conn, make_job, [(job_id, key)])
            ready = [r.job_id for r in await conn.execute(sa.text("SELECT job_id FROM jobs WHERE status = 'ready'"))]
            claimed = rng.sample(ready, k=min(len(ready), rng.randint(1, 15)))
            await conn.execute(
                sa.text(
                    "UPDATE jobs SET status = 'running', attempts = 1, lease_token = gen_random_uuid(),"
                    " lease_expires_at = now(), started_at = now() WHERE job_id = ANY(:ids)"
                ),
                {"ids": claimed},
            )
            cancelled = rng.sample(sorted(set(ready) - set(claimed)), k=3)
            await conn.execute(
                sa.text(
                    "UPDATE jobs SET status = 'cancelled', cancel_reason = 'user', finished_at = now(),"
                    " ready_at = NULL, sort_key = NULL WHERE job_id = ANY(:ids)"
                ),
                {"ids": cancelled},
            )
            # Retried jobs come back with a new key; ready jobs may be re-keyed in place.
            back = rng.sample(claimed, k=len(claimed) // 2)
            for job_id in back:
                await conn.execute(
                    sa.text(
                        "UPDATE jobs SET status = 'ready', lease_token = NULL, lease_expires_at = NULL,"
                        " sort_key = :key, ready_at = now() WHERE job_id = :id"
                    ),
                    {"id": job_id, "key": _random_key(rng)},
                )
            still_ready = sorted(set(ready) - set(claimed) - set(cancelled))
            await conn.execute(
                sa.text("UPDATE jobs SET sort_key = sort_key + :shift WHERE job_id = ANY(:ids)"),
                {"ids": rng.sample(still_ready, k=min(5, len(still_ready))), "shift": rng.uniform(-DAY, DAY)},
            )
            await conn.execute(
                sa.text("DELETE FROM jobs WHERE job_id = ANY(:ids)"),
                {"ids": rng.sample(still_ready, k=min(4, len(still_ready)))},
            )
            checked += await _assert_positions_exact(conn)  # inside the writing transaction, too
        async with engine.begin() as conn:
            if round_number % 2:
                await conn.execute(sa.text("SELECT queue_rank_compact()"))  # what the leader's fold runs
            checked += await _assert_positions_exact(conn)
    assert checked > 500


async def test_positions_of_some_jobs_of_a_crowded_second_are_exact(engine: AsyncEngine, make_job: Any) -> None:
    """Asked for some jobs of a second that holds many (a batch's, a page's), each
    position counts the second's jobs before the first one asked for, those between,
    and not those after: ready jobs on both sides, ties on the key, another second
    before and after."""
    rng = random.Random(11)
    second = 1_767_225_600.0
    keys = [second + rng.choice([0.0, 0.25, 0.5, 0.5, 0.999]) for _ in range(60)]
    keys += [second - 0.5, second - 0.5, second + 1.0, second + 1.5]
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        await _insert(conn, make_job, [(f"c{index:03d}", key) for index, key in enumerate(keys)])
    for round_number in range(12):
        async with engine.begin() as conn:
            if round_number == 6:
                await conn.execute(sa.text("SELECT queue_rank_compact()"))
            asked = rng.sample(await _ready_with_expected_positions(conn), k=rng.randint(1, 8))
            positions = await jobs.queue_positions(conn, asked)
        assert positions == {r.job_id: r.expected for r in asked}


async def test_folding_keeps_positions_and_empties_the_deltas(engine: AsyncEngine, seed: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        for first in range(1, 3001, 100):
            await seed(conn, 100, first)
        before = await _assert_positions_exact(conn)
        assert await insight.fold_queue_counters(conn)
        deltas = (await conn.execute(sa.text("SELECT count(*) FROM queue_rank_deltas"))).scalar_one()
        empty = (await conn.execute(sa.text("SELECT count(*) FROM queue_rank_base WHERE jobs = 0"))).scalar_one()
        after = await _assert_positions_exact(conn)
    assert (deltas, empty) == (0, 0)
    assert before == after == 450  # 15% of the seeded jobs are ready


async def test_truncate_empties_the_buckets(engine: AsyncEngine, seed: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        await seed(conn, 200)
        await conn.execute(sa.text("SELECT queue_rank_compact()"))
        await seed(conn, 200, 1000)
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        left = (
            await conn.execute(
                sa.text("SELECT (SELECT count(*) FROM queue_rank_base) + (SELECT count(*) FROM queue_rank_deltas)")
            )
        ).scalar_one()
    assert left == 0


async def test_the_position_query_reads_indexes_only(engine: AsyncEngine, seed: Any) -> None:
    """At the back of a long queue the plan is index ranges: no scan of jobs or of the buckets."""
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        await seed(conn, 20_000)
        await conn.execute(sa.text("SELECT queue_rank_compact()"))
        await seed(conn, 2_000, 20_001)  # unfolded deltas as well
    async with engine.connect() as conn:
        await conn.execute(sa.text("COMMIT"))
        await conn.execute(sa.text("VACUUM ANALYZE jobs, queue_rank_base, queue_rank_deltas"))
    connection = await asyncpg.connect(asyncpg_dsn(engine.url.render_as_string(hide_password=False)))
    try:
        last = await connection.fetchrow(
            "SELECT job_id, sort_key FROM jobs WHERE status = 'ready' ORDER BY sort_key DESC LIMIT 1",
            record_class=driver.Row,
        )
        arguments = jobs.POSITIONS_SQL.arguments(jobs.positions_parameters([last]))
        async with nested_plans(connection) as plans:
            await connection.fetch(jobs.POSITIONS_SQL.sql, *arguments)
    finally:
        await connection.close()
    [plan] = [p for p in plans if "numbered" in p]  # the function's statement
    assert "ix_jobs_ready_queue" in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_a_lone_submission_answers_its_exact_position(engine: AsyncEngine, make_job: Any) -> None:
    """`submit_alone` counts the jobs ahead in the same statement that inserts the job;
    its answer must equal a plain count, whatever the priority puts ahead of it."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        # A queue around now: keys from days before to an hour after, so every level's buckets count.
        base = now.timestamp()
        await _insert(conn, make_job, [(f"old{i:04d}", base + rng.uniform(-3 * DAY, 3600)) for i in range(400)])
    policy = PolicyConfig()
    capacities = [Resources(8, 4096)]
    for index in range(40):
        spec = parse_job_spec(
            {"type": "report", "priority": rng.choice(list(Priority)).value}, default_job_id=f"new{index:03d}"
        )
        async with autocommit(engine) as conn:
            submitted = await jobs.submit_alone(conn, spec, "digest", datetime.now(UTC), policy, capacities)
            if index % 10 == 9:
                await conn.execute(sa.text("SELECT queue_rank_compact()"))
        assert submitted is not None
        assert submitted.created
        async with engine.connect() as conn:
            key = (
                await conn.execute(sa.text("SELECT sort_key FROM jobs WHERE job_id = :id"), {"id": spec.job_id})
            ).scalar_one()
            expected = (
                await conn.execute(
                    sa.text("SELECT count(*) FROM jobs WHERE status = 'ready' AND (sort_key, job_id) < (:key, :id)"),
                    {"key": key, "id": spec.job_id},
                )
            ).scalar_one()
        assert submitted.job["position_in_queue"] == expected, spec.priority
    # The same id again writes nothing and answers None: `submit` then tells replay from conflict.
    async with autocommit(engine) as conn:
        again = await jobs.submit_alone(conn, spec, "digest", datetime.now(UTC), policy, capacities)
        assert again is None
        events = (
            await conn.execute(sa.text("SELECT count(*) FROM job_log WHERE job_id = :id"), {"id": spec.job_id})
        ).scalar_one()
    assert events == 2  # submitted, ready: once


async def test_a_lone_submission_counts_its_own_second_exactly(engine: AsyncEngine, make_job: Any) -> None:
    """Its own second is counted whole from the buckets, less the ready jobs at or after
    it there: jobs of that second before it, tied on the key before and after its id,
    and after it must each land on the right side; the second before and after too."""
    at = datetime(2026, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    key = at.timestamp()  # a low-priority job has no head start: its key is its time
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        await _insert(
            conn,
            make_job,
            [
                ("a_before", key - 0.4),
                ("m_tied_before", key),
                ("z_tied_after", key),
                ("a_after", key + 0.3),
                ("a_previous_second", key - 0.6),
                ("a_next_second", key + 0.6),
            ],
        )
    for folded in (False, True):
        job_id = f"n_alone_{folded}"
        async with autocommit(engine) as conn:
            if folded:
                await conn.execute(sa.text("SELECT queue_rank_compact()"))
            spec = parse_job_spec({"type": "report", "priority": "low"}, default_job_id=job_id)
            submitted = await jobs.submit_alone(conn, spec, "digest", at, PolicyConfig(), [Resources(8, 4096)])
        assert submitted is not None
        ahead = 3 + int(folded)  # a_previous_second, a_before, m_tied_before; then the first alone job
        assert submitted.job["position_in_queue"] == ahead


async def test_a_lone_submission_keeps_one_plan_beside_a_long_queue(engine: AsyncEngine, make_job: Any) -> None:
    """With statistics of a long ready queue, the one-statement submission is planned
    once per connection and then reuses its generic plan: planned afresh on every
    execution it spent a third of its server time planning (migration 0005)."""
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        await _insert(conn, make_job, [(f"queued{i:05d}", now.timestamp() - 2 * DAY + i * 0.18) for i in range(20_000)])
    async with autocommit(engine) as conn:
        await conn.execute(sa.text("ANALYZE jobs"))
        for index in range(30):
            spec = parse_job_spec({"type": "report"}, default_job_id=f"alone{index:02d}")
            submitted = await jobs.submit_alone(
                conn, spec, "digest", datetime.now(UTC), PolicyConfig(), [Resources(8, 4096)]
            )
            assert submitted is not None
            assert submitted.job["position_in_queue"] == 20_000 + index
        generic, custom = (
            await conn.execute(
                sa.text("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = :sql"),
                {"sql": jobs._INSERT_ALONE_SQL.sql},
            )
        ).one()
    # PostgreSQL plans the first five executions with their values, then compares.
    assert (generic, custom) == (25, 5)


async def _position_read_pages(conn: AsyncConnection, job_id: str) -> int:
    """Shared buffers one job's position read touches (EXPLAIN ANALYZE runs it), once the
    connection has planned it: the catalog reads of a first call are not the read's."""
    row = (await conn.execute(sa.text("SELECT job_id, sort_key FROM jobs WHERE job_id = :id"), {"id": job_id})).one()
    parameters = jobs.positions_parameters([row])
    await conn.execute(sa.text(jobs.POSITIONS_SQL.text), parameters)
    plan = (
        await conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + jobs.POSITIONS_SQL.text), parameters)
    ).scalar_one()
    top = plan[0]["Plan"]
    return int(top["Shared Hit Blocks"] + top["Shared Read Blocks"])


# Empty, the bucket tables truncated too: the rows earlier tests of the module left dead
# there (the jobs trigger deletes them) would count in page reads and in folds.
_EMPTY_WITH_BUCKETS: Final = sa.text(
    "TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters, queue_rank_base, queue_rank_deltas"
)


@pytest.fixture
async def without_autovacuum(engine: AsyncEngine) -> AsyncIterator[None]:
    """Autovacuum off on the tables folding churns, for this test only (the module shares a
    database). Waking mid-test it would clean part of the churn before the first read and,
    holding the tables, make vacuum_folded skip them (SKIP_LOCKED)."""

    async def switch(setting: str) -> None:
        async with engine.begin() as conn:
            for table in insight.VACUUMED_TABLES:
                await conn.execute(sa.text(f"ALTER TABLE {table} {setting}"))

    await switch("SET (autovacuum_enabled = off)")
    try:
        yield
    finally:
        await switch("RESET (autovacuum_enabled)")


@pytest.mark.usefixtures("without_autovacuum")
async def test_vacuum_after_folding_keeps_the_position_read_small(engine: AsyncEngine, make_job: Any) -> None:
    """A minute of one-by-one submissions, folded every second. Each statement updates
    its process's delta row of a bucket in place and a fold deletes a handful of rows,
    so the position read stays at a few dozen pages (18 here, where 0002's appended
    deltas left 170; its reads of the bucket tables go by their keys, migration 0012),
    and the leader's VACUUM after folding (vacuum_folded) does not let it grow."""
    async with engine.begin() as conn:
        await conn.execute(_EMPTY_WITH_BUCKETS)
    base = 1_767_225_600.0
    for round_number in range(60):  # a minute of one-by-one submissions, folded every second
        async with engine.begin() as conn:
            for index in range(80):  # each its own statement, updating four bucket deltas
                job = (f"churn_{round_number:02d}_{index:02d}", base + round_number + index / 80)
                await _insert(conn, make_job, [job])
        async with engine.begin() as conn:
            await conn.execute(sa.text("SELECT queue_rank_compact()"))
    async with engine.begin() as conn:
        churned = await _position_read_pages(conn, "churn_59_79")
    async with autocommit(engine) as conn:
        await insight.vacuum_folded(conn)
    async with engine.begin() as conn:
        vacuumed = await _position_read_pages(conn, "churn_59_79")
        assert await _assert_positions_exact(conn) == 4800
    assert churned < 60, churned
    assert vacuumed <= churned, (churned, vacuumed)


async def test_concurrent_writers_and_folds_lose_no_change(migrated_url: str, make_job: Any) -> None:
    """Writers on several connections (each its own server process, so its own delta rows)
    queue and claim jobs in transactions held open for a while, as a fold runs every few
    milliseconds: every change is counted once, and no writer deadlocks with the fold
    (it skips rows an open transaction holds)."""
    engine = create_engine(Settings(database_url=migrated_url, db_pool_size=8, db_max_overflow=0))
    try:
        async with engine.begin() as conn:
            await conn.execute(_EMPTY_WITH_BUCKETS)
        base = 1_767_225_600.0
        stop = asyncio.Event()
        folds = 0

        async def writer(number: int) -> None:
            rng = random.Random(number)
            for round_number in range(30):
                async with engine.begin() as conn:
                    rows = [
                        (f"w{number}-{round_number:02d}-{i}", base + rng.uniform(-120, 120))
                        for i in range(rng.randint(1, 6))
                    ]
                    await _insert(conn, make_job, rows)
                    await asyncio.sleep(rng.uniform(0, 0.004))  # held open while folds run
                    await conn.execute(
                        sa.text(
                            "UPDATE jobs SET status = 'running', attempts = 1, lease_token = gen_random_uuid(),"
                            " lease_expires_at = now(), started_at = now() WHERE job_id IN ("
                            "SELECT job_id FROM jobs WHERE status = 'ready' AND job_id LIKE :mine LIMIT 2)"
                        ),
                        {"mine": f"w{number}-%"},
                    )

        async def folder() -> None:
            nonlocal folds
            while not stop.is_set():
                async with engine.begin() as conn:
                    await conn.execute(sa.text("SELECT queue_rank_compact()"))
                folds += 1
                await asyncio.sleep(0.002)

        folding = asyncio.create_task(folder())
        await asyncio.gather(*(writer(number) for number in range(6)))
        stop.set()
        await folding
        async with engine.begin() as conn:
            before_last_fold = await _assert_positions_exact(conn)
            await conn.execute(sa.text("SELECT queue_rank_compact()"))
            assert await _assert_positions_exact(conn) == before_last_fold > 0
            left = (await conn.execute(sa.text("SELECT count(*) FROM queue_rank_deltas"))).scalar_one()
        assert left == 0
        assert folds > 10
    finally:
        await engine.dispose()
