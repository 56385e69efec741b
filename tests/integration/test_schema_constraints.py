"""The schema's invariants hold in the database, and refusals arrive as project errors.

Node capacity is never exceeded, even by concurrent allocations; named
constraints translate to the errors the API maps (job_id_conflict, …); the queue
counters trigger keeps depth by status and priority equal to a scan of jobs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from queue_service.core.errors import UnknownDependency
from queue_service.db.engine import translate, translate_errors
from queue_service.db.errors import (
    AttemptConflict,
    CapacityExceeded,
    ConstraintViolated,
    IdempotencyKeyConflict,
    JobIdConflict,
)
from queue_service.db.tables import job_attempts, job_dependencies, jobs, nodes

pytestmark = pytest.mark.integration

JobRow = Callable[..., dict[str, object]]
SeedJobs = Callable[..., Coroutine[Any, Any, None]]


async def add_node(engine: AsyncEngine, node_id: str, cpu: int = 8, memory: int = 4096) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.insert(nodes).values(node_id=node_id, cpu_capacity=cpu, memory_capacity=memory))


def allocate(node_id: str, cpu: int, memory: int) -> sa.Update:
    return (
        sa.update(nodes)
        .where(nodes.c.node_id == node_id)
        .values(cpu_used=nodes.c.cpu_used + cpu, memory_used=nodes.c.memory_used + memory)
    )


async def node_use(engine: AsyncEngine, node_id: str) -> tuple[int, int]:
    async with engine.connect() as connection:
        row = (
            await connection.execute(sa.select(nodes.c.cpu_used, nodes.c.memory_used).where(nodes.c.node_id == node_id))
        ).one()
    return row.cpu_used, row.memory_used


async def run_unit(engine: AsyncEngine, *statements: sa.Executable) -> None:
    """Run the statements as one unit of work, with refusals translated at the edge."""
    async with engine.begin() as connection:
        with translate_errors():
            for statement in statements:
                await connection.execute(statement)


async def test_node_check_refuses_oversubscription(engine: AsyncEngine) -> None:
    await add_node(engine, "node-a")
    await run_unit(engine, allocate("node-a", 5, 1024))

    with pytest.raises(CapacityExceeded) as cpu_refused:
        await run_unit(engine, allocate("node-a", 4, 1))
    with pytest.raises(CapacityExceeded) as memory_refused:
        await run_unit(engine, allocate("node-a", 1, 4096 - 1024 + 1))
    with pytest.raises(CapacityExceeded):  # freeing more than is used: the same CHECK's lower bound
        await run_unit(engine, allocate("node-a", -6, 0))

    assert cpu_refused.value.resource == "cpu"
    assert cpu_refused.value.code == "capacity_exceeded"
    assert memory_refused.value.resource == "memory"
    assert isinstance(cpu_refused.value.__cause__, IntegrityError)
    assert await node_use(engine, "node-a") == (5, 1024)
    await run_unit(engine, allocate("node-a", 3, 3072))  # exactly full is allowed
    assert await node_use(engine, "node-a") == (8, 4096)


async def test_concurrent_allocations_cannot_oversubscribe(engine: AsyncEngine) -> None:
    """Two nodes' worth of claims race for one node: the second waits for the first's
    row lock, re-checks against the committed use and is refused."""
    await add_node(engine, "node-b")
    first = await engine.connect()
    second = await engine.connect()
    try:
        await first.begin()
        await first.execute(allocate("node-b", 5, 100))

        async def second_claim() -> None:
            async with second.begin():
                with translate_errors():
                    await second.execute(allocate("node-b", 5, 100))

        racing = asyncio.create_task(second_claim())
        await asyncio.sleep(0.2)
        assert not racing.done()  # blocked on the first claim's row lock
        await first.commit()
        with pytest.raises(CapacityExceeded):
            await racing
    finally:
        await first.close()
        await second.close()
    assert await node_use(engine, "node-b") == (5, 100)


async def test_duplicate_job_id_is_a_job_id_conflict(engine: AsyncEngine, make_job: JobRow) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.insert(jobs).values(make_job("dup-1")))
    with pytest.raises(JobIdConflict) as raised:
        await run_unit(engine, sa.insert(jobs).values(make_job("dup-1")))
    assert raised.value.job_id == "dup-1"
    assert raised.value.code == "job_id_conflict"


async def test_reused_idempotency_key_is_a_conflict(engine: AsyncEngine, make_job: JobRow) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.insert(jobs).values(make_job("idem-1", idempotency_key="key, with (parens)")))
    with pytest.raises(IdempotencyKeyConflict) as raised:
        await run_unit(engine, sa.insert(jobs).values(make_job("idem-2", idempotency_key="key, with (parens)")))
    assert raised.value.key == "key, with (parens)"
    assert raised.value.code == "idempotency_key_reused"


async def test_edge_to_a_missing_job_is_an_unknown_dependency(engine: AsyncEngine, make_job: JobRow) -> None:
    with pytest.raises(UnknownDependency) as raised:
        await run_unit(
            engine,
            sa.insert(jobs).values(make_job("child-1", "blocked")),
            sa.insert(job_dependencies).values(job_id="child-1", depends_on_job_id="no-such-job"),
        )
    assert raised.value.missing == ("no-such-job",)


async def test_deleting_a_job_others_depend_on_is_refused(engine: AsyncEngine, make_job: JobRow) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.insert(jobs).values(make_job("parent-2")))
        await connection.execute(sa.insert(jobs).values(make_job("child-2", "blocked")))
        await connection.execute(sa.insert(job_dependencies).values(job_id="child-2", depends_on_job_id="parent-2"))
    with pytest.raises(ConstraintViolated) as raised:
        await run_unit(engine, sa.delete(jobs).where(jobs.c.job_id == "parent-2"))
    assert raised.value.constraint == "fk_job_dependencies_depends_on_job_id_jobs"


async def test_second_running_attempt_is_an_attempt_conflict(engine: AsyncEngine, make_job: JobRow) -> None:
    def attempt(number: int) -> sa.Insert:
        return sa.insert(job_attempts).values(
            job_id="attempted-1", attempt=number, node_id="node-x", started_at=sa.func.now(), lease_token=uuid.uuid4()
        )

    await run_unit(engine, sa.insert(jobs).values(make_job("attempted-1", "running")), attempt(1))
    # A stale worker starting attempt 2 while 1 still runs: at most one runs at once.
    with pytest.raises(AttemptConflict) as running_twice:
        await run_unit(engine, attempt(2))
    # Two workers both starting attempt 1: attempt numbers are never reused.
    with pytest.raises(AttemptConflict):
        await run_unit(engine, attempt(1))
    assert running_twice.value.job_id == "attempted-1"


@pytest.mark.parametrize(
    ("status", "columns", "constraint"),
    [
        ("running", {"lease_token": None}, "lease_held_iff_running"),
        ("ready", {"unfinished_deps": 1}, "blocked_iff_unfinished_deps"),
        ("blocked", {"unfinished_deps": 0}, "blocked_iff_unfinished_deps"),
        ("ready", {"sort_key": None}, "ready_is_queued"),
        ("failed", {}, "failed_has_reason"),
        ("ready", {"priority": "urgent"}, "priority_valid"),
        ("ready", {"cpu_units": 0}, "cpu_units_positive"),
        ("ready", {"jitter": 1.5}, "retry_config_valid"),
    ],
)
async def test_job_invariants_are_checked_by_name(
    engine: AsyncEngine, make_job: JobRow, status: str, columns: dict[str, object], constraint: str
) -> None:
    with pytest.raises(ConstraintViolated) as raised:
        await run_unit(engine, sa.insert(jobs).values(make_job(f"bad-{constraint}", status, **columns)))
    assert raised.value.constraint == constraint


async def test_errors_that_are_not_integrity_violations_pass_through(engine: AsyncEngine) -> None:
    with pytest.raises(ProgrammingError):
        await run_unit(engine, sa.text("SELECT * FROM no_such_table"))


async def test_raw_driver_errors_translate_too(raw_connection: asyncpg.Connection) -> None:
    """The LISTEN connection and other raw asyncpg users get the same translation."""
    await raw_connection.execute("INSERT INTO nodes (node_id, cpu_capacity, memory_capacity) VALUES ('raw', 1, 1)")
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await raw_connection.execute("UPDATE nodes SET cpu_used = 2 WHERE node_id = 'raw'")
    assert isinstance(translate(raised.value), CapacityExceeded)
    assert translate(RuntimeError("not a database error")) is None


async def depth_from_counters(connection: AsyncConnection) -> dict[tuple[str, str], int]:
    rows = await connection.execute(
        sa.text(
            "SELECT status, priority, sum(delta) AS depth FROM queue_counters"
            " GROUP BY status, priority HAVING sum(delta) <> 0"
        )
    )
    return {(row.status, row.priority): row.depth for row in rows}


async def depth_from_scan(connection: AsyncConnection) -> dict[tuple[str, str], int]:
    rows = await connection.execute(sa.text("SELECT status, priority, count(*) AS depth FROM jobs GROUP BY 1, 2"))
    return {(row.status, row.priority): row.depth for row in rows}


async def assert_counters_match(engine: AsyncEngine) -> dict[tuple[str, str], int]:
    async with engine.connect() as connection:
        counted, scanned = await depth_from_counters(connection), await depth_from_scan(connection)
    assert counted == scanned
    return counted


async def test_counters_follow_inserts_updates_and_deletes(engine: AsyncEngine, seed: SeedJobs) -> None:
    async with engine.begin() as connection:
        await seed(connection, 2_000, first=100_000)
    depths = await assert_counters_match(engine)
    assert depths[("ready", "normal")] > 0

    async with engine.begin() as connection:  # dispatch: ready -> running, in one statement
        await connection.execute(
            sa.text(
                "UPDATE jobs SET status = 'running', lease_token = gen_random_uuid(), lease_expires_at = now()"
                " WHERE status = 'ready' AND job_id LIKE 'job_1000%'"
            )
        )
    await assert_counters_match(engine)

    async with engine.begin() as connection:  # a heartbeat changes no status, so adds no rows
        before = (await connection.execute(sa.text("SELECT count(*) FROM queue_counters"))).scalar_one()
        await connection.execute(
            sa.text("UPDATE jobs SET lease_expires_at = now() + interval '30 seconds' WHERE status = 'running'")
        )
        after = (await connection.execute(sa.text("SELECT count(*) FROM queue_counters"))).scalar_one()
    assert after == before

    async with engine.begin() as connection:
        await connection.execute(sa.text("DELETE FROM jobs WHERE status IN ('completed', 'cancelled')"))
    await assert_counters_match(engine)

    async with engine.connect() as connection:  # a rolled-back insert leaves no trace in the counters
        await seed(connection, 100, first=200_000)
        await connection.rollback()
    await assert_counters_match(engine)


async def test_compaction_folds_counters_without_changing_depths(engine: AsyncEngine, seed: SeedJobs) -> None:
    async with engine.begin() as connection:
        await seed(connection, 500, first=300_000)
        await connection.execute(
            sa.text("UPDATE jobs SET status = 'cancelled', cancel_reason = 'user' WHERE status = 'blocked'")
        )
    depths = await assert_counters_match(engine)

    async with engine.begin() as connection:
        await connection.execute(sa.text("SELECT queue_counters_compact()"))
        rows = (await connection.execute(sa.text("SELECT count(*) FROM queue_counters"))).scalar_one()

    assert rows == len(depths)  # one row per (status, priority) key
    assert await assert_counters_match(engine) == depths


async def test_truncate_resets_counters(
    create_database: Callable[[], Coroutine[Any, Any, str]], seed: SeedJobs
) -> None:
    from queue_service.db import migrate
    from queue_service.db.engine import create_engine
    from queue_service.settings import Settings

    url = await create_database()
    await migrate.upgrade(url)
    engine = create_engine(Settings(database_url=url, db_pool_size=1, db_max_overflow=0))
    try:
        async with engine.begin() as connection:
            await seed(connection, 50)
            await connection.execute(sa.text("TRUNCATE jobs CASCADE"))
        assert await assert_counters_match(engine) == {}
    finally:
        await engine.dispose()
