"""`/dead-letter`: failed jobs, most recently failed first (SPEC §10).

Re-driving one (`POST /jobs/{id}/retry`) belongs to the jobs resource and a later issue.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from queue_service.api.deps import RuntimeDep
from queue_service.api.routes.jobs import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from queue_service.api.schemas import JobPage
from queue_service.db import jobs

router = APIRouter(prefix="/dead-letter", tags=["dead letter"])


@router.get("", response_model=JobPage, summary="Failed jobs, most recently failed first")
async def dead_letter(
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> dict[str, Any]:
    async with runtime.engine.begin() as conn:
        page = await jobs.dead_letter(conn, limit=limit, cursor=cursor)
    return {"items": page.items, "next_cursor": page.next_cursor}
