"""Fixtures for tests against a real PostgreSQL server (integration and e2e).

The server is `TEST_DATABASE_URL` when set (any PostgreSQL 15+ URL, to its
maintenance database), else an embedded PostgreSQL started once per session in a
temporary folder, so the suite runs on a machine with nothing but Python. Each
test module gets its own freshly created database, dropped afterwards, so modules
never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from queue_service.db import migrate
from queue_service.db.embedded import start_embedded
from queue_service.db.engine import asyncpg_dsn, create_engine
from queue_service.settings import Settings, normalize_database_url, render_url

T = TypeVar("T")

DATABASE_PREFIX = "tq_test_"

# `count` jobs numbered from `first`, in every status, each row satisfying the
# jobs CHECKs: 60% completed, 15% ready, 5% blocked, 3% running, 3% retrying,
# 9% failed, 5% cancelled; priorities and eight types round robin; created one
# second apart, newest last.
SEED_JOBS_SQL = """
INSERT INTO jobs (
    job_id, type, priority, status, cpu_units, memory_mb, max_attempts, backoff_multiplier,
    initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, request_hash, attempts,
    attempt_budget, unfinished_deps, created_at, updated_at, ready_at, sort_key, started_at,
    finished_at, next_attempt_at, lease_token, lease_expires_at, worker_id, failure_reason, cancel_reason
)
SELECT
    'job_' || i, 'type_' || (i % 8), (ARRAY['critical', 'high', 'normal', 'low'])[1 + i % 4], s.status,
    1 + i % 4, 128 * (1 + i % 8), 3, 2.0, 1.0, 300.0, 0.0, 300.0, md5(i::text),
    CASE WHEN s.status IN ('blocked', 'ready') THEN 0 ELSE 1 END,
    3, CASE WHEN s.status = 'blocked' THEN 1 ELSE 0 END,
    t.created, t.created,
    CASE WHEN s.status <> 'blocked' THEN t.created END,
    CASE WHEN s.status <> 'blocked' THEN extract(epoch FROM t.created) - 3600 * (3 - i % 4) END,
    CASE WHEN s.status NOT IN ('blocked', 'ready') THEN t.created END,
    CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN t.created END,
    CASE WHEN s.status = 'retrying' THEN now() + make_interval(secs => i % 600 - 300) END,
    CASE WHEN s.status = 'running' THEN gen_random_uuid() END,
    CASE WHEN s.status = 'running' THEN now() + make_interval(secs => i % 60 - 30) END,
    CASE WHEN s.status NOT IN ('blocked', 'ready') THEN 'node-' || (i % 3) END,
    CASE WHEN s.status = 'failed' THEN 'max_attempts_exhausted' END,
    CASE WHEN s.status = 'cancelled' THEN 'user' END
FROM generate_series(CAST(:first AS integer), CAST(:first AS integer) + CAST(:count AS integer) - 1) AS i
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN i % 100 < 60 THEN 'completed'
        WHEN i % 100 < 75 THEN 'ready'
        WHEN i % 100 < 80 THEN 'blocked'
        WHEN i % 100 < 83 THEN 'running'
        WHEN i % 100 < 86 THEN 'retrying'
        WHEN i % 100 < 95 THEN 'failed'
        ELSE 'cancelled'
    END AS status
) AS s
CROSS JOIN LATERAL (SELECT timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => i) AS created) AS t
"""


async def seed_jobs(connection: AsyncConnection, count: int, first: int = 1) -> None:
    """Insert `count` jobs `job_<first>`… in a realistic mix of statuses (see SEED_JOBS_SQL)."""
    await connection.execute(sa.text(SEED_JOBS_SQL), {"first": first, "count": count})


def job_row(job_id: str, status: str = "ready", **overrides: object) -> dict[str, object]:
    """Column values of one job in `status` that satisfy every jobs CHECK."""
    row: dict[str, object] = {
        "job_id": job_id,
        "type": "noop",
        "priority": "normal",
        "status": status,
        "cpu_units": 1,
        "memory_mb": 128,
        "max_attempts": 3,
        "backoff_multiplier": 2.0,
        "initial_delay_seconds": 1.0,
        "max_delay_seconds": 300.0,
        "jitter": 0.0,
        "timeout_seconds": 300.0,
        "request_hash": "0" * 64,
        "attempt_budget": 3,
        "unfinished_deps": 1 if status == "blocked" else 0,
    }
    if status == "ready":
        row |= {"ready_at": datetime.now(UTC), "sort_key": 0.0}
    elif status == "running":
        row |= {"attempts": 1, "lease_token": uuid.uuid4(), "lease_expires_at": datetime.now(UTC)}
    return row | overrides


def run_in_private_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a synchronous fixture on a loop of its own.

    asyncio.run() would reset the thread's current event loop, which
    pytest-asyncio manages; a private loop leaves it alone.
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _admin_execute(server_url: str, statement: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL to the server's maintenance database, in plain `postgresql://` form."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    data_dir = tempfile.mkdtemp(prefix="tq-embedded-")
    server = start_embedded(data_dir)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


DatabaseFactory = Callable[[], Coroutine[Any, Any, str]]


@pytest.fixture(scope="module")
def create_database(server_url: str) -> Iterator[DatabaseFactory]:
    """An async factory of empty databases on the test server, all dropped after the module."""
    created: list[str] = []

    async def create() -> str:
        name = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
        await _admin_execute(server_url, f'CREATE DATABASE "{name}"')
        created.append(name)
        return render_url(make_url(server_url).set(database=name))

    yield create
    for name in created:
        # FORCE ends connections a failed test may have leaked, so the drop never hangs.
        run_in_private_loop(_admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def database_url(create_database: DatabaseFactory) -> str:
    """An empty database for this module."""
    return run_in_private_loop(create_database())


@pytest.fixture(scope="module")
def migrated_url(create_database: DatabaseFactory) -> str:
    """A database for this module with the migrations applied."""

    async def create_and_migrate() -> str:
        url = await create_database()
        await migrate.upgrade(url)
        return url

    return run_in_private_loop(create_and_migrate())


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the module's migrated database, disposed after the test."""
    engine = create_engine(Settings(database_url=migrated_url, db_pool_size=2, db_max_overflow=0))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def raw_connection(migrated_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A bare asyncpg connection on the module's migrated database."""
    connection = await asyncpg.connect(asyncpg_dsn(normalize_database_url(migrated_url)))
    try:
        yield connection
    finally:
        await connection.close()


SeedJobs = Callable[..., Coroutine[Any, Any, None]]
JobRow = Callable[..., dict[str, object]]


@pytest.fixture(scope="session")
def seed() -> SeedJobs:
    """`await seed(connection, count, first=1)`: the helper as a fixture, so tests need not import conftest."""
    return seed_jobs


@pytest.fixture(scope="session")
def make_job() -> JobRow:
    """`make_job(job_id, status="ready", **columns)`: a CHECK-satisfying jobs row."""
    return job_row


@pytest.fixture(scope="session")
def run_blocking() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """`run_in_private_loop`, for module-scoped fixtures that need to await."""
    return run_in_private_loop
