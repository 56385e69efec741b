"""POST /jobs/batch: input order, references inside the batch, cycles named, all or nothing."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from api_fixtures import Api, api_settings, assert_problem, job, running_api

from queue_service.db import driver, jobs
from queue_service.db.engine import asyncpg_dsn
from queue_service.db.events import CHANNEL, notified_messages
from queue_service.settings import normalize_database_url

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url)) as api:
        yield api


async def count_jobs(api: Api) -> int:
    return len((await api.client.get("/jobs", params={"limit": 500})).json()["items"])


async def test_a_batch_answers_in_input_order_and_may_reference_itself_and_stored_jobs(api: Api) -> None:
    stored = (await api.client.post("/jobs", json=job(job_id="stored"))).json()
    response = await api.client.post(
        "/jobs/batch",
        json=[
            job(job_id="report", depends_on=["extract", "stored"]),  # a later member, and a stored job
            job(job_id="extract", priority="high"),
            job("send_email", depends_on=["report"]),
        ],
    )
    assert response.status_code == 201, response.text
    jobs = response.json()["jobs"]
    assert [j["job_id"] for j in jobs[:2]] == ["report", "extract"]
    assert [j["status"] for j in jobs] == ["blocked", "ready", "blocked"]
    assert jobs[1]["position_in_queue"] == 0
    assert stored["position_in_queue"] == 0
    assert all(set(j) == {"job_id", "status", "created_at", "priority", "position_in_queue"} for j in jobs)
    report = (await api.client.get("/jobs/report")).json()
    assert report["depends_on"] == ["extract", "stored"]
    assert report["blocked_by"] == ["extract", "stored"]


async def test_a_cycle_is_422_with_the_cycle_path(api: Api) -> None:
    response = await api.client.post(
        "/jobs/batch",
        json=[
            job(job_id="job_a", depends_on=["job_c"]),
            job(job_id="job_b", depends_on=["job_a"]),
            job(job_id="job_c", depends_on=["job_b"]),
            job(job_id="bystander"),
        ],
    )
    body = assert_problem(response, 422, "dependency_cycle")
    assert body["cycle"] == ["job_a", "job_c", "job_b", "job_a"]
    assert await count_jobs(api) == 0


async def test_all_or_nothing_when_one_member_is_refused(api: Api) -> None:
    good = job(job_id="good")
    for bad, status, code in (
        (job(depends_on=["ghost"]), 422, "unknown_dependency"),
        (job(resource_requirements={"cpu_units": 99}), 422, "unschedulable"),
        (job(payload={"x": "y" * 70_000}), 413, "payload_too_large"),
        (job(type=""), 422, "validation_error"),
    ):
        response = await api.client.post("/jobs/batch", json=[good, bad])
        assert_problem(response, status, code)
    assert await count_jobs(api) == 0


async def test_problems_of_every_member_are_reported_with_their_index(api: Api) -> None:
    response = await api.client.post("/jobs/batch", json=[job(priority="x"), "not a job", job(job_id="ok")])
    body = assert_problem(response, 422, "validation_error")
    assert [error["loc"] for error in body["errors"]] == [["body", 0, "priority"], ["body", 1]]


@pytest.mark.parametrize("body", [[], {"type": "x"}, None])
async def test_the_body_must_be_a_non_empty_array(api: Api, body: object) -> None:
    assert_problem(await api.client.post("/jobs/batch", json=body), 422, "validation_error")


async def test_duplicate_ids_in_one_batch_are_refused(api: Api) -> None:
    response = await api.client.post("/jobs/batch", json=[job(job_id="twin"), job(job_id="twin")])
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", 1, "job_id"]


async def test_a_replayed_batch_returns_the_originals_with_200(api: Api) -> None:
    members = [job(job_id="one"), job(job_id="two", depends_on=["one"]), job(payload={"n": 3})]
    first = await api.client.post("/jobs/batch", json=members, headers={"Idempotency-Key": "nightly-2026-01-01"})
    again = await api.client.post("/jobs/batch", json=members, headers={"Idempotency-Key": "nightly-2026-01-01"})
    assert first.status_code == 201
    assert again.status_code == 200
    assert first.json() == again.json()
    assert await count_jobs(api) == 3
    changed = [*members[:2], job(payload={"n": 4})]
    response = await api.client.post("/jobs/batch", json=changed, headers={"Idempotency-Key": "nightly-2026-01-01"})
    assert_problem(response, 409, "idempotency_key_reused")


async def test_a_batch_may_mix_replays_and_new_members(api: Api) -> None:
    await api.client.post("/jobs", json=job(job_id="base"))
    response = await api.client.post("/jobs/batch", json=[job(job_id="base"), job(job_id="next", depends_on=["base"])])
    assert response.status_code == 201
    assert [j["job_id"] for j in response.json()["jobs"]] == ["base", "next"]
    assert await count_jobs(api) == 2


async def test_a_thousand_job_batch(api: Api) -> None:
    members = [job(job_id=f"bulk_{i:04d}", priority=("low", "high")[i % 2]) for i in range(1000)]
    members += [job(job_id="fan_in", depends_on=[f"bulk_{i:04d}" for i in range(0, 1000, 10)])]
    response = await api.client.post("/jobs/batch", json=members)
    assert response.status_code == 201, response.text
    jobs = response.json()["jobs"]
    assert len(jobs) == 1001
    assert jobs[-1]["status"] == "blocked"
    positions = sorted(j["position_in_queue"] for j in jobs[:-1])
    assert positions == list(range(1000))
    assert jobs[1]["position_in_queue"] == 0  # the first high-priority member leads


async def test_payloads_come_back_as_sent_whatever_json_they_hold(api: Api) -> None:
    """Integers past 64 bits, exponents, escapes and text beyond ASCII in a payload all
    survive a batch, with each member's log."""
    payloads = [
        {"account": 2**70, "balance": -(2**65)},
        {"rate": 1e-7, "tiny": 5e-324, "zero": -0.0, "exact": 0.1},
        {"text": 'é \u2028 "quoted" \\ \t\n \u00ff 𝄞', "nested": [[], {}, [None, True, False]]},
    ]
    response = await api.client.post(
        "/jobs/batch", json=[job(job_id=f"odd-{i}", payload=payload) for i, payload in enumerate(payloads)]
    )
    assert response.status_code == 201, response.text
    for index, payload in enumerate(payloads):
        stored = (await api.client.get(f"/jobs/odd-{index}")).json()
        assert stored["payload"] == payload
        logs = (await api.client.get(f"/jobs/odd-{index}/logs")).json()["entries"]
        assert [entry["event"] for entry in logs] == ["submitted", "ready"]


async def test_a_large_batch_goes_in_by_copy_as_the_statement_would_write_it(
    api: Api, migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of COPY_MIN_JOBS jobs or more, none depending on another, is copied in:
    the same rows, log and announcements (in order, a wake-up last) as the statement
    writes for a smaller batch, and its jobs reach the queue's counters (the positions
    of a batch submitted after it count them)."""
    size = jobs.COPY_MIN_JOBS
    bodies = [
        job(
            payload={"n": i, "text": "ünïcode"},
            priority=("low", "high", "normal")[i % 3],
            resource_requirements={"cpu_units": 1 + i % 2, "memory_mb": 64 + i},
            retry_config={"max_attempts": 1 + i % 4, "jitter": 0.5},
            timeout_seconds=10 + i,
            idempotency_key=f"key-{i}",
        )
        for i in range(size)
    ]
    copies: list[str] = []
    copy_records = driver.copy_records

    async def counted(conn: driver.Executor, table: str, *args: Any) -> None:
        copies.append(table)
        await copy_records(conn, table, *args)

    monkeypatch.setattr(driver, "copy_records", counted)
    heard: list[dict[str, Any]] = []
    listening = await asyncpg.connect(asyncpg_dsn(normalize_database_url(migrated_url)))
    await listening.add_listener(CHANNEL, lambda *args: heard.extend(notified_messages(args[-1])))
    try:
        copied = await api.client.post(
            "/jobs/batch",
            json=[b | {"job_id": f"copied_{i:04d}", "idempotency_key": f"c-{i}"} for i, b in enumerate(bodies)],
        )
        monkeypatch.setattr(jobs, "COPY_MIN_JOBS", size + 1)  # the statement, for the same jobs
        inserted = await api.client.post(
            "/jobs/batch",
            json=[b | {"job_id": f"inserted_{i:04d}", "idempotency_key": f"i-{i}"} for i, b in enumerate(bodies)],
        )
        async with asyncio.timeout(10):
            while len(heard) < 2 * size + 2:
                await asyncio.sleep(0.01)
    finally:
        await listening.close()
    assert copied.status_code == inserted.status_code == 201, (copied.text, inserted.text)
    assert copies == ["jobs"]  # the first batch only

    def without_id(message: dict[str, Any]) -> dict[str, Any]:
        queued = {k: v for k, v in message.get("queue", {}).items() if k != "sort_key"}
        return {k: v for k, v in message.items() if k not in ("job_id", "at", "queue")} | {"queue": queued}

    assert [m["event"] for m in heard] == [*["job.updated"] * size, "dispatch.wake"] * 2
    assert [m["job_id"] for m in heard[:size]] == [f"copied_{i:04d}" for i in range(size)]
    assert [without_id(m) for m in heard[:size]] == [without_id(m) for m in heard[size + 1 : 2 * size + 1]]
    columns = (
        "type, priority, status, payload, cpu_units, memory_mb, max_attempts, backoff_multiplier, "
        "initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, attempts, counted_attempts, "
        "attempt_budget, unfinished_deps, created_at = ready_at AND created_at = updated_at, "
        "round(CAST(sort_key - extract(epoch FROM ready_at) AS numeric), 3)"
    )
    async with api.engine.connect() as conn:
        rows = {
            prefix: (
                await conn.execute(
                    sa.text(f"SELECT {columns} FROM jobs WHERE job_id LIKE :prefix ORDER BY job_id"),
                    {"prefix": f"{prefix}_%"},
                )
            ).all()
            for prefix in ("copied", "inserted")
        }
        in_queue_order = (
            (await conn.execute(sa.text("SELECT job_id FROM jobs WHERE status = 'ready' ORDER BY sort_key, job_id")))
            .scalars()
            .all()
        )
    assert len(rows["copied"]) == size
    assert rows["copied"] == rows["inserted"]
    copied_order = [job_id for job_id in in_queue_order if job_id.startswith("copied_")]
    assert {m["job_id"]: m["position_in_queue"] for m in copied.json()["jobs"]} == {
        job_id: place for place, job_id in enumerate(copied_order)
    }
    assert {m["job_id"]: m["position_in_queue"] for m in inserted.json()["jobs"]} == {
        job_id: place for place, job_id in enumerate(in_queue_order) if job_id.startswith("inserted_")
    }
    logs = [(await api.client.get(f"/jobs/{prefix}_0007/logs")).json()["entries"] for prefix in ("copied", "inserted")]
    assert [{k: v for k, v in e.items() if k != "at"} for e in logs[0]] == [
        {k: v for k, v in e.items() if k != "at"} for e in logs[1]
    ]


async def test_a_large_batch_repeating_a_stored_id_or_key_replays_or_conflicts(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copied in, a batch still answers a replay with the originals, refuses a stored id
    sent with another body (writing none of its other members), and draws again an id
    drawn for it that a stored job has."""
    size = jobs.COPY_MIN_JOBS
    members = [job(job_id=f"big_{i:04d}", payload={"n": i}) for i in range(size)]
    first = await api.client.post("/jobs/batch", json=members, headers={"Idempotency-Key": "nightly"})
    again = await api.client.post("/jobs/batch", json=members, headers={"Idempotency-Key": "nightly"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json()
    clash = [job(job_id=f"new_{i:04d}") for i in range(size - 1)] + [job(job_id="big_0000", payload={"n": -1})]
    assert_problem(await api.client.post("/jobs/batch", json=clash), 409, "job_id_conflict")
    assert await count_jobs(api) == size

    taken = (await api.client.post("/jobs", json=job())).json()["job_id"].removeprefix("job_")
    draws = itertools.chain([taken], (f"{n:012x}" for n in itertools.count(1)))
    monkeypatch.setattr("queue_service.db.jobs.secrets.token_hex", lambda _bytes: next(draws))
    drawn = await api.client.post("/jobs/batch", json=[job() for _ in range(size)])
    assert drawn.status_code == 201, drawn.text
    ids = [m["job_id"] for m in drawn.json()["jobs"]]
    assert f"job_{taken}" not in ids
    assert len(set(ids)) == size
    assert await count_jobs(api) == 2 * size + 1
