"""PgQueuer (asyncpg driver) measured the way its documentation runs it.

Enqueue is `Queries.enqueue` with scalars (one job) and with lists (a batch);
drain is one `QueueManager.run()` with its defaults (continuous mode, dequeue
batches of 10), timed from start until it returns after the last handler has
run and its status log is flushed; latency runs the same idle worker.
Enqueue and worker use one connection each, as a producer and a worker would.
Runs on the event loop its command line (`pgq run`) runs on: uvloop where installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from importlib.metadata import version
from typing import Any, Final

import asyncpg
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.adapters.cli.cli import asyncio_run

from loadtest.peers import (
    BATCH_SIZE,
    DRAIN_TIMEOUT_SECONDS,
    Counter,
    RunResult,
    StartStamps,
    rate,
    sample_latencies,
    timed,
)

ENTRYPOINT: Final = "noop"
STAMP: Final = b"stamp"


class PgQueuerPeer:
    name = f"PgQueuer {version('pgqueuer')}"

    def run(self, main: Coroutine[Any, Any, RunResult]) -> RunResult:
        result: RunResult = asyncio_run(main)  # untyped where the peers extra is not installed
        return result

    async def measure(self, database_url: str, jobs: int, samples: int) -> RunResult:
        producer = await asyncpg.connect(database_url)
        consumer = await asyncpg.connect(database_url)
        try:
            queries = Queries(AsyncpgDriver(producer))
            await queries.install()
            return await _measure(queries, consumer, jobs, samples)
        finally:
            await producer.close()
            await consumer.close()


def _worker(consumer: asyncpg.Connection, counter: Counter, stamps: StartStamps) -> QueueManager:
    manager = QueueManager(Queries(AsyncpgDriver(consumer)))

    @manager.entrypoint(ENTRYPOINT)
    async def noop(job: Job) -> None:
        if job.payload == STAMP:
            stamps.stamp()
        else:
            counter.hit()

    return manager


async def _measure(queries: Queries, consumer: asyncpg.Connection, jobs: int, samples: int) -> RunResult:
    result = RunResult()

    async def one_by_one() -> None:
        for _ in range(jobs):
            await queries.enqueue(ENTRYPOINT, None)

    result.enqueue_one_per_s = rate(jobs, await timed(one_by_one))

    counter = Counter()
    stamps = StartStamps()
    counter.expect(jobs)
    manager = _worker(consumer, counter, stamps)
    started = time.perf_counter()
    run = asyncio.create_task(manager.run())
    async with asyncio.timeout(DRAIN_TIMEOUT_SECONDS):
        await counter.reached.wait()
    manager.shutdown.set()
    await run
    result.drain_per_s = rate(jobs, time.perf_counter() - started)

    manager = _worker(consumer, counter, stamps)
    run = asyncio.create_task(manager.run())
    try:
        result.latencies_ms = await sample_latencies(
            lambda _i: queries.enqueue(ENTRYPOINT, STAMP), stamps.next, samples
        )
    finally:
        manager.shutdown.set()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    async def batches() -> None:
        for start in range(0, jobs, BATCH_SIZE):
            size = min(BATCH_SIZE, jobs - start)
            await queries.enqueue([ENTRYPOINT] * size, [None] * size, [0] * size)

    result.enqueue_batch_per_s = rate(jobs, await timed(batches))
    return result
