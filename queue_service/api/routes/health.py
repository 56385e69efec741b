"""`/health` (liveness: the process answers) and `/ready` (readiness: the database answers).

Both stay open when API keys are configured, so orchestrators can probe them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from fastapi import APIRouter, Request

from queue_service.api.errors import NotReady
from queue_service.api.schemas import Health, Problem
from queue_service.db.engine import ping
from queue_service.runtime import Runtime

READY_TIMEOUT_SECONDS: Final = 2.0  # a probe that hangs is as bad as one that fails

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Health,
    summary="Readiness: the database answers",
    responses={503: {"model": Problem, "description": "not_ready"}},
)
async def ready(request: Request) -> Health:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the service is starting or stopping")
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            await ping(runtime.engine)
    except Exception as error:  # any failure to answer means not ready; the reason goes to the log
        log.warning("readiness check failed: %s", error)
        raise NotReady(f"the database does not answer: {type(error).__name__}") from None
    return Health(status="ready")
