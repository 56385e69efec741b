"""Submissions racing each other and racing a completing dependency.

The API-level tests fire requests at once; the repository-level ones hold one
transaction open on purpose, so the race they test happens every time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from api_fixtures import Api, api_settings, job, running_api
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.core.model import DEFAULT_NODE_CAPACITY, AttemptOutcome
from queue_service.core.policy import PolicyConfig
from queue_service.core.validation import parse_job_spec
from queue_service.db import attempts, jobs
from queue_service.db.attempts import AttemptEnd

pytestmark = pytest.mark.integration

POLICY = PolicyConfig()
BLOCKED_SECONDS = 0.3  # long enough to see that a statement waits on a lock


@pytest.fixture
async def api(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url)) as api:
        yield api


async def test_ten_identical_posts_at_once_create_one_job(api: Api) -> None:
    body = job("send_email", payload={"to": "user@example.com"})
    headers = {"Idempotency-Key": "signup-7"}
    responses = await asyncio.gather(*(api.client.post("/jobs", json=body, headers=headers) for _ in range(10)))
    assert Counter(r.status_code for r in responses) == {201: 1, 200: 9}
    assert len({r.json()["job_id"] for r in responses}) == 1
    assert len((await api.client.get("/jobs")).json()["items"]) == 1


async def test_ten_posts_of_one_client_id_at_once_create_one_job(api: Api) -> None:
    responses = await asyncio.gather(*(api.client.post("/jobs", json=job(job_id="only_one")) for _ in range(10)))
    assert Counter(r.status_code for r in responses) == {201: 1, 200: 9}


async def test_one_key_with_different_bodies_at_once_creates_one_and_refuses_the_rest(api: Api) -> None:
    headers = {"Idempotency-Key": "contested"}
    responses = await asyncio.gather(
        *(api.client.post("/jobs", json=job(payload={"n": n}), headers=headers) for n in range(10))
    )
    assert Counter(r.status_code for r in responses) == {201: 1, 409: 9}
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"idempotency_key_reused"}


async def test_identical_large_batches_at_once_create_one_batch(api: Api) -> None:
    """Batches large enough to go in by COPY race as the statement's do: one is created,
    the others answer with its jobs."""
    members = [job(payload={"n": n}) for n in range(jobs.COPY_MIN_JOBS)]
    headers = {"Idempotency-Key": "nightly-export"}
    responses = await asyncio.gather(*(api.client.post("/jobs/batch", json=members, headers=headers) for _ in range(6)))
    assert Counter(r.status_code for r in responses) == {201: 1, 200: 5}
    assert len({tuple(m["job_id"] for m in r.json()["jobs"]) for r in responses}) == 1
    assert len((await api.client.get("/jobs", params={"limit": 500})).json()["items"]) == jobs.COPY_MIN_JOBS


def spec(**fields: Any) -> Any:
    return parse_job_spec({"type": "noop", **fields}, default_job_id=f"job_{uuid.uuid4().hex[:12]}")


async def test_a_submission_waiting_on_an_identical_one_answers_with_its_job(api: Api) -> None:
    engine = api.engine
    first, second = spec(idempotency_key="k"), spec(idempotency_key="k")  # two generated ids, one key
    now = datetime.now(UTC)
    async with engine.connect() as holder:
        transaction = await holder.begin()
        [created] = await jobs.submit(holder, [first], ["same"], now, POLICY, [DEFAULT_NODE_CAPACITY])
        assert created.created

        async def racer() -> list[jobs.Submitted]:
            async with engine.begin() as conn:
                return await jobs.submit(conn, [second], ["same"], now, POLICY, [DEFAULT_NODE_CAPACITY])

        task = asyncio.create_task(racer())
        await asyncio.sleep(BLOCKED_SECONDS)
        assert not task.done()  # its INSERT waits on our uncommitted row with the same key
        await transaction.commit()
        [replayed] = await asyncio.wait_for(task, 10)
    assert not replayed.created
    assert replayed.job["job_id"] == first.job_id


async def running_parent(engine: AsyncEngine, job_id: str) -> uuid.UUID:
    """A running job on node n1 with its attempt recorded, as a claim leaves it."""
    token = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, cpu_used, memory_used) "
                "VALUES ('n1', 8, 4096, 1, 128)"
            )
        )
        [_] = await jobs.submit(conn, [spec(job_id=job_id)], ["h"], datetime.now(UTC), POLICY, [DEFAULT_NODE_CAPACITY])
        await conn.execute(
            sa.text(
                "UPDATE jobs SET status = 'running', attempts = 1, started_at = now(), worker_id = 'n1', "
                "lease_token = :token, lease_expires_at = now() + interval '1 minute' WHERE job_id = :id"
            ),
            {"token": token, "id": job_id},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token) "
                "VALUES (:id, 1, 'n1', now(), :token)"
            ),
            {"token": token, "id": job_id},
        )
    return token


async def test_a_dependency_completing_during_submission_still_unblocks_the_new_job(api: Api) -> None:
    engine = api.engine
    token = await running_parent(engine, "parent")
    async with engine.connect() as holder:
        transaction = await holder.begin()
        [child] = await jobs.submit(
            holder,
            [spec(job_id="child", depends_on=["parent"])],
            ["c"],
            datetime.now(UTC),
            POLICY,
            [DEFAULT_NODE_CAPACITY],
        )
        assert child.job["status"] == "blocked"

        async def complete_parent() -> bool:
            async with engine.begin() as conn:
                end = AttemptEnd(AttemptOutcome.SUCCEEDED, result={"ok": True})
                return await attempts.end_attempt(conn, "parent", token, end, datetime.now(UTC), POLICY)

        task = asyncio.create_task(complete_parent())
        await asyncio.sleep(BLOCKED_SECONDS)
        assert not task.done()  # the completion waits for our share lock on the parent
        await transaction.commit()
        assert await asyncio.wait_for(task, 10)
    found = (await api.client.get("/jobs/child")).json()
    assert found["status"] == "ready"
    assert found["blocked_by"] == []
    assert [e["event"] for e in (await api.client.get("/jobs/child/logs")).json()["entries"]][-1] == "ready"
