"""The one place that wires a running process together (cosmicpython's bootstrap).

`open_runtime()` starts, in order, what a process of the service needs: the
embedded PostgreSQL when no `DATABASE_URL` is set, the migrations, the engine,
the LISTEN connection and, for a worker, the worker node and its leadership
candidate (`worker.leader`); on exit it stops them
in reverse. The FastAPI lifespan (`taskqueue serve`, `taskqueue api`) and the
worker-only process (`taskqueue worker`) both run inside it, so they cannot
drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.core.model import Resources
from queue_service.db import driver, jobs, migrate
from queue_service.db.embedded import start_embedded
from queue_service.db.engine import create_engine
from queue_service.db.listener import EventListener
from queue_service.observability.metrics import QueueMetrics
from queue_service.settings import Settings
from queue_service.worker.leader import Leader
from queue_service.worker.node import WorkerNode

log = logging.getLogger(__name__)


CAPACITY_CACHE_SECONDS = 1.0  # how stale the live nodes' capacities may be when a submission is checked


@dataclass
class CapacityCache:
    """The live nodes' capacities, reread at most once a second: every submission
    checks its jobs fit some node, and nodes come and go far more rarely than that."""

    capacities: list[Resources] = field(default_factory=list)
    read_at: float = -math.inf

    async def get(self, conn: driver.Executor) -> list[Resources]:
        if time.monotonic() - self.read_at > CAPACITY_CACHE_SECONDS:
            self.capacities = await jobs.live_capacities(conn)
            self.read_at = time.monotonic()
        return self.capacities


@dataclass(frozen=True)
class Runtime:
    """The live resources of a process, for request handlers and the CLI."""

    settings: Settings
    database_url: str
    engine: AsyncEngine
    listener: EventListener
    worker: WorkerNode | None
    capacities: CapacityCache = field(default_factory=CapacityCache, compare=False)
    metrics: QueueMetrics = field(default_factory=QueueMetrics)
    leader: Leader | None = None  # this process's leadership candidate (worker processes only)


async def database_url(settings: Settings, stack: AsyncExitStack) -> str:
    """The configured URL, else the embedded server's (started now, stopped by `stack`).

    Every process of one machine that leaves DATABASE_URL unset joins the same
    server in `data_dir`; the wheel stops it when the last of them lets go.
    """
    if settings.database_url is not None:
        return settings.database_url
    server = await asyncio.to_thread(start_embedded, settings.data_dir)
    stack.push_async_callback(asyncio.to_thread, server.stop)
    return server.url


@asynccontextmanager
async def open_runtime(settings: Settings, *, run_worker: bool) -> AsyncIterator[Runtime]:
    """Start the process's resources; stop them in reverse order on exit.

    Stopping the worker node is the graceful part of shutdown (SPEC §6): it stops
    dispatching, waits up to `shutdown_grace_seconds` for running attempts, and
    puts the rest back in the queue, before the engine goes away.
    """
    async with AsyncExitStack() as stack:
        url = await database_url(settings, stack)
        await migrate.upgrade(url)
        engine = create_engine(settings, url)
        stack.push_async_callback(engine.dispose)
        metrics = QueueMetrics()
        metrics.engine = engine
        listener = EventListener(url)
        listener.subscribe(metrics.on_event)
        await listener.start()
        stack.push_async_callback(listener.stop)
        worker = None
        leader = None
        if run_worker:
            worker = WorkerNode(engine, settings, listener)
            worker.observers.append(metrics)  # per-node histograms: dispatch, wait, run, outcomes
            await worker.start()
            stack.push_async_callback(worker.stop)
            # Single-leader duties (lease reaper, cron, counter compaction): every worker
            # process stands, one leads. Stopped before the node, so it lets go first.
            leader = Leader(engine, url, settings, worker.node_id)
            await leader.start()
            stack.push_async_callback(leader.stop)
        log.info("service ready (worker node: %s)", worker.node_id if worker else "none")
        yield Runtime(settings, url, engine, listener, worker, metrics=metrics, leader=leader)
        log.info("shutting down")
