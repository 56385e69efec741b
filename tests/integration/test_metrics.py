"""`GET /metrics`: the exposition parses with prometheus-client's own parser, the
values move as jobs run, and a scrape stays fast with a million jobs stored."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from api_fixtures import BASE_URL, api_settings
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.api.app import create_app
from queue_service.db import insight
from queue_service.db.engine import create_engine

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@asynccontextmanager
async def service(
    url: str, *, run_worker: bool = True, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncEngine]]:
    """The app (with a worker node unless `run_worker` is false), its lifespan running, and a client on it."""
    settings = api_settings(url, poll_interval_seconds=0.2, node_id="metrics-node", **overrides)
    # Reset before the app starts: a TRUNCATE beside a running worker and leader would
    # wait on their transactions for as long as they keep them open.
    cleaner = create_engine(settings)
    try:
        async with cleaner.begin() as conn:
            await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
            await conn.execute(sa.text("UPDATE dispatch_control SET paused = false"))
    finally:
        await cleaner.dispose()
    app = create_app(settings, run_worker=run_worker)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as client:
            yield client, app.state.runtime.engine


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_terminal(client: httpx.AsyncClient, job_ids: list[str], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            statuses = [(await client.get(f"/jobs/{job_id}")).json()["status"] for job_id in job_ids]
            if all(s in ("completed", "failed", "cancelled") for s in statuses):
                return
            await asyncio.sleep(0.1)


def job(job_id: str, job_type: str, **fields: Any) -> dict[str, Any]:
    return {"job_id": job_id, "type": job_type, **fields}


async def test_values_move_as_jobs_run(migrated_url: str) -> None:
    async with service(migrated_url) as (client, _):
        before = await scrape(client)
        assert value(before, "taskqueue_database_up") == 1
        assert value(before, "taskqueue_node_cpu_capacity_units", node="metrics-node") == 8
        assert value(before, "taskqueue_db_pool_size") == 12
        no_retry = {"max_attempts": 1}
        bodies = [
            job("ok", "email", priority="high", payload={"simulate": {"duration_seconds": 0.05}}),
            job(
                "flaky",
                "report",
                payload={"simulate": {"duration_seconds": 0.01, "fail_attempts": 1}},
                retry_config={"initial_delay_seconds": 0},
            ),
            job(
                "slow",
                "export",
                payload={"simulate": {"duration_seconds": 5}},
                timeout_seconds=0.2,
                retry_config=no_retry,
            ),
        ]
        for body in bodies:
            assert (await client.post("/jobs", json=body)).status_code == 201
        await wait_terminal(client, ["ok", "flaky", "slow"])
        await asyncio.sleep(0.3)  # the last announcements reach the listener
        after = await scrape(client)
    assert value(after, "taskqueue_jobs_submitted_total", type="email", priority="high") == 1
    assert value(after, "taskqueue_jobs_finished_total", type="email", priority="high", status="completed") == 1
    assert value(after, "taskqueue_jobs_finished_total", type="report", priority="normal", status="completed") == 1
    assert value(after, "taskqueue_jobs_finished_total", type="export", priority="normal", status="failed") == 1
    assert value(after, "taskqueue_job_retries_total", type="report", priority="normal") == 1
    assert value(after, "taskqueue_attempt_timeouts_total", type="export", priority="normal") == 1
    assert value(after, "taskqueue_attempts_total", type="report", priority="normal", outcome="failed") == 1
    assert value(after, "taskqueue_job_run_seconds_count", type="email", priority="high") == 1
    assert value(after, "taskqueue_dispatch_seconds_count") >= 3
    assert value(after, "taskqueue_jobs_dispatched_total", node="metrics-node", backfilled="false") == 4
    assert value(after, "taskqueue_queue_depth", status="completed", priority="high") == 1
    assert value(after, "taskqueue_queue_depth", status="completed", priority="normal") == 1
    assert value(after, "taskqueue_queue_depth", status="failed", priority="normal") == 1
    assert value(after, "taskqueue_queue_depth", status="ready", priority="normal") == 0
    assert value(after, "taskqueue_node_cpu_used_units", node="metrics-node") == 0
    # The submissions and the idle node's starts ran on the driver pool, which keeps what it opened.
    assert value(after, "taskqueue_db_driver_pool_open") >= 1


async def test_metrics_need_the_api_key(migrated_url: str) -> None:
    async with service(migrated_url, api_keys=("k1",)) as (client, _):
        assert (await client.get("/metrics")).status_code == 401
        ok = await client.get("/metrics", headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200


async def test_folding_keeps_depth_and_shortens_the_counters(migrated_url: str, seed: Any) -> None:
    # No worker: its dispatch, reaper and own periodic fold would move the depths
    # (and the rows) between the two scrapes.
    async with service(migrated_url, run_worker=False) as (client, engine):
        async with engine.begin() as conn:
            for first in range(1, 3001, 10):  # 300 statements: hundreds of delta rows
                await seed(conn, 10, first)
        before = await scrape(client)
        async with engine.begin() as conn:
            assert await insight.fold_queue_counters(conn)
        after = await scrape(client)
    assert value(before, "taskqueue_queue_counter_rows") > 28
    assert value(after, "taskqueue_queue_counter_rows") <= 28  # one row per (status, priority)
    depths = {key: sample for key, sample in before.items() if key[0] == "taskqueue_queue_depth"}
    assert depths
    assert all(after[key] == sample for key, sample in depths.items())


async def test_folding_only_when_worth_it(engine: AsyncEngine, seed: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, queue_counters"))
        await seed(conn, 10)
        assert not await insight.fold_queue_counters(conn)  # a few rows: not worth a write
        for first in range(11, 3011, 10):
            await seed(conn, 10, first)
        assert await insight.fold_queue_counters(conn)
        depths, rows = await insight.queue_depth(conn)
    assert rows == len(depths)
    assert sum(d.jobs for d in depths) == 3010


@pytest.mark.benchmark
async def test_metrics_answer_fast_with_a_million_jobs(migrated_url: str, seed: Any, request: Any) -> None:
    if "benchmark" not in request.config.getoption("markexpr", ""):
        pytest.skip("a benchmark (seeds a million jobs): select with -m benchmark")
    async with service(migrated_url) as (client, engine):
        async with engine.begin() as conn:
            await seed(conn, 1_000_000)
            await conn.execute(sa.text("ANALYZE jobs"))
        await scrape(client)  # warm the pool and the caches
        timings = []
        for _ in range(50):
            started = time.perf_counter()
            samples = await scrape(client)
            timings.append(time.perf_counter() - started)
    assert sum(v for (name, _), v in samples.items() if name == "taskqueue_queue_depth") == 1_000_000
    median, worst = statistics.median(timings), max(timings)
    print(f"\n/metrics with 1,000,000 jobs: median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms over 50 scrapes")
    assert median < 0.050
