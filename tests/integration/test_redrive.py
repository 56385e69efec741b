"""Dead-letter re-drive (SPEC §4, §10) through the API, with a worker node running
in-process: a failed job comes back with max_attempts more attempts, numbered on,
and the descendants its failure ended come back blocked and then run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from api_fixtures import BASE_URL, api_settings, assert_problem, job

from queue_service.api.app import create_app
from queue_service.db.engine import create_engine
from queue_service.settings import Settings

pytestmark = pytest.mark.integration


@asynccontextmanager
async def serving(url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API and one worker node in this process (`taskqueue serve` without HTTP)."""
    settings = api_settings(url, poll_interval_seconds=0.1, node_id="redrive-node")
    app = create_app(settings, run_worker=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            yield client


@pytest.fixture
async def client(migrated_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(migrated_url) as client:
        yield client


async def wait_status(client: httpx.AsyncClient, job_id: str, status: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = (await client.get(f"/jobs/{job_id}")).json()
        if found["status"] == status:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} is {found.get('status')}, waited for {status}")


def failing(job_id: str, fail_attempts: int, **fields: Any) -> dict[str, Any]:
    return job(
        "flaky",
        job_id=job_id,
        payload={"simulate": {"duration_seconds": 0, "fail_attempts": fail_attempts}},
        retry_config={"max_attempts": 1, "initial_delay_seconds": 0},
        **fields,
    )


async def test_redrive_returns_the_job_and_its_descendants_and_they_run(client: httpx.AsyncClient) -> None:
    batch = [
        failing("r1_root", 1),
        job(job_id="r1_child", depends_on=["r1_root"]),
        job(job_id="r1_grandchild", depends_on=["r1_child"]),
    ]
    assert (await client.post("/jobs/batch", json=batch)).status_code == 201
    root = await wait_status(client, "r1_root", "failed")
    assert root["failure_reason"] == "max_attempts_exhausted"
    child = await wait_status(client, "r1_child", "failed")
    assert child["failure_reason"] == "dependency_failed"
    dead = (await client.get("/dead-letter", params={"type": "flaky"})).json()["items"]
    assert [j["job_id"] for j in dead] == ["r1_root"]

    assert (await client.post("/dispatch/pause")).status_code == 200  # hold still, to see where each went
    response = await client.post("/jobs/r1_root/retry")
    assert response.status_code == 200, response.text
    redriven = response.json()
    assert redriven["status"] == "ready"
    assert (redriven["failure_reason"], redriven["last_error"], redriven["finished_at"]) == (None, None, None)
    for job_id, waiting_for in (("r1_child", ["r1_root"]), ("r1_grandchild", ["r1_child"])):
        back = (await client.get(f"/jobs/{job_id}")).json()
        assert (back["status"], back["blocked_by"], back["failure_reason"], back["last_error"]) == (
            "blocked",
            waiting_for,
            None,
            None,
        )
    await client.post("/dispatch/resume")
    assert (await wait_status(client, "r1_grandchild", "completed"))["attempts"] == 1
    root = await wait_status(client, "r1_root", "completed")
    assert root["attempts"] == 2  # numbered on: attempt 1 failed, attempt 2 after the re-drive
    events = [e["event"] for e in (await client.get("/jobs/r1_root/logs")).json()["entries"]]
    assert events.count("redriven") == 1
    assert events.index("failed") < events.index("redriven") < events.index("succeeded")
    child_events = [e["event"] for e in (await client.get("/jobs/r1_child/logs")).json()["entries"]]
    assert "dependency_failed" in child_events
    assert child_events.index("dependency_failed") < child_events.index("redriven")


async def test_each_redrive_grants_max_attempts_more(client: httpx.AsyncClient) -> None:
    await client.post("/jobs", json=failing("r2", 2))
    await wait_status(client, "r2", "failed")
    assert (await client.post("/jobs/r2/retry")).status_code == 200
    again = await wait_status(client, "r2", "failed")  # attempt 2 fails too: one more attempt was granted
    assert again["attempts"] == 2
    assert (await client.post("/jobs/r2/retry")).status_code == 200
    done = await wait_status(client, "r2", "completed")
    assert done["attempts"] == 3


async def test_only_a_failed_job_can_be_redriven(client: httpx.AsyncClient) -> None:
    await client.post("/jobs", json=job(job_id="r3_ok"))
    await wait_status(client, "r3_ok", "completed")
    body = assert_problem(await client.post("/jobs/r3_ok/retry"), 409, "job_not_failed")
    assert "completed" in body["detail"]
    assert_problem(await client.post("/jobs/r3_missing/retry"), 404, "job_not_found")


async def test_a_descendant_with_another_dead_parent_stays_failed(client: httpx.AsyncClient) -> None:
    batch = [
        failing("r4_a", 1),
        failing("r4_b", 5),
        job(job_id="r4_both", depends_on=["r4_a", "r4_b"]),
        job(job_id="r4_only_a", depends_on=["r4_a"]),
    ]
    await client.post("/jobs/batch", json=batch)
    for job_id in ("r4_a", "r4_b", "r4_both", "r4_only_a"):
        await wait_status(client, job_id, "failed")
    await client.post("/dispatch/pause")
    assert (await client.post("/jobs/r4_a/retry")).status_code == 200
    assert (await client.get("/jobs/r4_only_a")).json()["status"] == "blocked"
    assert (await client.get("/jobs/r4_both")).json()["status"] == "failed"  # r4_b is still dead
    await client.post("/dispatch/resume")
    await wait_status(client, "r4_only_a", "completed")


async def test_bulk_redrive_by_filter(client: httpx.AsyncClient) -> None:
    await client.post(
        "/jobs/batch",
        json=[failing("r5_x1", 1), failing("r5_x2", 1), {**failing("r5_y", 1), "type": "other_flaky"}],
    )
    for job_id in ("r5_x1", "r5_x2", "r5_y"):
        await wait_status(client, job_id, "failed")
    listed = (await client.get("/dead-letter", params={"failure_reason": "max_attempts_exhausted"})).json()
    assert {"r5_x1", "r5_x2", "r5_y"} <= {j["job_id"] for j in listed["items"]}
    response = await client.post("/dead-letter/retry", json={"type": "other_flaky"})
    assert response.status_code == 200, response.text
    assert [r["job_id"] for r in response.json()["redriven"]] == ["r5_y"]
    await wait_status(client, "r5_y", "completed")
    assert (await client.get("/jobs/r5_x1")).json()["status"] == "failed"
    response = await client.post("/dead-letter/retry", json={"type": "flaky", "limit": 10})
    assert {r["job_id"] for r in response.json()["redriven"]} >= {"r5_x1", "r5_x2"}
    await wait_status(client, "r5_x1", "completed")
    assert_problem(await client.post("/dead-letter/retry", json={"limit": 0}), 422, "validation_error")


async def test_counters_follow_a_redrive(client: httpx.AsyncClient, migrated_url: str) -> None:
    """The queue-depth counters (kept by trigger) agree with the table after re-drives."""
    engine = create_engine(Settings(database_url=migrated_url, db_pool_size=1, db_max_overflow=0))
    try:
        async with engine.begin() as conn:
            counted: dict[str, int] = dict(
                (await conn.execute(sa.text("SELECT status, sum(delta) FROM queue_counters GROUP BY status"))).all()
            )
            actual: dict[str, int] = dict(
                (await conn.execute(sa.text("SELECT status, count(*) FROM jobs GROUP BY status"))).all()
            )
    finally:
        await engine.dispose()
    assert {k: v for k, v in counted.items() if v} == actual
