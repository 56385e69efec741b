"""POST /jobs, GET /jobs/{id}, PATCH /jobs/{id}/cancel, GET /jobs/{id}/logs against a
real database: the documented answers and every error code of SPEC §4."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from api_fixtures import Api, add_node, api_settings, assert_problem, job, running_api, set_status

pytestmark = pytest.mark.integration

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
async def api(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url)) as api:
        yield api


async def submit(api: Api, body: Any, **headers: str) -> dict[str, Any]:
    response = await api.client.post("/jobs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_case_study_submission_answers_the_documented_fields(api: Api) -> None:
    parent = await submit(api, job("generate_report", job_id="report_1"))
    response = await api.client.post(
        "/jobs",
        json={
            "type": "send_email",
            "priority": "high",
            "payload": {"to": "user@example.com"},
            "resource_requirements": {"cpu_units": 2, "memory_mb": 512},
            "depends_on": [parent["job_id"]],
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"job_id", "status", "created_at", "priority", "position_in_queue"}
    assert re.fullmatch(r"job_[0-9a-f]{12}", body["job_id"])
    assert body["status"] == "blocked"
    assert body["priority"] == "high"
    assert body["position_in_queue"] is None
    assert ISO_Z.match(body["created_at"])
    assert response.headers["location"] == f"/jobs/{body['job_id']}"
    assert parent == {
        "job_id": "report_1",
        "status": "ready",
        "created_at": parent["created_at"],
        "priority": "normal",
        "position_in_queue": 0,
    }


async def test_get_job_returns_every_field_of_the_job_model(api: Api) -> None:
    await submit(api, job(job_id="parent"))
    await submit(
        api,
        job(
            "send_email",
            job_id="child",
            priority="critical",
            payload={"to": "a@b.c", "nested": {"n": [1, 2.5, None, True]}},
            resource_requirements={"cpu_units": 3, "memory_mb": 700},
            depends_on=["parent"],
            retry_config={"max_attempts": 5, "backoff_multiplier": 3, "initial_delay_seconds": 2, "jitter": 0.5},
            timeout_seconds=12.5,
            idempotency_key="key-child",
        ),
    )
    response = await api.client.get("/jobs/child")
    assert response.status_code == 200
    found = response.json()
    timestamps = {"created_at", "updated_at", "ready_at", "started_at", "finished_at", "next_attempt_at"}
    assert ISO_Z.match(found.pop("created_at"))
    assert ISO_Z.match(found.pop("updated_at"))
    assert found == {
        "job_id": "child",
        "type": "send_email",
        "priority": "critical",
        "status": "blocked",
        "payload": {"to": "a@b.c", "nested": {"n": [1, 2.5, None, True]}},
        "resource_requirements": {"cpu_units": 3, "memory_mb": 700},
        "depends_on": ["parent"],
        "blocked_by": ["parent"],
        "retry_config": {
            "max_attempts": 5,
            "backoff_multiplier": 3.0,
            "initial_delay_seconds": 2.0,
            "max_delay_seconds": 300.0,
            "jitter": 0.5,
        },
        "timeout_seconds": 12.5,
        "idempotency_key": "key-child",
        "attempts": 0,
        "position_in_queue": None,
        "worker_id": None,
        "last_error": None,
        "failure_reason": None,
        "cancel_reason": None,
        "result": None,
        "aging": None,  # only a ready job has it
        **{name: None for name in timestamps - {"created_at", "updated_at"}},
    }


async def test_position_in_queue_follows_priority_then_submission_order(api: Api) -> None:
    for name, priority in (("low_1", "low"), ("normal_1", "normal"), ("critical_1", "critical"), ("high_1", "high")):
        await submit(api, job(job_id=name, priority=priority))
    assert (await api.client.get("/jobs/low_1")).json()["position_in_queue"] == 3
    listed = (await api.client.get("/jobs", params={"status": "ready"})).json()["items"]
    positions = {item["job_id"]: item["position_in_queue"] for item in listed}
    assert positions == {"critical_1": 0, "high_1": 1, "normal_1": 2, "low_1": 3}


async def test_a_dependency_already_completed_is_satisfied(api: Api) -> None:
    await submit(api, job(job_id="done"))
    await set_status(api.engine, "done", "completed")
    body = await submit(api, job(job_id="after", depends_on=["done"]))
    assert body["status"] == "ready"
    assert (await api.client.get("/jobs/after")).json()["blocked_by"] == []


async def test_unknown_dependencies_are_listed(api: Api) -> None:
    await submit(api, job(job_id="exists"))
    response = await api.client.post("/jobs", json=job(depends_on=["exists", "ghost_1", "ghost_2"]))
    body = assert_problem(response, 422, "unknown_dependency")
    assert body["missing"] == ["ghost_1", "ghost_2"]


@pytest.mark.parametrize(("status", "reason"), [("failed", "failure_reason"), ("cancelled", "cancel_reason")])
async def test_a_dependency_that_can_never_complete_is_not_viable(api: Api, status: str, reason: str) -> None:
    await submit(api, job(job_id="doomed"))
    await set_status(api.engine, "doomed", status, **{reason: "user" if status == "cancelled" else "permanent_error"})
    response = await api.client.post("/jobs", json=job(depends_on=["doomed"]))
    body = assert_problem(response, 422, "dependency_not_viable")
    assert body["dependencies"] == [{"job_id": "doomed", "status": status}]


async def test_unschedulable_against_the_configured_default_when_no_node_is_live(api: Api) -> None:
    response = await api.client.post("/jobs", json=job(resource_requirements={"cpu_units": 9, "memory_mb": 128}))
    body = assert_problem(response, 422, "unschedulable")
    assert "8 CPU / 4096 MB" in body["detail"]
    fits = await api.client.post("/jobs", json=job(resource_requirements={"cpu_units": 8, "memory_mb": 4096}))
    assert fits.status_code == 201


async def test_unschedulable_against_the_live_nodes_one_at_a_time(api: Api) -> None:
    await add_node(api.engine, "wide", cpu=16, memory=1024)
    await add_node(api.engine, "deep", cpu=2, memory=32768)
    await add_node(api.engine, "huge_but_stopped", cpu=64, memory=65536, status="stopped")
    assert (
        await api.client.post("/jobs", json=job(resource_requirements={"cpu_units": 16, "memory_mb": 1024}))
    ).is_success
    assert (
        await api.client.post("/jobs", json=job(resource_requirements={"cpu_units": 2, "memory_mb": 32768}))
    ).is_success
    # Each dimension fits some node, but no single node holds both.
    response = await api.client.post("/jobs", json=job(resource_requirements={"cpu_units": 16, "memory_mb": 32768}))
    assert_problem(response, 422, "unschedulable")


async def test_validation_reports_every_problem_with_its_location(api: Api) -> None:
    response = await api.client.post(
        "/jobs",
        json={
            "type": "",
            "priority": "urgent",
            "resource_requirements": {"cpu_units": 0, "gpu": 1},
            "retry_config": {"max_attempts": 0, "jitter": 2},
            "timeout_seconds": 0,
            "depends_on": ["a", "a"],
            "colour": "red",
        },
    )
    body = assert_problem(response, 422, "validation_error")
    locations = {tuple(error["loc"]) for error in body["errors"]}
    assert {
        ("body", "colour"),
        ("body", "type"),
        ("body", "priority"),
        ("body", "resource_requirements", "cpu_units"),
        ("body", "resource_requirements", "gpu"),
        ("body", "retry_config", "max_attempts"),
        ("body", "retry_config", "jitter"),
        ("body", "timeout_seconds"),
        ("body", "depends_on"),
    } <= locations
    assert all(isinstance(error["msg"], str) and error["msg"] for error in body["errors"])


@pytest.mark.parametrize(
    ("raw", "location"),
    [
        (b"{not json", ["body"]),
        (b"[1, 2]", ["body"]),
        (b'"a string"', ["body"]),
        (b'{"type": "x", "payload": {"v": NaN}}', ["body"]),
        (b'{"type": "x", "payload": {"v": 1e999}}', ["body"]),
        (b'{"type": "x\\u0000y"}', ["body", "type"]),
        (b'{"type": "x", "payload": {"k": "\\ud800"}}', ["body", "payload", "k"]),
        (b'{"type": "x", "retry_config": {"max_attempts": 99999999999}}', ["body", "retry_config", "max_attempts"]),
        (b'{"type": "x", "payload": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}", None),
        (b'{"type": "x", "job_id": "has space"}', ["body", "job_id"]),
    ],
)
async def test_malformed_bodies_are_422_never_500(api: Api, raw: bytes, location: list[Any] | None) -> None:
    response = await api.client.post("/jobs", content=raw, headers={"content-type": "application/json"})
    body = assert_problem(response, 422, "validation_error")
    if location is not None:
        assert location in [error["loc"] for error in body["errors"]], body


async def test_a_payload_over_64_kib_is_413(api: Api) -> None:
    response = await api.client.post("/jobs", json=job(payload={"blob": "x" * (64 * 1024)}))
    assert_problem(response, 413, "payload_too_large")
    just_fits = {"blob": "x" * (64 * 1024 - len('{"blob":""}'))}
    assert (await api.client.post("/jobs", json=job(payload=just_fits))).status_code == 201


async def test_a_huge_body_is_refused_before_it_is_parsed(api: Api) -> None:
    response = await api.client.post("/jobs", content=b"[" + b"1," * (9 * 1024 * 1024) + b"1]")
    assert_problem(response, 413, "payload_too_large")


async def test_same_idempotency_key_and_body_replays_the_original(api: Api) -> None:
    body = job("send_email", payload={"to": "x@y.z"})
    first = await api.client.post("/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    again = await api.client.post("/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    # The same request spelled with its defaults, and the key in the body, is still the same request.
    spelled_out = await api.client.post("/jobs", json=body | {"priority": "normal", "idempotency_key": "order-42"})
    assert first.status_code == 201
    assert again.status_code == 200
    assert spelled_out.status_code == 200
    assert first.json() == again.json() == spelled_out.json()
    listed = (await api.client.get("/jobs")).json()["items"]
    assert [item["job_id"] for item in listed] == [first.json()["job_id"]]


async def test_same_idempotency_key_with_another_body_is_409(api: Api) -> None:
    await api.client.post("/jobs", json=job("a"), headers={"Idempotency-Key": "k1"})
    response = await api.client.post("/jobs", json=job("b"), headers={"Idempotency-Key": "k1"})
    body = assert_problem(response, 409, "idempotency_key_reused")
    assert body["idempotency_key"] == "k1"


async def test_same_client_job_id_replays_or_conflicts(api: Api) -> None:
    first = await api.client.post("/jobs", json=job(job_id="mine", payload={"n": 1}))
    replay = await api.client.post("/jobs", json=job(job_id="mine", payload={"n": 1}))
    conflict = await api.client.post("/jobs", json=job(job_id="mine", payload={"n": 2}))
    assert first.status_code == 201
    assert replay.status_code == 200
    assert replay.json() == first.json()
    assert assert_problem(conflict, 409, "job_id_conflict")["job_id"] == "mine"


async def test_a_replay_is_answered_whatever_became_of_its_dependency_and_node_since(api: Api) -> None:
    """A replay returns the original even when the request could not be accepted today:
    its dependency has been cancelled (the job with it), the node it needed is gone."""
    await submit(api, job(job_id="parent"))
    child = job(job_id="child", depends_on=["parent"])
    keyed_batch = [job(depends_on=["parent"]), job()]
    first_child = await submit(api, child)
    first_batch = await api.client.post("/jobs/batch", json=keyed_batch, headers={"Idempotency-Key": "b-1"})
    await add_node(api.engine, "big", cpu=32, memory=65536)
    api.runtime.capacities.read_at = -math.inf  # the API rereads live nodes at most once a second
    big = job(resource_requirements={"cpu_units": 32, "memory_mb": 1024})
    first_big = await api.client.post("/jobs", json=big, headers={"Idempotency-Key": "big-1"})
    assert first_batch.status_code == first_big.status_code == 201, (first_batch.text, first_big.text)
    assert (await api.client.patch("/jobs/parent/cancel")).status_code == 200
    async with api.engine.begin() as conn:
        await conn.execute(sa.text("DELETE FROM nodes WHERE node_id = 'big'"))
    api.runtime.capacities.read_at = -math.inf

    child_again = await api.client.post("/jobs", json=child)
    batch_again = await api.client.post("/jobs/batch", json=keyed_batch, headers={"Idempotency-Key": "b-1"})
    big_again = await api.client.post("/jobs", json=big, headers={"Idempotency-Key": "big-1"})
    assert (child_again.status_code, batch_again.status_code, big_again.status_code) == (200, 200, 200)
    assert child_again.json()["job_id"] == first_child["job_id"]
    assert child_again.json()["status"] == "cancelled"
    assert [m["job_id"] for m in batch_again.json()["jobs"]] == [m["job_id"] for m in first_batch.json()["jobs"]]
    assert big_again.json()["job_id"] == first_big.json()["job_id"]
    # Not replays, the same requests are refused as any new one would be.
    assert_problem(await api.client.post("/jobs", json=child | {"job_id": "child_2"}), 422, "dependency_not_viable")
    assert_problem(await api.client.post("/jobs", json=big), 422, "unschedulable")


async def test_a_generated_id_already_taken_is_drawn_again_never_a_replay(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generated ids are random, so two can coincide (48 bits: about once in 600
    submissions of a million). The id is ours, not the client's: a second identical body
    that drew a taken id is a new job under a fresh id, never a replay of the first
    (that would lose it) nor a 409; nor are two members of one batch that drew the same."""
    draws = iter(["5eed5eed5eed", "5eed5eed5eed", "0123456789ab", "c0ffeec0ffee", "c0ffeec0ffee", "d00dd00dd00d"])
    monkeypatch.setattr("queue_service.db.jobs.secrets.token_hex", lambda _bytes: next(draws))
    first = await submit(api, job("send_email"))
    second = await submit(api, job("send_email"))  # the same body, and the same draw
    assert (first["job_id"], second["job_id"]) == ("job_5eed5eed5eed", "job_0123456789ab")
    batch = await api.client.post("/jobs/batch", json=[job("send_email"), job("send_email")])
    assert batch.status_code == 201, batch.text
    ids = [member["job_id"] for member in batch.json()["jobs"]]
    assert ids == ["job_c0ffeec0ffee", "job_d00dd00dd00d"]
    for job_id in (first["job_id"], second["job_id"], *ids):
        assert (await api.client.get(f"/jobs/{job_id}")).json()["status"] == "ready"


async def test_header_and_body_keys_must_agree(api: Api) -> None:
    response = await api.client.post("/jobs", json=job(idempotency_key="a"), headers={"Idempotency-Key": "b"})
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"][0]["loc"] == ["header", "Idempotency-Key"]


async def test_unknown_job_is_404(api: Api) -> None:
    for path in ("/jobs/nope", "/jobs/nope/logs", "/jobs/%00bad"):
        assert_problem(await api.client.get(path), 404, "job_not_found")
    assert_problem(await api.client.patch("/jobs/nope/cancel"), 404, "job_not_found")
    assert_problem(await api.client.patch("/jobs/%00/cancel"), 404, "job_not_found")


async def test_cancel_a_waiting_job_and_its_dependants(api: Api) -> None:
    await submit(api, job(job_id="root"))
    await submit(api, job(job_id="leaf", depends_on=["root"]))
    response = await api.client.patch("/jobs/root/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancel_reason"] == "user"
    assert ISO_Z.match(cancelled["finished_at"])
    leaf = (await api.client.get("/jobs/leaf")).json()
    assert (leaf["status"], leaf["cancel_reason"]) == ("cancelled", "dependency_cancelled")
    assert "root" in leaf["last_error"]
    assert_problem(await api.client.patch("/jobs/root/cancel"), 409, "job_terminal")


async def test_a_terminal_job_cannot_be_cancelled(api: Api) -> None:
    await submit(api, job(job_id="finished"))
    await set_status(api.engine, "finished", "completed")
    assert_problem(await api.client.patch("/jobs/finished/cancel"), 409, "job_terminal")


async def test_logs_are_oldest_first_with_the_documented_fields(api: Api) -> None:
    await submit(api, job(job_id="p"))
    await submit(api, job(job_id="c", depends_on=["p"]))
    await api.client.patch("/jobs/c/cancel")
    response = await api.client.get("/jobs/c/logs")
    assert response.status_code == 200
    body = response.json()
    assert body["job_id"] == "c"
    assert [entry["event"] for entry in body["entries"]] == ["submitted", "blocked", "cancelled"]
    first = body["entries"][0]
    assert set(first) == {"at", "attempt", "level", "event", "message", "data"}
    assert ISO_Z.match(first["at"])
    assert first["attempt"] is None
    assert first["level"] == "info"
    assert body["entries"][1]["data"] == {"waiting_for": ["p"]}
    ready = (await api.client.get("/jobs/p/logs")).json()["entries"]
    assert [entry["event"] for entry in ready] == ["submitted", "ready"]


async def test_submission_is_announced_on_the_events_channel(api: Api) -> None:
    heard: list[dict[str, Any]] = []
    unsubscribe = api.runtime.listener.subscribe(heard.append)
    try:
        await submit(api, job("send_email", job_id="loud", priority="high"))
        for _ in range(50):
            if any(m.get("job_id") == "loud" for m in heard):
                break
            await asyncio.sleep(0.05)
    finally:
        unsubscribe()
    update = next(m for m in heard if m.get("job_id") == "loud")
    assert {k: update[k] for k in ("event", "type", "priority", "status", "previous_status", "attempt")} == {
        "event": "job.updated",
        "type": "send_email",
        "priority": "high",
        "status": "ready",
        "previous_status": None,
        "attempt": 0,
    }
    assert json.dumps(update)  # JSON all the way through
