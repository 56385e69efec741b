"""`/admin`: the operator's dashboard (SPEC §10), server-rendered shell plus a little JavaScript.

The page itself (`/admin`, `/admin/jobs/{id}`) and its two static files are open:
they hold no data. Everything shown comes from the authenticated API — the
public endpoints (`/jobs`, `/dead-letter`, `/dispatch`, `/jobs/stream`) and two
read models here (`/admin/api/overview`, `/admin/api/jobs/{id}`) — so with
API keys set, the page asks for a key and sends it as a bearer token (and as
`?token=` on the WebSocket). Files are read with importlib.resources: no build
step, and they ship inside the package.

Every `/admin` response carries a strict Content-Security-Policy (scripts and
styles from this origin only, no inline code, no framing) and the usual hardening
headers, since the page drives state-changing buttons.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Response
from fastapi.params import Depends
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from queue_service.api.deps import RuntimeDep
from queue_service.core.validation import is_valid_job_id
from queue_service.db import attempts, insight, jobs
from queue_service.db.attempts import JobNotFound
from queue_service.db.engine import autocommit
from queue_service.db.events import iso_z
from queue_service.observability import waiting

UI_PACKAGE: Final = "queue_service.api.admin_ui"
STATIC_FILES: Final = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
SECURITY_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
    "cache-control": "no-store",
}

pages = APIRouter(prefix="/admin", include_in_schema=False)
data = APIRouter(prefix="/admin/api", tags=["admin"])


@cache
def _asset(name: str) -> bytes:
    return resources.files(UI_PACKAGE).joinpath(name).read_bytes()


@pages.get("")
@pages.get("/")
async def dashboard() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8")


@pages.get("/jobs/{job_id}")
async def job_page(job_id: str) -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8")  # the script reads the path


@pages.get("/static/{name}")
async def static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:  # an allow-list: no path ever reaches the file system unchecked
        return Response(status_code=404)
    return Response(_asset(name), media_type=media_type)


def _json_times(row: dict[str, Any]) -> dict[str, Any]:
    return {key: iso_z(value) if isinstance(value, datetime) else value for key, value in row.items()}


@data.get("/overview", summary="Queue depth, nodes with their running jobs, dispatch state")
async def overview(runtime: RuntimeDep) -> dict[str, Any]:
    async with autocommit(runtime.engine) as conn:
        depths, _ = await insight.queue_depth(conn)
        nodes = await insight.live_nodes(conn)
        running = await insight.running_jobs(conn)
        paused = await attempts.is_paused(conn)
    by_node: dict[str, list[dict[str, Any]]] = {}
    for job in running:
        by_node.setdefault(job["worker_id"], []).append(_json_times(job))
    return {
        "now": iso_z(datetime.now(UTC)),
        "paused": paused,
        "depth": [{"status": d.status, "priority": d.priority, "jobs": d.jobs} for d in depths],
        "nodes": [_node(n, by_node.get(n.node_id, [])) for n in nodes],
    }


def _node(node: insight.NodeUsage, running: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "status": node.status,
        "cpu": {"used": node.cpu_used, "capacity": node.cpu_capacity},
        "memory": {"used": node.memory_used, "capacity": node.memory_capacity},
        "heartbeat_at": iso_z(node.heartbeat_at),
        "running": list(running),
    }


@data.get("/jobs/{job_id}", summary="A job with its attempts, log, DAG neighbourhood and why it waits")
async def job_detail(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    if not is_valid_job_id(job_id):
        raise JobNotFound(f"no job {job_id!r}")
    async with autocommit(runtime.engine) as conn:
        job = await jobs.get_job(conn, job_id)
        tries = await insight.attempts_of(conn, job_id)
        log = await jobs.job_logs(conn, job_id)
        graph_nodes, edges = await insight.neighbourhood(conn, job_id)
        dependency_statuses = await insight.statuses_of(conn, job["depends_on"])
        nodes = await insight.live_nodes(conn)
        paused = await attempts.is_paused(conn)
    why = waiting.explain(job, dependency_statuses, nodes, paused)
    return {
        "job": job,
        "attempts": [_json_times(a) for a in tries],
        "logs": log,
        "graph": {"nodes": graph_nodes, "edges": [{"job_id": a, "depends_on": b} for a, b in edges]},
        "waiting": {"kind": why.kind, "text": why.text},
        "paused": paused,
    }


class SecurityHeaders:
    """ASGI middleware: the headers above on every HTTP response under /admin."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/admin" or path.startswith("/admin/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI, protected: Sequence[Depends]) -> None:
    """Mount the pages (open), the data API (behind `protected`) and the header middleware."""
    app.include_router(pages)
    app.include_router(data, dependencies=list(protected))
    app.add_middleware(SecurityHeaders)
