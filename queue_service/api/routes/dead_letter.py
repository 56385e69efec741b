"""The dead-letter queue (SPEC §4, §10): failed jobs, most recently failed first,
and their re-drive, one by one (`POST /jobs/{id}/retry`) or by filter
(`POST /dead-letter/retry`). A re-driven job is back in `ready` (or `blocked`)
with `max_attempts` more attempts, numbered on; the descendants its failure
ended are back in `blocked`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query
from sqlalchemy.exc import DBAPIError

from queue_service.api.deps import RuntimeDep
from queue_service.api.routes.jobs import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from queue_service.api.schemas import BulkRedrive, BulkRedriveResult, JobPage, JobPublic, Problem
from queue_service.core import constants as c
from queue_service.core.model import FailureReason
from queue_service.db import jobs, redrive
from queue_service.db.engine import autocommit, is_retryable
from queue_service.runtime import Runtime

REDRIVE_ATTEMPTS: Final = 3  # a re-drive aborted by a deadlock with a completing parent is run again

router = APIRouter(tags=["dead letter"])

_REDRIVE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "job_not_found"},
    409: {"model": Problem, "description": "job_not_failed: only a failed job can be re-driven"},
    422: {
        "model": Problem,
        "description": "dependency_not_viable: a dependency of its own failed or was cancelled",
    },
}


@router.get("/dead-letter", response_model=JobPage, summary="Failed jobs, most recently failed first")
async def dead_letter(
    runtime: RuntimeDep,
    job_type: Annotated[
        str | None, Query(alias="type", min_length=1, max_length=c.JOB_TYPE_MAX_LENGTH, pattern=r"^[^\x00]+$")
    ] = None,
    failure_reason: FailureReason | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> dict[str, Any]:
    async with autocommit(runtime.engine) as conn:
        page = await jobs.dead_letter_filtered(
            conn,
            job_type=job_type,
            failure_reason=failure_reason.value if failure_reason else None,
            limit=limit,
            cursor=cursor,
        )
    return {"items": page.items, "next_cursor": page.next_cursor}


async def _retrying_deadlocks(runtime: Runtime, job_id: str) -> dict[str, Any]:
    policy = runtime.settings.policy_config()
    for attempt in range(1, REDRIVE_ATTEMPTS + 1):
        try:
            async with runtime.engine.begin() as conn:
                await redrive.redrive(conn, job_id, datetime.now(UTC), policy)
                return await jobs.get_job(conn, job_id)
        except DBAPIError as error:
            if attempt == REDRIVE_ATTEMPTS or not is_retryable(error):
                raise
    raise AssertionError("unreachable")


@router.post(
    "/jobs/{job_id}/retry",
    response_model=JobPublic,
    summary="Re-drive a failed job from the dead-letter queue",
    responses=_REDRIVE_ERRORS,
)
async def retry_job(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    return await _retrying_deadlocks(runtime, job_id)


@router.post(
    "/dead-letter/retry",
    response_model=BulkRedriveResult,
    summary="Re-drive the failed jobs matching a filter (most recently failed first, up to `limit`)",
)
async def retry_many(body: BulkRedrive, runtime: RuntimeDep) -> dict[str, Any]:
    reasons = [r.value for r in body.failure_reasons] if body.failure_reasons else list(redrive.OWN_FAILURES)
    async with runtime.engine.begin() as conn:
        done, skipped = await redrive.redrive_many(
            conn,
            datetime.now(UTC),
            runtime.settings.policy_config(),
            job_type=body.type,
            failure_reasons=reasons,
            limit=body.limit,
        )
    return {
        "redriven": [{"job_id": r.job_id, "status": r.status.value, "descendants": r.descendants} for r in done],
        "skipped": [{"job_id": job_id, "reason": reason} for job_id, reason in skipped],
    }
