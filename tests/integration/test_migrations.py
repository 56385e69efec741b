"""The migrations build the declared schema (SPEC §7), and nothing else.

Like Procrastinate's migration test: a database built by the migrations is diffed,
catalog entry by catalog entry, against one built from `tables.metadata`, so a
change to either that forgets the other fails here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from queue_service.db import migrate, tables
from queue_service.db.engine import asyncpg_dsn
from queue_service.settings import normalize_database_url

pytestmark = pytest.mark.integration

APPLICATION_TABLES = {
    "jobs",
    "dispatch_control",
    "job_dependencies",
    "job_attempts",
    "job_events",
    "nodes",
    "schedules",
    "queue_counters",
    "queue_rank_base",
    "queue_rank_deltas",
}
APPLICATION_VIEWS = {"job_log"}

# Catalog queries whose results must be equal between the two databases.
CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name <> 'alembic_version'
        ORDER BY table_name, ordinal_position
    """,
    "constraints": """
        SELECT conrelid::regclass::text AS table_name, conname, contype, pg_get_constraintdef(oid) AS definition
        FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'alembic_version'
        ORDER BY 1, 2
    """,
    "indexes": """
        SELECT tablename, indexname, indexdef
        FROM pg_indexes
        WHERE schemaname = 'public' AND tablename <> 'alembic_version'
        ORDER BY 1, 2
    """,
    "triggers": """
        SELECT tgrelid::regclass::text AS table_name, tgname, pg_get_triggerdef(oid) AS definition
        FROM pg_trigger
        WHERE NOT tgisinternal
        ORDER BY 1, 2
    """,
    "functions": """
        SELECT proname, pg_get_functiondef(oid) AS definition
        FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace
        ORDER BY 1
    """,
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1
    """,
    "sequences": """
        SELECT sequence_name, data_type FROM information_schema.sequences
        WHERE sequence_schema = 'public'
        ORDER BY 1
    """,
}


async def catalog(url: str) -> dict[str, list[dict[str, Any]]]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return {name: [dict(row) for row in await connection.fetch(query)] for name, query in CATALOG_QUERIES.items()}
    finally:
        await connection.close()


async def create_declared_schema(url: str) -> None:
    engine = create_async_engine(normalize_database_url(url), poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(tables.metadata.create_all)
    finally:
        await engine.dispose()


async def table_names(url: str) -> set[str]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await connection.close()


async def test_upgrade_builds_the_schema_from_empty(database_url: str) -> None:
    assert await migrate.current_revision(database_url) is None
    assert await table_names(database_url) == set()

    await migrate.upgrade(database_url)

    assert await migrate.current_revision(database_url) == migrate.head_revision()
    assert await table_names(database_url) == APPLICATION_TABLES | {"alembic_version"}


async def test_concurrent_upgrades_take_turns(create_database: Callable[[], Awaitable[str]]) -> None:
    """Replicas starting together each apply migrations; the advisory lock serialises them."""
    url = await create_database()
    await asyncio.gather(*(migrate.upgrade(url) for _ in range(4)))
    assert await migrate.current_revision(url) == migrate.head_revision()


async def test_downgrade_to_base_removes_everything_and_upgrade_rebuilds(
    create_database: Callable[[], Awaitable[str]],
) -> None:
    url = await create_database()
    await migrate.upgrade(url)
    before = await catalog(url)

    await migrate.downgrade(url, "base")
    assert await migrate.current_revision(url) is None
    assert await table_names(url) == {"alembic_version"}
    emptied = await catalog(url)
    assert all(not rows for rows in emptied.values()), emptied

    await migrate.upgrade(url)
    assert await catalog(url) == before


async def test_migrated_catalog_equals_declared_catalog(
    migrated_url: str, create_database: Callable[[], Awaitable[str]]
) -> None:
    declared_url = await create_database()
    await create_declared_schema(declared_url)

    migrated, declared = await catalog(migrated_url), await catalog(declared_url)

    for part in CATALOG_QUERIES:
        assert migrated[part] == declared[part], part
    # The diff is only as good as its coverage: everything declared shows up.
    assert {row["table_name"] for row in migrated["columns"]} == APPLICATION_TABLES | APPLICATION_VIEWS
    assert {row["viewname"] for row in migrated["views"]} == APPLICATION_VIEWS
    declared_indexes = {index.name for table in tables.metadata.tables.values() for index in table.indexes}
    assert declared_indexes <= {row["indexname"] for row in migrated["indexes"]}
    declared_checks = {
        constraint.name
        for table in tables.metadata.tables.values()
        for constraint in table.constraints
        if constraint.__visit_name__ == "check_constraint"
    }
    assert declared_checks == {row["conname"] for row in migrated["constraints"] if row["contype"] == "c"}
    assert {row["tgname"] for row in migrated["triggers"]} == {
        "jobs_count_insert",
        "jobs_count_update",
        "jobs_count_delete",
        "jobs_count_truncate",
        "jobs_rank_insert",
        "jobs_rank_update",
        "jobs_rank_delete",
        "jobs_rank_truncate",
    }


async def test_autogenerate_sees_no_difference(engine: AsyncEngine) -> None:
    """Alembic's own comparison (types, nullability, defaults, indexes) agrees too."""
    async with engine.connect() as connection:
        diff = await connection.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"compare_type": True, "compare_server_default": True}),
                tables.metadata,
            )
        )
    assert diff == []


# The hot-path indexes as PostgreSQL reports them: the declared and migrated schemas
# could agree and both be wrong, so the predicates the queries rely on are spelled out.
EXPECTED_INDEXES = {
    "ix_jobs_ready_queue": "ON public.jobs USING btree (sort_key, job_id) WHERE (status = 'ready'::text)",
    "ix_jobs_retry_due": "ON public.jobs USING btree (next_attempt_at) WHERE (status = 'retrying'::text)",
    "ix_jobs_lease_expiry": "ON public.jobs USING btree (lease_expires_at) WHERE (status = 'running'::text)",
    "ix_jobs_created": "ON public.jobs USING btree (created_at DESC, job_id DESC)",
    "ix_jobs_status_created": "ON public.jobs USING btree (status, created_at DESC, job_id DESC)",
    "ix_jobs_dead_letter": "ON public.jobs USING btree (finished_at DESC, job_id DESC) WHERE (status = 'failed'::text)",
    "ix_job_dependencies_depends_on_job_id": "ON public.job_dependencies USING btree (depends_on_job_id)",
    "pk_job_events": "ON public.job_events USING btree (job_id, id)",
    "ux_job_attempts_one_running": "ON public.job_attempts USING btree (job_id) WHERE (outcome IS NULL)",
}


async def test_hot_path_indexes_have_their_predicates(migrated_url: str) -> None:
    indexes = {row["indexname"]: row["indexdef"] for row in (await catalog(migrated_url))["indexes"]}
    for name, definition in EXPECTED_INDEXES.items():
        assert indexes[name].endswith(definition), (name, indexes[name])
    assert indexes["ux_job_attempts_one_running"].startswith("CREATE UNIQUE INDEX")


# A log as the code before migration 0011 wrote it, every entry a row of job_events:
# job_a ran once and succeeded; job_b waits on it; job_c was backfilled past job_b and
# failed its first attempt, to be retried.
_LOG_BEFORE_0011 = """
INSERT INTO nodes (node_id, cpu_capacity, memory_capacity) VALUES ('n1', 8, 4096);
INSERT INTO jobs (job_id, type, priority, status, payload, cpu_units, memory_mb, max_attempts, backoff_multiplier,
                  initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, request_hash, attempt_budget,
                  unfinished_deps, created_at, updated_at, ready_at, sort_key)
VALUES ('job_a', 'report', 'high', 'ready', '{}', 2, 256, 3, 2, 1, 300, 0, 60, 'h', 3, 0,
        '2026-01-01 00:00:00Z', '2026-01-01 00:00:00Z', '2026-01-01 00:00:00Z', 1),
       ('job_b', 'email', 'normal', 'blocked', '{}', 1, 128, 3, 2, 1, 300, 0, 60, 'h', 3, 1,
        '2026-01-01 00:00:00Z', '2026-01-01 00:00:00Z', NULL, NULL),
       ('job_c', 'export', 'low', 'ready', '{}', 1, 64, 3, 2, 1, 300, 0, 60, 'h', 3, 0,
        '2026-01-01 00:00:00.5Z', '2026-01-01 00:00:00.5Z', '2026-01-01 00:00:00.5Z', 2);
INSERT INTO job_dependencies (job_id, depends_on_job_id) VALUES ('job_b', 'job_a');
INSERT INTO job_events (job_id, at, attempt, level, event, message, data) VALUES
    ('job_a', '2026-01-01 00:00:00Z', NULL, 'info', 'submitted', 'submitted as report',
     '{"priority": "high", "cpu_units": 2, "memory_mb": 256}'),
    ('job_a', '2026-01-01 00:00:00Z', NULL, 'info', 'ready', 'no dependencies', '{}'),
    ('job_b', '2026-01-01 00:00:00Z', NULL, 'info', 'submitted', 'submitted as email',
     '{"priority": "normal", "cpu_units": 1, "memory_mb": 128}'),
    ('job_b', '2026-01-01 00:00:00Z', NULL, 'info', 'blocked', 'waiting for job_a', '{"waiting_for": ["job_a"]}'),
    ('job_c', '2026-01-01 00:00:00.5Z', NULL, 'info', 'submitted', 'submitted as export',
     '{"priority": "low", "cpu_units": 1, "memory_mb": 64}'),
    ('job_c', '2026-01-01 00:00:00.5Z', NULL, 'info', 'ready', 'no dependencies', '{}');
SELECT * FROM start_attempts(
    ARRAY['job_a', 'job_c'], ARRAY[gen_random_uuid(), gen_random_uuid()], ARRAY[1, 1], ARRAY[2, 1], ARRAY[256, 64],
    ARRAY[NULL, 'job_b'], '2026-01-01 00:00:01Z', '2026-01-01T00:00:01Z', 'n1', '2026-01-01 00:00:31Z', 'unheard'
);
UPDATE job_attempts SET ended_at = '2026-01-01 00:00:02Z', outcome = 'succeeded' WHERE job_id = 'job_a';
UPDATE job_attempts SET ended_at = '2026-01-01 00:00:02Z', outcome = 'failed', error = 'boom' WHERE job_id = 'job_c';
INSERT INTO job_events (job_id, at, attempt, level, event, message, data) VALUES
    ('job_c', '2026-01-01 00:00:02Z', 1, 'warning', 'attempt_failed', 'attempt 1 failed: boom', '{"error": "boom"}'),
    ('job_c', '2026-01-01 00:00:02Z', 1, 'info', 'retry_scheduled', 'retry in 1.0s', '{"delay_seconds": 1.0}'),
    ('job_a', '2026-01-01 00:00:02Z', 1, 'info', 'succeeded', 'attempt 1 succeeded', '{}'),
    ('job_b', '2026-01-01 00:00:02Z', NULL, 'info', 'ready', 'every dependency completed', '{}');
"""
_LOG_COLUMNS = "at, attempt, level, event, message, data"


async def _logs(url: str, source: str) -> dict[str, list[tuple[Any, ...]]]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await connection.fetch(f"SELECT job_id, {_LOG_COLUMNS} FROM {source}")
    finally:
        await connection.close()
    logs: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        logs.setdefault(row["job_id"], []).append(tuple(row)[1:])
    return logs


async def test_0011_keeps_every_log_as_it_read_both_ways(create_database: Callable[[], Awaitable[str]]) -> None:
    """Migration 0011 reads the entries a job's rows record from the rows: a log written
    before it reads the same after it, entry for entry and in order, and after its
    downgrade again from job_events alone."""
    url = await create_database()
    await migrate.upgrade(url, "0010")
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute(_LOG_BEFORE_0011)
    finally:
        await connection.close()
    by_id = "job_events ORDER BY job_id, id"
    before = await _logs(url, by_id)
    assert [entry[3] for entry in before["job_c"]] == [
        "submitted", "ready", "dispatched", "started", "attempt_failed", "retry_scheduled"
    ]  # fmt: skip

    await migrate.upgrade(url)
    assert await _logs(url, "job_log ORDER BY job_id, at, step, seq") == before
    # Only what no row of the job records is still written as an entry.
    assert {event for log in (await _logs(url, by_id)).values() for *_, event, _, _ in log} == {
        "blocked",
        "attempt_failed",
        "retry_scheduled",
        "ready",
    }

    await migrate.downgrade(url, "0010")
    assert await _logs(url, by_id) == before
