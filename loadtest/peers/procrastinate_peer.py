"""Procrastinate (psycopg 3 connector) measured the way its documentation runs it.

Enqueue is `Task.defer_async` one by one and `Task.batch_defer_async` in batches;
drain is one `run_worker_async(wait=False)` worker at its default concurrency (1),
timed until it returns, which it does once the queue is empty; latency runs a
waiting worker with LISTEN/NOTIFY on. Runs on asyncio's default loop, as its
command line (`procrastinate worker`) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from importlib.metadata import version
from typing import Any, Final

import procrastinate

from loadtest.peers import (
    BATCH_SIZE,
    DRAIN_TIMEOUT_SECONDS,
    RunResult,
    StartStamps,
    rate,
    sample_latencies,
    timed,
)

TASK_NAME: Final = "noop"
# Its worker logs every job at INFO; the benchmark wants its own output only.
logging.getLogger("procrastinate").setLevel(logging.WARNING)


class ProcrastinatePeer:
    name = f"Procrastinate {version('procrastinate')}"

    def run(self, main: Coroutine[Any, Any, RunResult]) -> RunResult:
        return asyncio.run(main)

    async def measure(self, database_url: str, jobs: int, samples: int) -> RunResult:
        stamps = StartStamps()
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=database_url))

        @app.task(name=TASK_NAME)
        async def noop(stamp: bool = False) -> None:
            if stamp:
                stamps.stamp()

        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            return await _measure(app, noop, stamps, jobs, samples)


async def _measure(app: procrastinate.App, task: Any, stamps: StartStamps, jobs: int, samples: int) -> RunResult:
    result = RunResult()

    async def one_by_one() -> None:
        for _ in range(jobs):
            await task.defer_async()

    result.enqueue_one_per_s = rate(jobs, await timed(one_by_one))

    started = time.perf_counter()
    async with asyncio.timeout(DRAIN_TIMEOUT_SECONDS):
        await app.run_worker_async(wait=False, install_signal_handlers=False)
    result.drain_per_s = rate(jobs, time.perf_counter() - started)

    worker = asyncio.create_task(app.run_worker_async(wait=True, install_signal_handlers=False))
    try:
        result.latencies_ms = await sample_latencies(lambda _i: task.defer_async(stamp=True), stamps.next, samples)
    finally:
        worker.cancel()  # a graceful stop: running jobs finish first
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    async def batches() -> None:
        for start in range(0, jobs, BATCH_SIZE):
            await task.batch_defer_async(*({} for _ in range(min(BATCH_SIZE, jobs - start))))

    result.enqueue_batch_per_s = rate(jobs, await timed(batches))
    return result
