"""The database connection: async engine and sessions from Settings, and error translation.

`create_engine` is called by whoever owns the process's lifetime (the FastAPI
lifespan, the worker runner, the CLI), never at import time, and that owner
disposes of it. `translate_errors` is the edge where a driver's IntegrityError on
a named constraint becomes a project error, so nothing above the repositories
imports asyncpg or inspects SQLSTATEs.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from queue_service.core.errors import QueueError, UnknownDependency
from queue_service.db import tables
from queue_service.db.errors import (
    AttemptConflict,
    CapacityExceeded,
    ConstraintViolated,
    IdempotencyKeyConflict,
    JobIdConflict,
)
from queue_service.settings import Settings, normalize_database_url, render_url

DEFAULT_APPLICATION_NAME: Final = "taskqueue"
POOL_TIMEOUT_SECONDS: Final = 10.0  # a request waits this long for a connection, then fails loudly
POOL_RECYCLE_SECONDS: Final = 30 * 60  # below typical proxy/load-balancer idle cut-offs

# Every connection runs with these, so timestamps print in UTC and the planner's
# JIT, which costs more than it saves on short OLTP statements, stays off. No
# transaction of the service waits on anything but the database, so one idle for a
# minute belongs to a stuck or cut-off client: the server ends it and frees its locks.
SERVER_SETTINGS: Final = {"timezone": "UTC", "jit": "off", "idle_in_transaction_session_timeout": "60s"}

# SQLSTATE codes (PostgreSQL Appendix A); class 23 is "integrity constraint violation".
UNIQUE_VIOLATION: Final = "23505"
FOREIGN_KEY_VIOLATION: Final = "23503"
CHECK_VIOLATION: Final = "23514"
INTEGRITY_CLASS: Final = "23"

_KEY_DETAIL = re.compile(r"Key \((?P<columns>[^)]*)\)=\((?P<values>.*)\)")


@dataclass(frozen=True)
class DriverPoolSpec:
    """How `driver.pooled` opens the connections of its own pool for an engine: the
    engine's server, settings and timeouts (see driver.pooled for why it has one)."""

    dsn: str
    max_size: int
    connect_kwargs: Mapping[str, Any]


# Engines made by create_engine, and what their driver pool is made of.
_DRIVER_POOL_SPECS: Final[weakref.WeakKeyDictionary[Engine, DriverPoolSpec]] = weakref.WeakKeyDictionary()


def driver_pool_spec(engine: AsyncEngine) -> DriverPoolSpec | None:
    """The driver pool an engine from create_engine has; None for an engine made elsewhere."""
    return _DRIVER_POOL_SPECS.get(engine.sync_engine)


def create_engine(settings: Settings, url: str | None = None, *, application_name: str | None = None) -> AsyncEngine:
    """An asyncpg engine for `url` (else `settings.database_url`), pooled as configured.

    `url` is how a caller passes the embedded server's URL, which exists only once
    the server is started. Any PostgreSQL URL form is accepted. The engine's single
    statements (`driver.pooled`) get a pool of their own of up to `db_pool_size`
    connections, opened on demand with the same settings and closed with the engine.
    """
    raw = url if url is not None else settings.database_url
    if raw is None:
        raise ValueError("no database URL: set DATABASE_URL or start the embedded server and pass its URL")
    connect_kwargs = {
        "server_settings": {**SERVER_SETTINGS, "application_name": application_name or DEFAULT_APPLICATION_NAME},
        "timeout": settings.db_connect_timeout_seconds,
        "command_timeout": settings.db_command_timeout_seconds,
    }
    engine = create_async_engine(
        normalize_database_url(raw),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        pool_recycle=POOL_RECYCLE_SECONDS,
        # The connection returned last is handed out first: its server process and its
        # client side are still warm. First in, first out gave an idle node the pool's
        # coldest connection for every start (submit -> handler start +0.36 ms, 6 runs).
        pool_use_lifo=True,
        # No pre-ping: it costs three extra round trips per checkout on the hot path. A
        # connection the server dropped fails once, is invalidated by SQLAlchemy, and the
        # callers (worker loops, API deadlock/availability handling) retry.
        connect_args=connect_kwargs,
    )
    _DRIVER_POOL_SPECS[engine.sync_engine] = DriverPoolSpec(asyncpg_dsn(raw), settings.db_pool_size, connect_kwargs)
    return engine


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection on which each statement is its own transaction.

    For reads, and for a write that is one statement: no BEGIN and COMMIT round
    trips (each ~0.3 ms through the driver, a fifth of a GET /jobs/{id}). Reads lose
    nothing by it: under READ COMMITTED every statement of a transaction takes its
    own snapshot anyway.
    """
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for one unit of work each (`async with maker.begin() as session:`).

    Objects stay readable after commit: the caller returns them after the unit ends.
    """
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers a trivial query (readiness)."""
    async with engine.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))


def asyncpg_dsn(url: str) -> str:
    """The plain libpq-style DSN `asyncpg.connect` takes, for a connection outside the
    pool (the LISTEN connection); undoes `normalize_database_url`'s driver and ssl changes."""
    parsed = make_url(normalize_database_url(url)).set(drivername="postgresql")
    if "ssl" in parsed.query:
        parsed = parsed.update_query_dict({"sslmode": parsed.query["ssl"]}).difference_update_query(["ssl"])
    return render_url(parsed)


class _DriverError(Protocol):
    """What asyncpg's PostgresError carries about a refused statement (read by duck typing,
    so this module needs no driver import)."""

    sqlstate: str | None
    constraint_name: str | None
    detail: str | None


def _driver_error(error: BaseException) -> _DriverError | None:
    """The driver's own exception behind SQLAlchemy's wrappers, if it names a SQLSTATE."""
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(getattr(current, "sqlstate", None), str) and hasattr(current, "constraint_name"):
            return cast(_DriverError, current)
        orig = current.orig if isinstance(current, DBAPIError) else None
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


def _key(detail: str | None) -> tuple[list[str], list[str]]:
    """Columns and values from a detail like `Key (job_id, attempt)=(job_1, 2) already exists.`

    A one-column key keeps its value whole (an idempotency key may hold ", ");
    splitting a composite key is safe, as job ids cannot contain a comma or a space.
    """
    match = _KEY_DETAIL.search(detail or "")
    if match is None:
        return [], []
    columns = match.group("columns").split(", ")
    values = match.group("values").split(", ") if len(columns) > 1 else [match.group("values")]
    return columns, values


# Constraint name -> project error, given the first value of the key it refused.
_UNIQUE_ERRORS: Final[dict[str, Callable[[str | None], QueueError]]] = {
    tables.JOBS_PK: JobIdConflict,
    tables.JOBS_IDEMPOTENCY_KEY_UNIQUE: IdempotencyKeyConflict,
    tables.ATTEMPTS_PK: AttemptConflict,
    tables.ONE_RUNNING_ATTEMPT: AttemptConflict,
}
_CHECK_ERRORS: Final[dict[str, Callable[[], QueueError]]] = {
    tables.NODE_CPU_CHECK: lambda: CapacityExceeded("cpu"),
    tables.NODE_MEMORY_CHECK: lambda: CapacityExceeded("memory"),
}


def translate(error: BaseException) -> QueueError | None:
    """The project error for a refused write, or None if `error` is no integrity violation."""
    driver = _driver_error(error)
    if driver is None or not (driver.sqlstate or "").startswith(INTEGRITY_CLASS):
        return None
    constraint = driver.constraint_name or ""
    columns, values = _key(driver.detail)
    if driver.sqlstate == UNIQUE_VIOLATION and constraint in _UNIQUE_ERRORS:
        return _UNIQUE_ERRORS[constraint](values[0] if values else None)
    if driver.sqlstate == CHECK_VIOLATION and constraint in _CHECK_ERRORS:
        return _CHECK_ERRORS[constraint]()
    # An edge to a missing job reports the edge's column; deleting a job others still
    # depend on trips the same constraint, reports jobs.job_id, and is a bug instead.
    if (
        driver.sqlstate == FOREIGN_KEY_VIOLATION
        and constraint == tables.DEPENDENCY_TARGET_FK
        and columns == [tables.job_dependencies.c.depends_on_job_id.name]
    ):
        return UnknownDependency(values)
    return ConstraintViolated(driver.constraint_name, str(driver))


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise an integrity violation inside the block as the matching project error.

    Works around awaits too (`with translate_errors(): await session.execute(...)`).
    The transaction is still aborted: let the unit of work roll back.
    """
    try:
        yield
    except Exception as error:
        translated = translate(error)
        if translated is None:
            raise
        raise translated from error


RETRYABLE_SQLSTATES: Final = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected


def is_retryable(error: DBAPIError) -> bool:
    """True for a deadlock or serialization failure: nothing was written, try again."""
    return getattr(error.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
