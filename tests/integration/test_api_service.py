"""Health, readiness, dispatch control, authentication and the error contract
(problem details for unknown routes, wrong methods and unexpected failures)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator

import pytest
from api_fixtures import Api, api_settings, assert_problem, job, running_api

from queue_service.db import jobs as jobs_repository
from queue_service.db.engine import create_engine
from queue_service.settings import Settings

pytestmark = pytest.mark.integration

KEYS = ("first-key", "second-key")


@pytest.fixture
async def api(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url)) as api:
        yield api


@pytest.fixture
async def locked_api(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url, api_keys=",".join(KEYS))) as api:
        yield api


async def test_health_and_ready(api: Api) -> None:
    assert (await api.client.get("/health")).json() == {"status": "ok"}
    response = await api.client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_ready_is_503_when_the_database_does_not_answer(api: Api) -> None:
    unreachable = create_engine(Settings(database_url="postgresql://postgres@127.0.0.1:1/none"))
    api.app.state.runtime = dataclasses.replace(api.runtime, engine=unreachable)
    try:
        assert_problem(await api.client.get("/ready"), 503, "not_ready")
        assert (await api.client.get("/health")).status_code == 200  # alive all the same
        # A request that needs the database says so, as a problem, not a stack trace.
        assert_problem(await api.client.get("/jobs/x"), 503, "database_unavailable")
    finally:
        api.app.state.runtime = dataclasses.replace(api.runtime, engine=api.engine)
        await unreachable.dispose()


async def test_dispatch_pause_and_resume(api: Api) -> None:
    assert (await api.client.get("/dispatch")).json()["paused"] is False
    assert (await api.client.post("/dispatch/pause")).json()["paused"] is True
    assert (await api.client.get("/dispatch")).json()["paused"] is True
    # Submissions are still accepted while paused.
    assert (await api.client.post("/jobs", json=job())).status_code == 201
    assert (await api.client.post("/dispatch/pause")).json()["paused"] is True  # idempotent
    assert (await api.client.post("/dispatch/resume")).json()["paused"] is False
    assert (await api.client.get("/dispatch")).json()["paused"] is False


async def test_unknown_routes_and_methods_are_problems(api: Api) -> None:
    assert_problem(await api.client.get("/nowhere"), 404, "not_found")
    response = await api.client.delete("/jobs")
    assert_problem(response, 405, "method_not_allowed")
    assert "allow" in response.headers


async def test_an_unexpected_error_is_a_logged_problem_500(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(jobs_repository, "get_job", broken)
    response = await api.client.get("/jobs/any")
    body = assert_problem(response, 500, "internal_error")
    assert "boom" not in body["detail"]  # internals stay in the log
    assert any("boom" in (record.exc_text or "") or record.exc_info for record in caplog.records)


async def test_without_api_keys_the_api_is_open(api: Api) -> None:
    assert (await api.client.get("/jobs")).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/jobs"),
        ("POST", "/jobs/batch"),
        ("GET", "/jobs"),
        ("GET", "/jobs/x"),
        ("PATCH", "/jobs/x/cancel"),
        ("GET", "/jobs/x/logs"),
        ("GET", "/dead-letter"),
        ("GET", "/dispatch"),
        ("POST", "/dispatch/pause"),
        ("POST", "/dispatch/resume"),
    ],
)
async def test_with_api_keys_every_endpoint_needs_a_bearer_token(locked_api: Api, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zmlyc3Qta2V5"}):
        response = await locked_api.client.request(method, path, headers=headers, json=job())
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_with_api_keys_a_valid_token_passes_and_probes_stay_open(locked_api: Api) -> None:
    client = locked_api.client
    for key in KEYS:
        response = await client.post("/jobs", json=job(), headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 201
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/ready")).status_code == 200
    assert (await client.get("/dispatch", headers={"Authorization": "Bearer second-key"})).json()["paused"] is False


async def test_openapi_documents_the_job_body_and_problem_responses(api: Api) -> None:
    document = (await api.client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert {"JobCreate", "JobPublic", "JobAccepted", "Problem"} <= schemas.keys()
    assert set(schemas["JobCreate"]["properties"]) == {
        "job_id",
        "type",
        "priority",
        "payload",
        "resource_requirements",
        "depends_on",
        "retry_config",
        "timeout_seconds",
        "idempotency_key",
    }
    post = document["paths"]["/jobs"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert {"200", "201", "409", "413", "422"} <= post["responses"].keys()
    # Every $ref in the document resolves.
    refs = set(re.findall(r'"\$ref": ?"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs <= schemas.keys()
