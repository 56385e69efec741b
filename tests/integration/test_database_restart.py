"""PostgreSQL stopped and started again under load: the service answers 503 while the
database is away, comes back by itself, and every accepted job still completes.

The test owns its server (an embedded PostgreSQL in a folder of its own, reached
through a Unix socket there), so stopping it disturbs nothing else.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from api_fixtures import BASE_URL, PROBLEM_JSON, api_settings
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from queue_service.api.app import create_app
from queue_service.db import migrate
from queue_service.db.embedded import EmbeddedPostgres, start_embedded
from queue_service.settings import normalize_database_url

pytestmark = pytest.mark.integration

JOBS_BEFORE, JOBS_AFTER = 120, 40
WORK_SECONDS = 0.2  # long enough that the outage finds jobs running, queued and being recorded


@pytest.fixture
async def own_server() -> AsyncIterator[tuple[Path, list[EmbeddedPostgres]]]:
    with tempfile.TemporaryDirectory(prefix="tq-restart-") as folder:
        servers = [await asyncio.to_thread(start_embedded, folder)]
        try:
            yield Path(folder), servers
        finally:
            await asyncio.to_thread(servers[-1].stop)


def job(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "type": "restart_test", "payload": {"simulate": {"duration_seconds": WORK_SECONDS}}}


async def test_a_database_restart_mid_load_loses_nothing(own_server: tuple[Path, list[EmbeddedPostgres]]) -> None:
    folder, servers = own_server
    url = servers[0].url
    await migrate.upgrade(url)
    settings = api_settings(
        url, poll_interval_seconds=0.2, lease_seconds=3.0, heartbeat_interval_seconds=1.0, node_id="restart-node"
    )
    app = create_app(settings, run_worker=True)
    accepted: list[str] = []
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL, timeout=30) as client,
    ):
        for i in range(JOBS_BEFORE):
            response = await client.post("/jobs", json=job(f"before-{i}"))
            assert response.status_code == 201, response.text
            accepted.append(f"before-{i}")

        await asyncio.to_thread(servers[0].stop)  # mid-load: jobs running, queued, being recorded
        for method, path, body in (
            ("GET", "/ready", None),
            ("GET", "/jobs/before-0", None),
            ("POST", "/jobs", job("x")),
        ):
            response = await client.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["content-type"].startswith(PROBLEM_JSON)
        await asyncio.sleep(1.0)  # the loops meet the outage too

        servers.append(await asyncio.to_thread(start_embedded, folder))
        assert servers[-1].url == url
        async with asyncio.timeout(30):  # back by itself: no restart of the service
            while (await client.get("/ready")).status_code != 200:
                await asyncio.sleep(0.2)
        for i in range(JOBS_AFTER):
            response = await client.post("/jobs", json=job(f"after-{i}"))
            assert response.status_code == 201, response.text
            accepted.append(f"after-{i}")

        deadline = time.monotonic() + 90  # the reaper returns attempts whose end could not be written
        while True:
            statuses = {job_id: (await client.get(f"/jobs/{job_id}")).json()["status"] for job_id in accepted}
            unfinished = {job_id: status for job_id, status in statuses.items() if status != "completed"}
            if not unfinished:
                break
            assert not {"failed", "cancelled"} & set(unfinished.values()), unfinished
            assert time.monotonic() < deadline, f"still unfinished after 90 s: {unfinished}"
            await asyncio.sleep(0.5)

    engine = create_async_engine(normalize_database_url(url), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            total = (await conn.execute(sa.text("SELECT count(*) FROM jobs"))).scalar_one()
            # At most one attempt of a job at a time: each ends before the next one starts.
            overlapping = (
                await conn.execute(
                    sa.text(
                        "SELECT count(*) FROM job_attempts a JOIN job_attempts b"
                        " ON a.job_id = b.job_id AND b.attempt = a.attempt + 1"
                        " WHERE a.ended_at IS NULL OR a.ended_at > b.started_at"
                    )
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert total == len(accepted) == JOBS_BEFORE + JOBS_AFTER
    assert overlapping == 0
