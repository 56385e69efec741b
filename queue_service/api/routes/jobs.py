"""`/jobs`: submit one or a batch, read, list, cancel, and a job's log (SPEC §4).

Each handler that writes is one unit of work (`engine.begin()`); reads run on an
autocommit connection (`autocommit`), saving BEGIN and COMMIT. The SQL lives in the
jobs and attempts repositories, the rules in core.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final

import orjson
from fastapi import APIRouter, Header, Query, Request, Response

from queue_service.api import submission
from queue_service.api.deps import RuntimeDep
from queue_service.api.schemas import BatchAccepted, JobAccepted, JobDetail, JobLog, JobPage, JobPublic, Problem
from queue_service.core import constants as c
from queue_service.core.aging import aging
from queue_service.core.model import JobSpec, JobStatus, Priority, Resources
from queue_service.core.policy import PolicyConfig
from queue_service.core.validation import is_valid_job_id
from queue_service.db import attempts, driver, jobs
from queue_service.db.engine import autocommit
from queue_service.db.events import iso_z
from queue_service.runtime import Runtime

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500

router = APIRouter(prefix="/jobs", tags=["jobs"])

_JOB_BODY = {"$ref": "#/components/schemas/JobCreate"}
_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": text}
    for status, text in (
        (409, "job_id_conflict or idempotency_key_reused: same id or key, different body"),
        (413, "payload_too_large: payload over 64 KiB serialized"),
        (422, "validation_error, unknown_dependency, dependency_not_viable, dependency_cycle, unschedulable"),
    )
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "job_not_found"}}

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=c.IDEMPOTENCY_KEY_MAX_LENGTH)
]


def _now() -> datetime:
    return datetime.now(UTC)


async def _submit(runtime: Runtime, specs: list[JobSpec], hashes: list[str]) -> list[jobs.Submitted]:
    settings = runtime.settings

    async def capacities(conn: driver.Executor) -> list[Resources]:
        # With no live node, the configured node size is the yardstick (SPEC §3).
        return await runtime.capacities.get(conn) or [settings.node_capacity()]

    return await jobs.submit_request(runtime.engine, specs, hashes, _now, settings.policy_config(), capacities)


@router.post(
    "",
    status_code=201,
    response_model=JobAccepted,
    summary="Submit a job",
    responses={200: {"model": JobAccepted, "description": "an idempotent replay: the original job"}, **_SUBMIT_ERRORS},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _JOB_BODY}}}},
)
async def submit_job(request: Request, runtime: RuntimeDep, idempotency_key: IdempotencyKey = None) -> Response:
    spec, digest = submission.parse_single(await submission.read_json(request), idempotency_key)
    [result] = await _submit(runtime, [spec], [digest])
    # Built from what was written, so already JobAccepted's shape (the tests hold the
    # schema to it): answered as is, as the batch is, not validated and dumped again.
    return Response(
        orjson.dumps(submission.accepted(result.job)),
        status_code=201 if result.created else 200,
        headers={"Location": f"/jobs/{result.job['job_id']}"},
        media_type="application/json",
    )


@router.post(
    "/batch",
    status_code=201,
    response_model=BatchAccepted,
    summary="Submit several jobs at once, all or nothing",
    responses={200: {"model": BatchAccepted, "description": "every member was a replay"}, **_SUBMIT_ERRORS},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "array", "minItems": 1, "items": _JOB_BODY}}},
        }
    },
)
async def submit_batch(request: Request, runtime: RuntimeDep, idempotency_key: IdempotencyKey = None) -> Response:
    specs, hashes = submission.parse_batch(await submission.read_json(request), idempotency_key)
    results = await _submit(runtime, specs, hashes)
    # Built from what was written, so already BatchAccepted's shape (the tests hold the
    # schema to it): answered as is, not validated again member by member.
    return Response(
        orjson.dumps({"jobs": [submission.accepted(result.job) for result in results]}),
        status_code=201 if any(result.created for result in results) else 200,
        media_type="application/json",
    )


@router.get("", response_model=JobPage, summary="List jobs, newest first")
async def list_jobs(
    runtime: RuntimeDep,
    status: Annotated[list[JobStatus] | None, Query(description="repeatable")] = None,
    job_type: Annotated[
        str | None, Query(alias="type", min_length=1, max_length=c.JOB_TYPE_MAX_LENGTH, pattern=r"^[^\x00]+$")
    ] = None,
    priority: Priority | None = None,
    created_after: Annotated[datetime | None, Query(description="inclusive")] = None,
    created_before: Annotated[datetime | None, Query(description="exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[str | None, Query(max_length=1024, description="next_cursor of the previous page")] = None,
) -> dict[str, Any]:
    async with autocommit(runtime.engine) as conn:
        listing = jobs.JobListing(
            limit,
            statuses=[s.value for s in status or ()],
            job_type=job_type,
            priority=priority.value if priority else None,
            created_after=_aware(created_after),
            created_before=_aware(created_before),
            cursor=cursor,
        )
        page = await jobs.list_jobs(conn, listing)
    return {"items": page.items, "next_cursor": page.next_cursor}


def _aware(at: datetime | None) -> datetime | None:
    """A timestamp given without an offset is read as UTC, like every one we return."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


@router.get("/{job_id}", response_model=JobDetail, summary="Get a job", responses=_NOT_FOUND)
async def get_job(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    async with driver.pooled(runtime.engine) as conn:
        job = await jobs.get_job(conn, job_id)
    return with_aging(job, runtime.settings.policy_config(), _now())


def with_aging(job: dict[str, Any], policy: PolicyConfig, now: datetime) -> dict[str, Any]:
    """A ready job with its aging (SPEC §5) spelled out: when it overtakes newer jobs of higher levels."""
    if job["status"] != JobStatus.READY.value or job["ready_at"] is None:
        return job | {"aging": None}
    ready_at = datetime.fromisoformat(job["ready_at"]).timestamp()
    state = aging(Priority(job["priority"]), ready_at, now.timestamp(), policy)
    overtakes = [
        {"priority": o.priority.value, "at": iso_z(datetime.fromtimestamp(o.at, UTC)), "in_seconds": o.in_seconds}
        for o in state.overtakes
    ]
    return job | {
        "aging": {
            "sort_key": state.sort_key,
            "headstart_seconds": state.headstart_seconds,
            "waited_seconds": state.waited_seconds,
            "overtakes": overtakes,
        }
    }


@router.patch(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job (a running attempt is stopped, its resources freed)",
    responses={**_NOT_FOUND, 409: {"model": Problem, "description": "job_terminal"}},
)
async def cancel_job(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    async with runtime.engine.begin() as conn:
        if not is_valid_job_id(job_id):  # no such job can exist; and the id may hold bytes SQL text cannot
            raise attempts.JobNotFound(f"no job {job_id!r}")
        await attempts.cancel_job(conn, job_id, _now())
        return await jobs.get_job(conn, job_id)


@router.get("/{job_id}/logs", response_model=JobLog, summary="A job's log, oldest first", responses=_NOT_FOUND)
async def job_logs(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    async with autocommit(runtime.engine) as conn:
        return {"job_id": job_id, "entries": await jobs.job_logs(conn, job_id)}
