"""Hand-written hostile input (issue 5, item 3): every case answers a 4xx problem
with its stable `code`, never a 5xx, and leaves nothing partial behind.

Sizes, nesting, undecodable bytes, NUL characters, huge dependency lists and
batches, unknown fields, wrong types for every field, id and idempotency-key
collisions, and cancelling twice. After each refused request the jobs table is
exactly as it was before.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from api_fixtures import Api, api_settings, assert_problem, job, running_api

from queue_service.core import constants as c

pytestmark = pytest.mark.integration

JSON_HEADERS = {"Content-Type": "application/json"}
HUGE = 10_000
HUGE_REQUEST_SECONDS = 20.0  # generous for CI; a 10,000-id check is a few hundred milliseconds locally
CYCLE_BATCH = 300
LARGE_CYCLE_BATCH = 10_000
LARGE_CYCLE_SECONDS = 5.0  # parsing, validating and a linear cycle check of 10,000 jobs


@pytest.fixture
async def api(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url)) as api:
        yield api


async def stored(api: Api) -> list[tuple[str, str]]:
    """Every job and edge in the database, to prove a refusal stored nothing."""
    async with api.engine.begin() as conn:
        jobs = (await conn.execute(sa.text("SELECT job_id, status FROM jobs ORDER BY job_id"))).all()
        edges = (await conn.execute(sa.text("SELECT count(*) FROM job_dependencies"))).scalar_one()
    return [(row.job_id, row.status) for row in jobs] + [("edges", str(edges))]


async def refused(api: Api, response_call: Any, status: int, code: str) -> dict[str, Any]:
    """Send, expect the problem, and check the database did not change."""
    before = await stored(api)
    body = assert_problem(await response_call, status, code)
    assert await stored(api) == before
    return body


# -- sizes -------------------------------------------------------------------------------------


async def test_a_payload_just_over_64_kib_is_413(api: Api) -> None:
    filler = "x" * (c.MAX_PAYLOAD_BYTES - len('{"data":""}') + 1)  # serialized: one byte over
    assert len(json.dumps({"data": filler}, separators=(",", ":"))) == c.MAX_PAYLOAD_BYTES + 1
    await refused(api, api.client.post("/jobs", json=job(payload={"data": filler})), 413, "payload_too_large")
    batch = [job(job_id="fits"), job(job_id="too-big", payload={"data": filler})]
    await refused(api, api.client.post("/jobs/batch", json=batch), 413, "payload_too_large")


async def test_a_payload_of_exactly_64_kib_is_accepted(api: Api) -> None:
    filler = "x" * (c.MAX_PAYLOAD_BYTES - len('{"data":""}'))
    assert (await api.client.post("/jobs", json=job(payload={"data": filler}))).status_code == 201


async def test_a_multi_mib_body_is_413_before_it_is_parsed(api: Api) -> None:
    body = b'{"type": "noop", "payload": {"data": "' + b"x" * (20 * 1024 * 1024) + b'"}}'
    await refused(api, api.client.post("/jobs", content=body, headers=JSON_HEADERS), 413, "payload_too_large")


async def test_a_multi_mib_body_without_a_content_length_is_413_while_it_streams(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'[{"type": "noop", "payload": {"data": "'
        for _ in range(20):
            yield b"x" * (1024 * 1024)
        yield b'"}}]'

    response = api.client.post("/jobs/batch", content=chunks(), headers=JSON_HEADERS)
    await refused(api, response, 413, "payload_too_large")


# -- shape of the document ---------------------------------------------------------------------


async def test_deep_json_nesting_is_a_validation_error(api: Api) -> None:
    for depth in (100, 100_000):  # past the limit; and past Python's recursion limit
        deep = '{"a":' * depth + "1" + "}" * depth
        body = '{"type": "noop", "payload": ' + deep + "}"
        await refused(api, api.client.post("/jobs", content=body, headers=JSON_HEADERS), 422, "validation_error")
        arrays = "[" * depth + "]" * depth
        await refused(
            api, api.client.post("/jobs/batch", content=arrays, headers=JSON_HEADERS), 422, "validation_error"
        )


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "noop", "payload": {"a": "\xff\xfe"}}',
        b'{"type": "\xc3\x28"}',
        b"\x80\x81\x82",
        b'{"type": "noop"',
        b"",
        b"NaN",
        b'{"type": "noop", "timeout_seconds": Infinity}',
        b'{"type": "noop", "timeout_seconds": 1e999}',
    ],
    ids=["bad-utf8-in-payload", "bad-utf8-in-type", "binary", "truncated", "empty", "nan", "infinity", "overflow"],
)
async def test_undecodable_bodies_are_validation_errors(api: Api, body: bytes) -> None:
    await refused(api, api.client.post("/jobs", content=body, headers=JSON_HEADERS), 422, "validation_error")
    await refused(api, api.client.post("/jobs/batch", content=body, headers=JSON_HEADERS), 422, "validation_error")


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "no\x00op"},
        {"type": "noop", "payload": {"text": "a\x00b"}},
        {"type": "noop", "payload": {"k\x00ey": 1}},
        {"type": "noop", "idempotency_key": "key\x00"},
        {"type": "noop", "payload": {"lone": "\ud800"}},
    ],
    ids=["type", "payload-value", "payload-key", "idempotency-key", "lone-surrogate"],
)
async def test_nul_characters_and_lone_surrogates_are_validation_errors(api: Api, fields: dict[str, Any]) -> None:
    body = json.dumps(fields)  # escapes \u0000 and \ud800, as a client's JSON encoder would
    await refused(api, api.client.post("/jobs", content=body, headers=JSON_HEADERS), 422, "validation_error")


async def test_nul_in_a_path_or_query_is_not_a_500(api: Api) -> None:
    assert_problem(await api.client.get("/jobs/a%00b"), 404, "job_not_found")
    assert_problem(await api.client.patch("/jobs/a%00b/cancel"), 404, "job_not_found")
    assert_problem(await api.client.get("/jobs", params={"type": "a\x00b"}), 422, "validation_error")
    response = await api.client.get("/jobs/a%00b/logs")
    assert response.status_code < 500, response.text


async def test_a_nul_in_the_redrive_filter_is_a_422(api: Api) -> None:
    response = await api.client.post("/dead-letter/retry", json={"type": "a\x00b"})
    assert_problem(response, 422, "validation_error")


# -- dependencies ------------------------------------------------------------------------------


async def test_ten_thousand_unknown_dependencies_are_listed_in_bounded_time(api: Api) -> None:
    missing = [f"missing-{i}" for i in range(HUGE)]
    started = time.monotonic()
    body = await refused(api, api.client.post("/jobs", json=job(depends_on=missing)), 422, "unknown_dependency")
    assert time.monotonic() - started < HUGE_REQUEST_SECONDS
    assert sorted(body["missing"]) == sorted(missing)


def chain_closed_by_a_cycle(size: int) -> list[dict[str, Any]]:
    """`size` jobs: a chain, then three members that close a cycle among themselves."""
    batch = [job(job_id=f"chain-{i}", depends_on=[f"chain-{i - 1}"] if i else []) for i in range(size - 3)]
    batch += [
        job(job_id="cycle-a", depends_on=["cycle-c", f"chain-{size - 4}"]),
        job(job_id="cycle-b", depends_on=["cycle-a"]),
        job(job_id="cycle-c", depends_on=["cycle-b"]),
    ]
    return batch


async def test_a_batch_with_a_cycle_at_the_end_names_it_and_stores_nothing(api: Api) -> None:
    batch = chain_closed_by_a_cycle(CYCLE_BATCH)
    body = await refused(api, api.client.post("/jobs/batch", json=batch), 422, "dependency_cycle")
    assert body["cycle"] == ["cycle-a", "cycle-c", "cycle-b", "cycle-a"]  # from the first member, along depends_on


async def test_a_large_batch_with_a_cycle_is_refused_in_bounded_time(api: Api) -> None:
    batch = chain_closed_by_a_cycle(LARGE_CYCLE_BATCH)
    started = time.monotonic()
    await refused(api, api.client.post("/jobs/batch", json=batch), 422, "dependency_cycle")
    assert time.monotonic() - started < LARGE_CYCLE_SECONDS


async def test_duplicate_and_self_dependencies_are_validation_errors(api: Api) -> None:
    assert (await api.client.post("/jobs", json=job(job_id="parent"))).status_code == 201
    duplicate = job(depends_on=["parent", "parent"])
    await refused(api, api.client.post("/jobs", json=duplicate), 422, "validation_error")
    await refused(api, api.client.post("/jobs", json=job(job_id="me", depends_on=["me"])), 422, "validation_error")


# -- fields ------------------------------------------------------------------------------------


async def test_unknown_fields_are_validation_errors_naming_them(api: Api) -> None:
    for fields in (
        job(colour="blue"),
        job(resource_requirements={"cpu_units": 1, "gpus": 1}),
        job(retry_config={"max_attempts": 2, "forever": True}),
        job(status="completed"),  # read-only fields cannot be set
    ):
        body = await refused(api, api.client.post("/jobs", json=fields), 422, "validation_error")
        assert body["errors"], body


WRONG_TYPES: dict[str, list[Any]] = {
    "job_id": [1, True, [], {}, "", "has space", "x" * 129, "-leading-dash"],
    "type": [1, None, True, [], {}, "", "t" * (c.JOB_TYPE_MAX_LENGTH + 1)],
    "priority": [1, None, "urgent", "CRITICAL", [], {}],
    "payload": [1, "text", [], True],
    "resource_requirements": [1, "big", [], {"cpu_units": "2"}, {"cpu_units": 0}, {"memory_mb": 1.5}],
    "depends_on": ["parent", 1, {}, [1], [None], ["bad id"]],
    "retry_config": [
        1,
        "x",
        {"max_attempts": 0},
        {"backoff_multiplier": 0.5},
        {"initial_delay_seconds": -1},
        {"initial_delay_seconds": 10, "max_delay_seconds": 5},
        {"jitter": 2},
        {"max_attempts": "3"},
    ],
    "timeout_seconds": [0, -1, "300", None, [], True],
    "idempotency_key": [1, "", "k" * (c.IDEMPOTENCY_KEY_MAX_LENGTH + 1), [], {}],
}
WRONG_CASES = [(field, value) for field, values in WRONG_TYPES.items() for value in values]


async def test_wrong_types_for_every_field_are_validation_errors(api: Api) -> None:
    for field, value in WRONG_CASES:
        body = await refused(
            api, api.client.post("/jobs", json={"type": "noop", field: value}), 422, "validation_error"
        )
        assert any(error["loc"][:2] == ["body", field] for error in body["errors"]), (field, value, body)
        # The same member inside a batch is reported with its index.
        batch = [job(job_id="fine"), {"type": "noop", field: value}]
        body = await refused(api, api.client.post("/jobs/batch", json=batch), 422, "validation_error")
        assert any(error["loc"][:3] == ["body", 1, field] for error in body["errors"]), (field, value, body)


async def test_every_problem_in_a_body_is_reported_at_once(api: Api) -> None:
    fields = {"type": 1, "priority": "urgent", "timeout_seconds": -1, "payload": []}
    body = await refused(api, api.client.post("/jobs", json=fields), 422, "validation_error")
    assert {error["loc"][1] for error in body["errors"]} >= {"type", "priority", "timeout_seconds", "payload"}


@pytest.mark.parametrize("document", [[], {}, "job", 1, None, [[]], [1]], ids=repr)
async def test_a_batch_must_be_a_non_empty_array_of_objects(api: Api, document: Any) -> None:
    await refused(api, api.client.post("/jobs/batch", json=document), 422, "validation_error")


# -- collisions --------------------------------------------------------------------------------


async def test_the_same_job_id_with_another_body_is_409(api: Api) -> None:
    assert (await api.client.post("/jobs", json=job(job_id="taken", priority="high"))).status_code == 201
    body = await refused(api, api.client.post("/jobs", json=job(job_id="taken")), 409, "job_id_conflict")
    assert body["job_id"] == "taken"
    # In a batch, the collision refuses the whole batch.
    batch = [job(job_id="new-one"), job(job_id="taken", priority="low")]
    await refused(api, api.client.post("/jobs/batch", json=batch), 409, "job_id_conflict")
    # The same body again is an idempotent replay.
    assert (await api.client.post("/jobs", json=job(job_id="taken", priority="high"))).status_code == 200


async def test_a_job_id_twice_in_one_batch_is_a_validation_error(api: Api) -> None:
    batch = [job(job_id="twin"), job(job_id="twin", priority="low")]
    response = await refused(api, api.client.post("/jobs/batch", json=batch), 422, "validation_error")
    assert response["errors"]


async def test_reusing_an_idempotency_key_with_another_body_is_409(api: Api) -> None:
    first = await api.client.post("/jobs", json=job(payload={"n": 1}), headers={"Idempotency-Key": "once"})
    assert first.status_code == 201
    body = await refused(
        api,
        api.client.post("/jobs", json=job(payload={"n": 2}), headers={"Idempotency-Key": "once"}),
        409,
        "idempotency_key_reused",
    )
    assert body["idempotency_key"] == "once"
    in_body = job(payload={"n": 3}, idempotency_key="once")
    await refused(api, api.client.post("/jobs", json=in_body), 409, "idempotency_key_reused")
    header_and_body_disagree = api.client.post(
        "/jobs", json=job(idempotency_key="one"), headers={"Idempotency-Key": "other"}
    )
    await refused(api, header_and_body_disagree, 422, "validation_error")


# -- cancel ------------------------------------------------------------------------------------


async def test_cancelling_twice_is_409_job_terminal(api: Api) -> None:
    assert (await api.client.post("/jobs", json=job(job_id="stop-me"))).status_code == 201
    first = await api.client.patch("/jobs/stop-me/cancel")
    assert first.status_code == 200
    assert first.json()["status"] == "cancelled"
    await refused(api, api.client.patch("/jobs/stop-me/cancel"), 409, "job_terminal")
    assert (await api.client.get("/jobs/stop-me")).json()["status"] == "cancelled"


async def test_cancelling_a_missing_job_is_404(api: Api) -> None:
    await refused(api, api.client.patch("/jobs/no-such-job/cancel"), 404, "job_not_found")
    await refused(api, api.client.patch("/jobs/%F0%9F%92%A5/cancel"), 404, "job_not_found")
