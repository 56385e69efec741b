"""`GET /metrics`: the Prometheus text exposition of this process (SPEC §8).

Whole-queue figures are read from the database at scrape time through small
aggregates (observability.metrics.read_snapshot), so a scrape costs a few
milliseconds however many jobs the table holds.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from queue_service.api.deps import RuntimeDep
from queue_service.observability.metrics import read_snapshot

router = APIRouter(tags=["observability"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format 0.0.4"}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    snapshot = await read_snapshot(runtime.engine)
    return Response(runtime.metrics.exposition(snapshot), media_type=CONTENT_TYPE_LATEST)
