"""The one place that wires a running process together (cosmicpython's bootstrap).

`open_runtime()` starts, in order, what a process of the service needs: the
embedded PostgreSQL when no `DATABASE_URL` is set, the migrations, the engine,
the LISTEN connection and, for a worker, the worker node; on exit it stops them
in reverse. The FastAPI lifespan (`taskqueue serve`, `taskqueue api`) and the
worker-only process (`taskqueue worker`) both run inside it, so they cannot
drift apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.db import migrate
from queue_service.db.embedded import start_embedded
from queue_service.db.engine import create_engine
from queue_service.db.listener import EventListener
from queue_service.settings import Settings
from queue_service.worker.node import WorkerNode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The live resources of a process, for request handlers and the CLI."""

    settings: Settings
    database_url: str
    engine: AsyncEngine
    listener: EventListener
    worker: WorkerNode | None


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
        listener = EventListener(url)
        await listener.start()
        stack.push_async_callback(listener.stop)
        worker = None
        if run_worker:
            worker = WorkerNode(engine, settings, listener)
            await worker.start()
            stack.push_async_callback(worker.stop)
        log.info("service ready (worker node: %s)", worker.node_id if worker else "none")
        yield Runtime(settings, url, engine, listener, worker)
        log.info("shutting down")
