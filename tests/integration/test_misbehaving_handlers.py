"""Handlers that misbehave end their attempts as documented, and the node keeps working.

A handler may be slow, ignore cancellation, raise anything (SystemExit and
KeyboardInterrupt included), not be a coroutine function at all, or return what
JSON cannot carry. Each case ends its job as ARCHITECTURE.md's guarantees say,
and afterwards the same node still runs an ordinary job and stops on request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.core.model import Priority
from queue_service.core.policy import sort_key
from queue_service.db.engine import create_engine
from queue_service.db.listener import EventListener
from queue_service.settings import Settings
from queue_service.worker import node as node_module
from queue_service.worker.handlers import HandlerRegistry, JobContext
from queue_service.worker.node import WorkerNode

pytestmark = pytest.mark.integration

registry = HandlerRegistry()


@registry.handler("stubborn")
async def stubborn(job: JobContext) -> None:
    """Swallows every cancellation for a while: a handler that will not stop."""
    until = time.monotonic() + 6
    while time.monotonic() < until:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            continue


@registry.handler("exits")
async def exits(job: JobContext) -> None:
    sys.exit(3)


@registry.handler("interrupts")
async def interrupts(job: JobContext) -> None:
    raise KeyboardInterrupt


@registry.handler("raises")
async def raises(job: JobContext) -> None:
    raise LookupError("no such thing")


@registry.handler("unserialisable")
async def unserialisable(job: JobContext) -> object:
    return object()


@registry.handler("ok")
async def ok(job: JobContext) -> dict[str, int]:
    return {"answer": 42}


def not_a_coroutine(job: JobContext) -> None:
    return None


registry.register("sync", not_a_coroutine)  # type: ignore[arg-type]


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=migrated_url, db_pool_size=6))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def node(migrated_url: str, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[WorkerNode]:
    monkeypatch.setattr(node_module, "ABANDON_AFTER_SECONDS", 0.5)
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, nodes CASCADE"))
    settings = Settings(
        database_url=migrated_url, poll_interval_seconds=0.2, lease_seconds=5.0, shutdown_grace_seconds=1.0
    )
    listener = EventListener(migrated_url)
    await listener.start()
    worker = WorkerNode(engine, settings, listener, registry=registry, node_id="misbehaving")
    await worker.start()
    try:
        yield worker
    finally:
        if not worker._stopping:
            await asyncio.wait_for(worker.stop(0), timeout=10)
        await listener.stop()


async def submit(engine: AsyncEngine, job_id: str, job_type: str, *, timeout: float = 30, attempts: int = 1) -> None:
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                """
                INSERT INTO jobs (job_id, type, priority, status, payload, cpu_units, memory_mb, max_attempts,
                    backoff_multiplier, initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds,
                    request_hash, attempt_budget, ready_at, sort_key)
                VALUES (:id, :type, 'normal', 'ready', '{}', 1, 128, :attempts, 2, 0.1, 1, 0, :timeout, 'test',
                    :attempts, :now, :key)
                """
            ),
            {
                "id": job_id,
                "type": job_type,
                "attempts": attempts,
                "timeout": timeout,
                "now": now,
                "key": sort_key(now.timestamp(), Priority.NORMAL, Settings().policy_config()),
            },
        )
        await conn.execute(
            sa.text("SELECT pg_notify('taskqueue_events', :message)"),
            {"message": json.dumps({"event": "dispatch.wake"})},
        )


async def ended(engine: AsyncEngine, job_id: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.text(
                        "SELECT j.status, j.failure_reason, j.last_error, j.result, a.outcome, a.error "
                        "FROM jobs j JOIN job_attempts a USING (job_id) WHERE j.job_id = :id ORDER BY a.attempt DESC"
                    ),
                    {"id": job_id},
                )
            ).first()
        if row is not None and row.status in ("completed", "failed", "cancelled"):
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} did not end within {timeout}s")


async def node_still_works(engine: AsyncEngine, tag: str) -> None:
    await submit(engine, f"after-{tag}", "ok")
    row = await ended(engine, f"after-{tag}")
    assert (row.status, row.result) == ("completed", {"answer": 42})


@pytest.mark.parametrize(
    ("job_type", "error"),
    [
        ("exits", "SystemExit: 3"),
        ("interrupts", "KeyboardInterrupt"),
        ("raises", "LookupError: no such thing"),
        ("sync", "TypeError"),
        ("unserialisable", "the handler's result is not JSON"),
    ],
)
async def test_a_handler_that_raises_anything_fails_its_attempt(
    engine: AsyncEngine, node: WorkerNode, job_type: str, error: str
) -> None:
    await submit(engine, job_type, job_type)
    row = await ended(engine, job_type)
    assert (row.status, row.failure_reason, row.outcome) == ("failed", "max_attempts_exhausted", "failed")
    assert row.error.startswith(error), row.error
    await node_still_works(engine, job_type)


async def test_a_handler_that_ignores_its_timeout_is_abandoned_and_its_capacity_freed(
    engine: AsyncEngine, node: WorkerNode
) -> None:
    await submit(engine, "stubborn", "stubborn", timeout=0.3)
    started = time.monotonic()
    row = await ended(engine, "stubborn")
    assert (row.status, row.outcome) == ("failed", "timed_out")
    assert "abandoned" in row.error
    assert time.monotonic() - started < 5  # timeout + the abandon grace, not the handler's 6 s
    async with engine.connect() as conn:
        used = (await conn.execute(sa.text("SELECT cpu_used FROM nodes WHERE node_id = 'misbehaving'"))).scalar()
    assert used == 0
    await node_still_works(engine, "stubborn")


async def test_cancelling_a_handler_that_ignores_it_does_not_wedge_the_node(
    engine: AsyncEngine, node: WorkerNode
) -> None:
    await submit(engine, "stubborn-cancel", "stubborn")
    async with asyncio.timeout(10):
        while "stubborn-cancel" not in node.running:
            await asyncio.sleep(0.02)
    node._stop_attempt("stubborn-cancel", "cancelled")  # what a cancel announcement does
    async with asyncio.timeout(5):
        while "stubborn-cancel" in node.running:
            await asyncio.sleep(0.02)
    stopped = time.monotonic()
    await asyncio.wait_for(node.stop(0), timeout=10)  # and the node still stops when asked
    assert time.monotonic() - stopped < 5
