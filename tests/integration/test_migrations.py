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
    assert {row["table_name"] for row in migrated["columns"]} == APPLICATION_TABLES
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
