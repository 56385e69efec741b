"""POST /jobs/batch: input order, references inside the batch, cycles named, all or nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from api_fixtures import Api, api_settings, assert_problem, job, running_api

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
