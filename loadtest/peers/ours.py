"""Smart Task Queue measured in-process, through the code the API itself calls.

Enqueue is what `POST /jobs` and `POST /jobs/batch` call: `jobs.submit_request` (one
statement for a lone job, one transaction for a batch), with body parsing and request
hash from `queue_service.api.submission`, no HTTP; drain and latency run one
`WorkerNode` in this process with a `noop` handler that returns at once, with
the node's default capacity (and, as `ours-64`, a node of 64 CPU units), resource
accounting, DAG bookkeeping and job logs.
The API's Prometheus observer is not attached. Runs on the event loop `taskqueue
serve` and `taskqueue worker` run on (`cli.run_on_fastest_loop`: uvloop where installed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

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
from queue_service.api.submission import parse_one
from queue_service.cli import run_on_fastest_loop
from queue_service.core.model import Resources
from queue_service.db import driver, insight, jobs, migrate
from queue_service.db.engine import autocommit, create_engine
from queue_service.db.listener import EventListener
from queue_service.observability.metrics import FOLD_INTERVAL_SECONDS
from queue_service.settings import Settings
from queue_service.worker.handlers import HandlerRegistry, JobContext
from queue_service.worker.leader import (
    CHURN_VACUUM_INTERVAL_SECONDS,
    STATISTICS_INTERVAL_SECONDS,
    VACUUM_INTERVAL_SECONDS,
)
from queue_service.worker.node import WorkerNode

JOB_TYPE: Final = "noop"
DONE_POLL_SECONDS: Final = 0.01


class Ours:
    name = "ours"
    node_size: ClassVar[Mapping[str, int]] = {}  # the default node: 8 CPU units, 4096 MB

    def run(self, main: Coroutine[Any, Any, RunResult]) -> RunResult:
        return run_on_fastest_loop(main)

    async def measure(self, database_url: str, jobs_count: int, samples: int) -> RunResult:
        await migrate.upgrade(database_url)
        settings = Settings.model_validate({"database_url": database_url, **self.node_size})
        engine = create_engine(settings, application_name="bench-ours")
        try:
            return await _measure(engine, settings, database_url, jobs_count, samples)
        finally:
            await engine.dispose()


class OursWideNode(Ours):
    """The same, on a node declared with 64 CPU units: a no-op job still takes a whole
    unit, so the default node's 8 units cap it at 8 in flight, where the peers' workers
    run as many as they fetch. What a deployment sizes its nodes to, not a shortcut:
    every start is still planned, fitted, accounted and logged."""

    name = "ours (64-unit node)"
    node_size: ClassVar[Mapping[str, int]] = {"node_cpu_units": 64, "node_memory_mb": 65536}


async def _submit(
    engine: AsyncEngine, settings: Settings, capacities: Sequence[Resources], documents: list[dict[str, Any]]
) -> None:
    """One request's worth of jobs, parsed and submitted as the API does (`jobs.submit_request`)."""
    pairs = [parse_one(document) for document in documents]

    async def live(_conn: driver.Executor) -> Sequence[Resources]:
        return capacities  # read once, as the API's one-second cache serves them

    await jobs.submit_request(
        engine,
        [spec for spec, _ in pairs],
        [digest for _, digest in pairs],
        lambda: datetime.now(UTC),
        settings.policy_config(),
        live,
    )


async def _measure(engine: AsyncEngine, settings: Settings, database_url: str, count: int, samples: int) -> RunResult:
    # A deployment's leader folds the depth and position deltas (submissions read them for
    # position_in_queue) and refreshes the statistics a burst leaves stale: the run goes on
    # beside those duties.
    folding = asyncio.create_task(_fold_as_the_leader_does(engine))
    try:
        return await _measure_beside_folding(engine, settings, database_url, count, samples)
    finally:
        folding.cancel()


async def _measure_beside_folding(
    engine: AsyncEngine, settings: Settings, database_url: str, count: int, samples: int
) -> RunResult:
    result = RunResult()
    # The API reads live capacities through a one-second cache; with no node yet, the default.
    async with engine.begin() as conn:
        capacities = await jobs.live_capacities(conn) or [settings.node_capacity()]
        synchronous_commit = (await conn.execute(sa.text("SHOW synchronous_commit"))).scalar_one()
    # What an acknowledged enqueue means here, beside a broker that may answer from memory.
    result.notes.append(f"an enqueue is acknowledged after its commit (synchronous_commit {synchronous_commit})")
    one = {"type": JOB_TYPE}

    async def one_by_one() -> None:
        for _ in range(count):
            await _submit(engine, settings, capacities, [one])

    result.enqueue_one_per_s = rate(count, await timed(one_by_one))

    counter = Counter()
    stamps = StartStamps()
    latency_mode = False

    async def noop(_job: JobContext) -> None:
        if latency_mode:
            stamps.stamp()
        else:
            counter.hit()

    registry = HandlerRegistry()
    registry.register(JOB_TYPE, noop)
    listener = EventListener(database_url)
    await listener.start()
    node = WorkerNode(engine, settings, listener, registry=registry, node_id="bench-ours")
    try:
        counter.expect(count)
        started = time.perf_counter()
        await node.start()
        async with asyncio.timeout(DRAIN_TIMEOUT_SECONDS):
            await _all_completed(engine, counter)
        result.drain_per_s = rate(count, time.perf_counter() - started)

        latency_mode = True
        result.latencies_ms = await sample_latencies(
            lambda _index: _submit(engine, settings, capacities, [one]), stamps.next, samples
        )
    finally:
        await node.stop(grace_seconds=5)
        await listener.stop()

    async def batches() -> None:
        for start in range(0, count, BATCH_SIZE):
            await _submit(engine, settings, capacities, [one] * min(BATCH_SIZE, count - start))

    result.enqueue_batch_per_s = rate(count, await timed(batches))
    return result


async def _fold_as_the_leader_does(engine: AsyncEngine) -> None:
    """The leader's upkeep of a deployment: folding every FOLD_INTERVAL_SECONDS, the
    VACUUM of what it folded every VACUUM_INTERVAL_SECONDS, statistics for the tables a
    burst changed every STATISTICS_INTERVAL_SECONDS, and the VACUUM of the tables the
    runs churned every CHURN_VACUUM_INTERVAL_SECONDS."""
    rounds, folded = 0, False
    while True:
        await asyncio.sleep(FOLD_INTERVAL_SECONDS)
        rounds += 1
        async with engine.begin() as conn:
            folded |= await insight.fold_queue_counters(conn)
        if folded and rounds % round(VACUUM_INTERVAL_SECONDS / FOLD_INTERVAL_SECONDS) == 0:
            async with autocommit(engine) as conn:
                await insight.vacuum_folded(conn)
            folded = False
        if rounds % round(STATISTICS_INTERVAL_SECONDS / FOLD_INTERVAL_SECONDS) == 0:
            async with engine.begin() as conn:
                await insight.refresh_statistics(conn)
        if rounds % round(CHURN_VACUUM_INTERVAL_SECONDS / FOLD_INTERVAL_SECONDS) == 0:
            async with autocommit(engine) as conn:
                await insight.vacuum_churned(conn)


async def _all_completed(engine: AsyncEngine, counter: Counter) -> None:
    """Every handler has run, then every completion is written."""
    await counter.reached.wait()
    while True:
        async with engine.connect() as conn:
            left = (await conn.execute(sa.text("SELECT count(*) FROM jobs WHERE status <> 'completed'"))).scalar_one()
        if left == 0:
            return
        await asyncio.sleep(DONE_POLL_SECONDS)
