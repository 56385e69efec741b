"""Hot statements on the driver connection: same transaction, same errors, no dead connection reused."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.db import driver, jobs
from queue_service.db.engine import autocommit, create_engine, translate_errors
from queue_service.db.errors import JobIdConflict
from queue_service.db.events import LogEntry, write_log
from queue_service.settings import Settings

pytestmark = pytest.mark.integration

_INSERT_NODE = driver.Statement(
    sa.text("INSERT INTO nodes (node_id, cpu_capacity, memory_capacity) VALUES (:node, 4, 1024) RETURNING node_id")
)
_INSERT_JOB_ID = driver.Statement(
    sa.text(
        "INSERT INTO jobs (job_id, type, priority, status, payload, cpu_units, memory_mb, max_attempts,"
        " backoff_multiplier, initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, request_hash,"
        " attempt_budget, unfinished_deps, created_at, updated_at, ready_at, sort_key)"
        " VALUES (:job_id, 'noop', 'normal', 'ready', '{}', 1, 1, 1, 2, 1, 10, 0, 30, 'h', 1, 0,"
        " now(), now(), now(), 1)"
    )
)


async def _node_ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.execute(sa.text("SELECT node_id FROM nodes"))).scalars())


async def test_a_statement_is_compiled_to_positional_form_once_per_name() -> None:
    statement = driver.Statement(sa.text("SELECT :a, :b, :a"))
    assert statement.sql == "SELECT $1, $2, $1"
    assert statement.arguments({"b": 2, "a": 1}) == [1, 2]


_COLUMNS_AND_RECORD_NAMES = driver.Statement(sa.text("SELECT 1 AS job_id, 2 AS keys, NULL AS missing_value"))


async def test_a_row_reads_columns_as_attributes_and_keeps_its_record_methods(engine: AsyncEngine) -> None:
    async with driver.transaction(engine) as conn:
        row = await driver.one(conn, _COLUMNS_AND_RECORD_NAMES, {})
    assert (row.job_id, row.missing_value) == (1, None)
    assert list(row.keys()) == ["job_id", "keys", "missing_value"]  # the method, not the column
    assert row["keys"] == 2
    assert row.get("job_id") == 1
    with pytest.raises(AttributeError):
        _ = row.no_such_column


async def test_driver_and_sqlalchemy_statements_commit_together(engine: AsyncEngine) -> None:
    async with driver.transaction(engine) as conn:
        row = await driver.one(conn, _INSERT_NODE, {"node": "driver-a"})
        await conn.execute(sa.text("UPDATE nodes SET cpu_used = 1 WHERE node_id = :node"), {"node": "driver-a"})
    assert row.node_id == "driver-a"  # columns read as attributes, as on SQLAlchemy rows
    async with engine.connect() as check:
        used = (await check.execute(sa.text("SELECT cpu_used FROM nodes WHERE node_id = 'driver-a'"))).scalar_one()
    assert used == 1


async def test_an_error_in_the_unit_rolls_back_both_kinds_of_statement(engine: AsyncEngine) -> None:
    async def abandoned_unit() -> None:
        async with driver.transaction(engine) as conn:
            await driver.one(conn, _INSERT_NODE, {"node": "driver-b"})
            await conn.execute(
                sa.text("INSERT INTO nodes (node_id, cpu_capacity, memory_capacity) VALUES ('driver-c', 1, 1)")
            )
            raise RuntimeError("abandon the unit")

    with pytest.raises(RuntimeError):
        await abandoned_unit()
    assert not {"driver-b", "driver-c"} & await _node_ids(engine)


async def test_on_a_sqlalchemy_transaction_a_first_driver_statement_is_inside_it(engine: AsyncEngine) -> None:
    """SQLAlchemy sends BEGIN with its first statement: a driver statement first must not escape."""

    async def abandoned_unit() -> None:
        async with engine.begin() as conn:
            await driver.one(conn, _INSERT_NODE, {"node": "driver-d"})
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await abandoned_unit()
    assert "driver-d" not in await _node_ids(engine)


async def test_a_refused_write_is_the_project_error_and_the_connection_stays_usable(engine: AsyncEngine) -> None:
    async with autocommit(engine) as conn:
        await driver.fetchrow(conn, _INSERT_JOB_ID, {"job_id": "driver-job"})
        with pytest.raises(JobIdConflict), translate_errors():
            await driver.fetchrow(conn, _INSERT_JOB_ID, {"job_id": "driver-job"})
        with pytest.raises(sa_exc.IntegrityError) as raised:
            await driver.fetchrow(conn, _INSERT_JOB_ID, {"job_id": "driver-job"})
        assert isinstance(raised.value.orig, asyncpg.UniqueViolationError)
        assert (await driver.one(conn, driver.Statement(sa.text("SELECT 1 AS one")), {})).one == 1


async def test_a_connection_the_server_ended_is_an_operational_error_and_not_reused(
    engine: AsyncEngine, raw_connection: asyncpg.Connection
) -> None:
    """The API answers 503 to an OperationalError; the pool must then hand out a live connection.
    Twenty times: how asyncpg reports the end depends on when it arrives."""
    select_pid = driver.Statement(sa.text("SELECT pg_backend_pid() AS pid"))
    for _ in range(20):
        async with autocommit(engine) as conn:
            pid = (await driver.one(conn, select_pid, {})).pid
            await raw_connection.execute("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(sa_exc.OperationalError) as raised:
                await driver.one(conn, select_pid, {})
            assert raised.value.connection_invalidated
        for _ in range(3):  # whichever pooled connection comes next, it answers
            async with autocommit(engine) as conn:
                assert (await driver.one(conn, select_pid, {})).pid != pid


async def test_a_refused_statement_ends_the_unit_and_the_pool_serves_the_next(engine: AsyncEngine) -> None:
    broken = driver.Statement(sa.text("SELECT no_such_column FROM nodes WHERE node_id = :node"))

    async def refused_unit() -> None:
        async with driver.transaction(engine) as conn:
            await driver.one(conn, _INSERT_NODE, {"node": "driver-e"})
            await driver.fetch(conn, broken, {"node": "driver-e"})

    for _ in range(3):  # the engine's pool has two connections: each is reused after a failed unit
        with pytest.raises(sa_exc.ProgrammingError):
            await refused_unit()
        assert "driver-e" not in await _node_ids(engine)


async def test_a_unit_cancelled_mid_statement_leaves_no_open_transaction_in_the_pool(engine: AsyncEngine) -> None:
    """SQLAlchemy's reset on return sends nothing in autocommit mode: the unit itself must
    end the transaction, or not pool the connection again."""
    sleep = driver.Statement(sa.text("SELECT pg_sleep(:seconds) AS slept"))

    async def slow_unit() -> None:
        async with driver.transaction(engine) as conn:
            await driver.one(conn, _INSERT_NODE, {"node": "driver-f"})
            await driver.one(conn, sleep, {"seconds": 5})

    task = asyncio.create_task(slow_unit())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(3):  # the engine's pool has two connections
        async with autocommit(engine) as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert isinstance(raw, asyncpg.Connection)
            assert not raw.is_in_transaction()
            assert (await driver.one(conn, driver.Statement(sa.text("SELECT 1 AS one")), {})).one == 1
    assert "driver-f" not in await _node_ids(engine)


async def test_a_pooled_transaction_commits_its_statements_together(engine: AsyncEngine) -> None:
    async with driver.pooled_transaction(engine) as conn:
        await driver.one(conn, _INSERT_NODE, {"node": "pooled-a"})
        await driver.execute(
            conn, driver.Statement(sa.text("UPDATE nodes SET cpu_used = 1 WHERE node_id = :node")), {"node": "pooled-a"}
        )
        assert "pooled-a" not in await _node_ids(engine)  # not before the commit
    async with engine.connect() as check:
        used = (await check.execute(sa.text("SELECT cpu_used FROM nodes WHERE node_id = 'pooled-a'"))).scalar_one()
    assert used == 1


async def test_a_pooled_transaction_that_fails_or_is_cancelled_writes_nothing_and_leaves_none_open(
    engine: AsyncEngine,
) -> None:
    broken = driver.Statement(sa.text("SELECT no_such_column FROM nodes"))
    sleep = driver.Statement(sa.text("SELECT pg_sleep(:seconds) AS slept"))

    async def refused_unit() -> None:
        async with driver.pooled_transaction(engine) as conn:
            await driver.one(conn, _INSERT_NODE, {"node": "pooled-b"})
            await driver.fetch(conn, broken, {})

    async def slow_unit() -> None:
        async with driver.pooled_transaction(engine) as conn:
            await driver.one(conn, _INSERT_NODE, {"node": "pooled-c"})
            await driver.one(conn, sleep, {"seconds": 5})

    with pytest.raises(sa_exc.ProgrammingError):
        await refused_unit()
    task = asyncio.create_task(slow_unit())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not {"pooled-b", "pooled-c"} & await _node_ids(engine)
    sizes = driver.driver_pool_sizes(engine)
    assert sizes is not None
    async with contextlib.AsyncExitStack() as stack:  # every connection the pool holds, at once
        for _ in range(sizes[0]):
            conn = await stack.enter_async_context(driver.pooled(engine))
            assert not conn.raw.is_in_transaction()
            assert (await driver.one(conn, driver.Statement(sa.text("SELECT 1 AS one")), {})).one == 1


_APPLICATION = "driver-pool-test"


async def _backends_of(raw_connection: asyncpg.Connection, application: str) -> int:
    count = await raw_connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        application,
    )
    assert isinstance(count, int)
    return count


async def test_a_pooled_connection_reads_json_as_the_engine_does(engine: AsyncEngine) -> None:
    """Rows read through driver.pooled and through a SQLAlchemy connection are the same documents."""
    select_json = driver.Statement(
        sa.text(
            "SELECT CAST(:document AS json) AS plain, CAST(:document AS jsonb) AS binary,"
            " json_build_array(1, 'two', NULL) AS built"
        )
    )
    document = '{"a": [1, 2.5, "x"], "b": {"c": null}}'
    async with driver.pooled(engine) as pooled:
        from_pool = await driver.one(pooled, select_json, {"document": document})
    async with autocommit(engine) as conn:
        from_engine = await driver.one(conn, select_json, {"document": document})
    assert (
        dict(from_pool)
        == dict(from_engine)
        == {
            "plain": {"a": [1, 2.5, "x"], "b": {"c": None}},
            "binary": {"a": [1, 2.5, "x"], "b": {"c": None}},
            "built": [1, "two", None],
        }
    )


async def test_the_driver_pool_reuses_its_connections_and_closes_them_with_the_engine(
    migrated_url: str, raw_connection: asyncpg.Connection
) -> None:
    engine = create_engine(Settings(database_url=migrated_url, db_pool_size=2), application_name=_APPLICATION)
    select_pid = driver.Statement(sa.text("SELECT pg_backend_pid() AS pid"))
    try:
        assert await _backends_of(raw_connection, _APPLICATION) == 0  # nothing opened before it is needed
        pids = set()
        for _ in range(5):
            async with driver.pooled(engine) as conn:
                pids.add((await driver.one(conn, select_pid, {})).pid)
        assert len(pids) == 1  # one after another: the same connection each time
        assert driver.driver_pool_sizes(engine) == (1, 1)
    finally:
        await engine.dispose()
    for _ in range(50):  # the server notices the goodbye a moment later
        if await _backends_of(raw_connection, _APPLICATION) == 0:
            break
        await asyncio.sleep(0.02)
    assert await _backends_of(raw_connection, _APPLICATION) == 0


async def test_a_pooled_connection_the_server_ended_is_an_operational_error_and_not_reused(
    engine: AsyncEngine, raw_connection: asyncpg.Connection
) -> None:
    select_pid = driver.Statement(sa.text("SELECT pg_backend_pid() AS pid"))
    for _ in range(10):
        async with driver.pooled(engine) as conn:
            pid = (await driver.one(conn, select_pid, {})).pid
            await raw_connection.execute("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(sa_exc.OperationalError):
                await driver.one(conn, select_pid, {})
        for _ in range(3):
            async with driver.pooled(engine) as conn:
                assert (await driver.one(conn, select_pid, {})).pid != pid


async def test_a_server_the_driver_pool_cannot_reach_is_an_operational_error() -> None:
    """What the API answers 503 to, as for SQLAlchemy's own pool."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    engine = create_engine(
        Settings(database_url=f"postgresql://postgres@127.0.0.1:{port}/none", db_connect_timeout_seconds=2)
    )
    try:
        with pytest.raises(sa_exc.OperationalError):
            async with driver.pooled(engine) as conn:
                await driver.one(conn, driver.Statement(sa.text("SELECT 1 AS one")), {})
    finally:
        await engine.dispose()


async def test_log_entries_written_together_read_back_in_the_order_given(engine: AsyncEngine) -> None:
    # One change's entries share its instant, so only their order of writing orders them
    # in the job's log (a failed attempt before its retry, say).
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    events = ["attempt_failed", "retry_scheduled", "requeued", "cancelled", "redriven", "failed"]
    async with driver.transaction(engine) as conn:
        await driver.execute(conn, _INSERT_JOB_ID, {"job_id": "job_logorder01"})
        await write_log(conn, [LogEntry("job_logorder01", event, f"step {event}", at) for event in events])
    async with engine.connect() as conn:
        written = [entry for entry in await jobs.job_logs(conn, "job_logorder01") if entry["event"] in events]
    assert [entry["event"] for entry in written] == events
    assert {entry["at"] for entry in written} == {"2026-03-01T12:00:00.000000Z"}


async def test_log_entries_of_different_instants_are_refused_and_nothing_is_written(engine: AsyncEngine) -> None:
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    entries = [
        LogEntry("job_logorder02", "requeued", "x", at),
        LogEntry("job_logorder02", "failed", "y", at + timedelta(seconds=1)),
    ]

    async def insert_and_log() -> None:
        async with driver.transaction(engine) as conn:
            await driver.execute(conn, _INSERT_JOB_ID, {"job_id": "job_logorder02"})
            await write_log(conn, entries)

    with pytest.raises(ValueError, match="one instant"):
        await insert_and_log()
    async with engine.connect() as conn:
        assert (
            await conn.execute(sa.text("SELECT count(*) FROM jobs WHERE job_id = 'job_logorder02'"))
        ).scalar_one() == 0
