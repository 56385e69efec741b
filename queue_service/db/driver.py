"""The hottest statements, run on the pooled connection's asyncpg driver directly.

SQLAlchemy's execution path costs about 0.3 ms a statement on this kind of machine
(its greenlet bridge, execution context and result wrapping) where asyncpg alone
answers a trivial query in 0.13 ms, and a BEGIN/COMMIT pair through it costs as much
again: more than PostgreSQL's own work on a submission or a claim. So the statements
every job passes through (submit, claim, start, close) are compiled once from their
`sa.text` into asyncpg's positional form and executed on the driver connection
underneath the pooled SQLAlchemy one: same connection settings, same codecs (JSON
decoded), in the same transaction as any SQLAlchemy statement beside them. A
statement that is its own transaction runs on a connection of the engine's driver
pool instead (`pooled`).

A driver error becomes the SQLAlchemy error SQLAlchemy would have raised
(`IntegrityError` carrying the asyncpg error as `orig`, so `translate_errors` and
`is_retryable` read it as before; `OperationalError` for a lost connection, which
is invalidated so the pool does not hand it out again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg
import sqlalchemy as sa
from asyncpg.pool import PoolConnectionProxy
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import await_only

from queue_service.db.engine import POOL_RECYCLE_SECONDS, POOL_TIMEOUT_SECONDS, autocommit, driver_pool_spec

log = logging.getLogger(__name__)

POOL_CLOSE_SECONDS: Final = 5.0  # a driver pool still closing after this at shutdown is cut


_RECORD_ATTRIBUTES: Final = frozenset(dir(asyncpg.Record))


class Row(asyncpg.Record):
    """A driver row that also reads its columns as attributes, as SQLAlchemy's rows do,
    so code reading rows does not care which path fetched them.

    A column is looked up first: through `__getattr__`, every column read first failed
    as an attribute, raising and catching an AttributeError (0.5 us a read where the
    lookup by name takes 0.05; a drain reads some thirty a job). A Record's own
    attributes (`get`, `keys`, ...) win over columns of the same name."""

    def __getattribute__(self, name: str) -> Any:
        if name not in _RECORD_ATTRIBUTES:
            try:
                return asyncpg.Record.__getitem__(self, name)
            except KeyError:
                pass
        return object.__getattribute__(self, name)


_DIALECT: Final = asyncpg_dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy leaves it untyped


class Statement:
    """A statement (`sa.text`, or a Core construct without literal lists) compiled once
    for the driver: positional SQL, and the parameter names in the order of its `$n`
    placeholders (a name used twice is one)."""

    __slots__ = ("names", "sql", "text")

    def __init__(self, text: sa.TextClause | sa.Select[Any]) -> None:
        compiled = text.compile(dialect=_DIALECT)
        # As written, with named parameters (a construct: as SQLAlchemy renders it).
        self.text: Final = text.text if isinstance(text, sa.TextClause) else str(text)
        self.sql: Final = str(compiled)
        self.names: Final = tuple(compiled.positiontup or ())

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


class Pooled:
    """A connection of the engine's driver pool, for driver statements that are each
    their own transaction (a submission, a job read, an idle node's claim and start)."""

    __slots__ = ("raw",)

    def __init__(self, raw: PoolConnectionProxy) -> None:
        self.raw = raw

    async def invalidate(self, exception: BaseException | None = None) -> None:  # Executor's signature
        """Discard the connection: the pool opens a new one instead."""
        with contextlib.suppress(asyncpg.InterfaceError):  # ended by the server: already discarded
            self.raw.terminate()


# A driver connection: the one under a SQLAlchemy connection, or one of the driver pool.
DriverConnection = asyncpg.Connection | PoolConnectionProxy

# What the statements below run on: a SQLAlchemy connection (in a transaction or in
# autocommit mode) or a bare pooled one.
Executor = AsyncConnection | Pooled


@asynccontextmanager
async def pooled(engine: AsyncEngine) -> AsyncIterator[Pooled]:
    """A connection on which each driver statement is its own transaction (no SQLAlchemy
    statement runs on it), from the engine's driver pool.

    Why a pool beside SQLAlchemy's: its checkout and return cost 0.3 ms of Python a use
    (the greenlet bridge, the pool's events and reset), as much as the statement each
    served on the paths that wait on one statement: a lone submission, an idle node's
    start. asyncpg's pool hands a connection out and takes it back without a round
    trip (its reset, a round trip by default, is left out: a statement here leaves no
    session state, and a transaction still open is rolled back on return all the same)."""
    pool = _DRIVER_POOLS.get(engine.sync_engine) or await _open_driver_pool(engine)
    try:
        connection = await pool.acquire(timeout=POOL_TIMEOUT_SECONDS)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as error:
        # As SQLAlchemy's pool reports a server it cannot reach (the API answers 503).
        raise sa_exc.OperationalError("connect", None, error) from error
    try:
        yield Pooled(connection)
    finally:
        await pool.release(connection)


_DRIVER_POOLS: Final[weakref.WeakKeyDictionary[Engine, asyncpg.Pool]] = weakref.WeakKeyDictionary()


async def _open_driver_pool(engine: AsyncEngine) -> asyncpg.Pool:
    spec = driver_pool_spec(engine)
    if spec is None:
        raise ValueError("driver.pooled needs an engine from db.engine.create_engine")
    # No connection is opened before it is needed (min_size 0): a process that never
    # makes a single statement holds none, and none outlives its database in the tests.
    pool = await asyncpg.create_pool(
        spec.dsn,
        min_size=0,
        max_size=spec.max_size,
        max_inactive_connection_lifetime=POOL_RECYCLE_SECONDS,
        init=_decode_json_as_sqlalchemy_does,
        reset=_keep_session,
        **spec.connect_kwargs,
    )
    existing = _DRIVER_POOLS.setdefault(engine.sync_engine, pool)
    if existing is not pool:  # another task opened one meanwhile
        await pool.close()
        return existing
    if not sa.event.contains(engine.sync_engine, "engine_disposed", _on_engine_disposed):
        sa.event.listen(engine.sync_engine, "engine_disposed", _on_engine_disposed)
    return pool


def _on_engine_disposed(engine: Engine) -> None:
    """Disposing of the engine closes its driver pool. AsyncEngine.dispose runs this inside
    SQLAlchemy's greenlet, where await_only may wait on the driver."""
    await_only(_close_driver_pool(engine))


def driver_pool_sizes(engine: AsyncEngine) -> tuple[int, int] | None:
    """The engine's driver pool's open and idle connections; None before its first use."""
    pool = _DRIVER_POOLS.get(engine.sync_engine)
    return None if pool is None else (pool.get_size(), pool.get_idle_size())


async def _close_driver_pool(engine: Engine) -> None:
    """Close the pool's connections, and cut those that do not close in time: a
    connection still in use, or a server out of reach, must not hold the process's
    shutdown, and nothing here may fail it."""
    pool = _DRIVER_POOLS.pop(engine, None)
    if pool is None:
        return
    try:
        async with asyncio.timeout(POOL_CLOSE_SECONDS):
            await pool.close()
    except Exception as error:  # whatever the cause, the connections are cut below
        log.warning(
            "the driver pool did not close in time (%s: %s); its connections are cut", type(error).__name__, error
        )
        pool.terminate()


async def _decode_json_as_sqlalchemy_does(connection: asyncpg.Connection) -> None:
    """json and jsonb as the engine's connections read and write them (its asyncpg
    dialect's codecs): a parameter is JSON text, a value comes back decoded."""
    await connection.set_type_codec(
        "json", encoder=str.encode, decoder=_decode_json, schema="pg_catalog", format="binary"
    )
    await connection.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )


def _decode_json(value: bytes) -> Any:
    return json.loads(value.decode())


def _encode_jsonb(text: str) -> bytes:
    return b"\x01" + text.encode()  # jsonb's binary form: a version byte, then the text


def _decode_jsonb(value: bytes) -> Any:
    return json.loads(value[1:].decode())


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """The pool's reset: nothing to send (see pooled)."""


def _asyncpg_of(connection: object) -> asyncpg.Connection:
    assert isinstance(connection, asyncpg.Connection), "the engine must use the asyncpg driver"
    return connection


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A unit of work for the hot paths: a pooled connection on which SQLAlchemy
    issues no BEGIN of its own (autocommit mode) and a driver transaction is open,
    so SQLAlchemy and driver statements alike run inside it. Commits when the block
    ends, rolls back if it raises. Replaces `engine.begin()` where each statement's cost counts."""
    async with autocommit(engine) as conn, _driver_transaction(conn, await _driver_connection(conn)):
        yield conn


@asynccontextmanager
async def pooled_transaction(engine: AsyncEngine) -> AsyncIterator[Pooled]:
    """A transaction on a connection of the driver pool, for units of work of driver
    statements only: without SQLAlchemy's checkout and return, which cost a drain round
    more of the node's time than any of its statements. Commits when the block ends,
    rolls back if it raises."""
    async with pooled(engine) as conn, _driver_transaction(conn, conn.raw):
        yield conn


@asynccontextmanager
async def _driver_transaction(conn: Executor, raw: DriverConnection) -> AsyncIterator[None]:
    """BEGIN on `raw`; COMMIT when the block ends, ROLLBACK if it (or the commit) raises."""
    async with _translated(conn, raw, "BEGIN", ()):
        await raw.execute("BEGIN")
    try:
        yield
    except BaseException:
        await _roll_back(conn, raw)
        raise
    try:
        async with _translated(conn, raw, "COMMIT", ()):
            await raw.execute("COMMIT")
    except BaseException:
        await _roll_back(conn, raw)
        raise


async def _roll_back(conn: Executor, raw: DriverConnection) -> None:
    """End the unit; a connection still in a transaction (or gone) is not pooled again.
    SQLAlchemy's own reset on return cannot do it: in autocommit mode it sends nothing."""
    with contextlib.suppress(Exception):
        if not raw.is_closed() and raw.is_in_transaction():
            await raw.execute("ROLLBACK")
    if raw.is_closed() or raw.is_in_transaction():
        await conn.invalidate()


async def one(conn: Executor, statement: Statement, params: Mapping[str, Any]) -> Row:
    """The one row `statement` always answers (a statement of aggregates or a CTE summary)."""
    row = await fetchrow(conn, statement, params)
    if row is None:
        raise LookupError("the statement answered no row")
    return row


async def execute(conn: Executor, statement: Statement, params: Mapping[str, Any]) -> None:
    """Run `statement` for its effect, on `conn`'s driver connection."""
    raw = await _in_units_of_work(conn)
    arguments = statement.arguments(params)
    async with _translated(conn, raw, statement.sql, arguments):
        await raw.execute(statement.sql, *arguments)


async def fetch(conn: Executor, statement: Statement, params: Mapping[str, Any]) -> list[Row]:
    """Every row `statement` returns, run on `conn`'s driver connection."""
    raw = await _in_units_of_work(conn)
    arguments = statement.arguments(params)
    async with _translated(conn, raw, statement.sql, arguments):
        return await raw.fetch(statement.sql, *arguments, record_class=Row)


async def fetchrow(conn: Executor, statement: Statement, params: Mapping[str, Any]) -> Row | None:
    """The first row `statement` returns (None if none), run on `conn`'s driver connection."""
    raw = await _in_units_of_work(conn)
    arguments = statement.arguments(params)
    async with _translated(conn, raw, statement.sql, arguments):
        return await raw.fetchrow(statement.sql, *arguments, record_class=Row)


async def copy_records(conn: Executor, table: str, columns: Sequence[str], records: Iterable[Sequence[Any]]) -> None:
    """Rows into `table` by binary COPY, on `conn`'s driver connection (inside its
    transaction): each value goes in as its column's type, with nothing to parse."""
    raw = await _in_units_of_work(conn)
    async with _translated(conn, raw, f"COPY {table}", ()):
        await raw.copy_records_to_table(table, records=records, columns=list(columns))


async def _driver_connection(conn: AsyncConnection) -> asyncpg.Connection:
    return _asyncpg_of((await conn.get_raw_connection()).driver_connection)


async def _in_units_of_work(conn: Executor) -> DriverConnection:
    """The driver connection, inside `conn`'s transaction if it has one.

    SQLAlchemy sends BEGIN lazily, with its first statement: on a connection from
    `engine.begin()` that has run none yet, a driver statement would run outside the
    transaction. So a cheap statement through SQLAlchemy opens it first (only such
    connections pay it; `transaction()`, autocommit and bare pooled connections do not)."""
    if isinstance(conn, Pooled):
        return conn.raw
    proxied = await conn.get_raw_connection()
    raw = _asyncpg_of(proxied.driver_connection)
    if not raw.is_in_transaction() and not getattr(proxied.dbapi_connection, "autocommit", False):
        await conn.exec_driver_sql("SELECT 1")
    return raw


@asynccontextmanager
async def _translated(conn: Executor, raw: DriverConnection, sql: str, arguments: Any) -> AsyncIterator[None]:
    # InternalClientError is what asyncpg raises when the server ends the connection
    # while a statement is being prepared (a race: about one termination in thirty).
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError) as error:
        closed = _is_closed(raw)
        if closed:
            await conn.invalidate(error)  # the pool must not hand a dead connection out again
        raise _as_sqlalchemy(error, sql, arguments, raw_closed=closed) from error


def _is_closed(raw: DriverConnection) -> bool:
    """Whether the connection is gone. A driver pool's connection the server ended has
    already gone back to its pool, which then refuses every call on it."""
    try:
        return raw.is_closed()
    except asyncpg.InterfaceError:
        return True


def _as_sqlalchemy(error: Exception, sql: str, arguments: Any, *, raw_closed: bool) -> sa_exc.DBAPIError:
    """The SQLAlchemy error for a driver error, as its asyncpg dialect maps them."""
    if isinstance(error, asyncpg.IntegrityConstraintViolationError):
        return sa_exc.IntegrityError(sql, arguments, error)
    if raw_closed or isinstance(
        error, asyncpg.InterfaceError | asyncpg.PostgresConnectionError | OSError | TimeoutError
    ):
        return sa_exc.OperationalError(sql, arguments, error, connection_invalidated=raw_closed)
    if isinstance(error, asyncpg.exceptions.SyntaxOrAccessError):
        return sa_exc.ProgrammingError(sql, arguments, error)
    return sa_exc.DBAPIError(sql, arguments, error)
