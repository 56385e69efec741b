"""Every error the API answers, as RFC 9457 problem details, mapped in one place.

Domain and database errors carry a stable `code` (core.errors, db.errors); the
table below gives each its HTTP status, and `problem_extensions` the members a
client can act on (`missing`, `cycle`, …). FastAPI's own request-validation
errors and Starlette's 404/405 answer in the same shape. Anything else is a bug:
`UnhandledErrors` logs it and answers a problem 500 (or 503 when the database is
unreachable), never a stack trace and never a non-JSON body.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from queue_service.core.errors import (
    DependencyCycle,
    DependencyNotViable,
    InvalidJob,
    QueueError,
    UnknownDependency,
    Unschedulable,
)
from queue_service.db.errors import IdempotencyKeyConflict, JobIdConflict

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
PROBLEM_TYPE_BASE: Final = "https://taskqueue.dev/problems/"  # documentation anchor per code

STATUS_BY_CODE: Final[Mapping[str, int]] = {
    "validation_error": 422,
    "unknown_dependency": 422,
    "dependency_not_viable": 422,
    "dependency_cycle": 422,
    "unschedulable": 422,
    "job_id_conflict": 409,
    "idempotency_key_reused": 409,
    "job_terminal": 409,
    "job_not_failed": 409,
    "schedule_exists": 409,
    "schedule_not_found": 404,
    "invalid_schedule": 422,
    "job_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unauthorized": 401,
    "not_ready": 503,
    "database_unavailable": 503,
}


class Unauthorized(QueueError):
    """No bearer token, or one that is not among TASKQUEUE_API_KEYS."""

    code = "unauthorized"
    headers: Final = {"WWW-Authenticate": 'Bearer realm="taskqueue"'}


class NotReady(QueueError):
    """The service cannot serve requests yet (or any more): its database does not answer."""

    code = "not_ready"


def problem(
    status: int, code: str, detail: str, *, headers: Mapping[str, str] | None = None, **extensions: Any
) -> JSONResponse:
    body = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extensions,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=dict(headers or {}))


def problem_extensions(error: QueueError) -> dict[str, Any]:
    """The members beyond the standard five that let a client act on the error."""
    if isinstance(error, InvalidJob):
        return {"errors": [{"loc": list(p.loc), "msg": p.message} for p in error.problems]}
    if isinstance(error, UnknownDependency):
        return {"missing": list(error.missing)}
    if isinstance(error, DependencyNotViable):
        return {"dependencies": [{"job_id": job_id, "status": status} for job_id, status in error.dependencies]}
    if isinstance(error, DependencyCycle):
        return {"cycle": list(error.cycle)}
    if isinstance(error, Unschedulable | JobIdConflict):
        return {"job_id": error.job_id}
    if isinstance(error, IdempotencyKeyConflict):
        return {"idempotency_key": error.key}
    return {}


async def queue_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, QueueError)  # registered for QueueError only
    status = STATUS_BY_CODE.get(error.code)
    if status is None:  # a domain error the API never expects from a request: a bug
        log.error("unexpected %s on %s %s: %s", error.code, request.method, request.url.path, error.detail)
        return problem(500, "internal_error", "the server hit an unexpected error; it has been logged")
    headers = getattr(error, "headers", None)
    return problem(status, error.code, error.detail, headers=headers, **problem_extensions(error))


async def request_validation_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    # Only loc/msg/type: pydantic's `input` and `ctx` may hold values JSON cannot carry.
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return problem(422, "validation_error", detail, errors=errors)


@functools.cache
def _path_pattern(path: str) -> re.Pattern[str]:
    return compile_path(path)[0]


def _routes_matching(routes: Iterable[Any], path: str) -> Iterator[tuple[str, set[str]]]:
    """(path template, methods) of every HTTP route whose template matches `path`."""
    for route in routes:
        branch = getattr(route, "effective_candidates", None)
        if callable(branch):  # an included router (FastAPI keeps them as branches): its own routes
            yield from _routes_matching(branch(), path)
            low_priority = getattr(route, "effective_low_priority_routes", None)
            if callable(low_priority):
                yield from _routes_matching(low_priority(), path)
        elif (methods := getattr(route, "methods", None)) and _path_pattern(route.path).match(path):
            yield route.path, set(methods)


def _methods_of(routes: Iterable[Any], path: str) -> set[str]:
    """The methods the resource at `path` supports. A literal route (`/jobs/batch`) is its
    own resource, not one of the ids a template beside it (`/jobs/{job_id}`) would match."""
    matching = list(_routes_matching(routes, path))
    literal = [methods for template, methods in matching if template == path]
    return set().union(*(literal or [methods for _, methods in matching]))


async def http_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    where = f"{request.method} {request.url.path}"
    if error.status_code == 404:
        return problem(404, "not_found", f"{where}: no such resource", headers=error.headers)
    if error.status_code == 405:
        # Starlette's Allow names only the first route matching the path; RFC 9110 wants them all.
        allowed = ", ".join(sorted(_methods_of(request.app.routes, request.url.path)))
        headers = {**(error.headers or {}), "Allow": allowed} if allowed else error.headers
        return problem(405, "method_not_allowed", f"{where}: method not allowed", headers=headers)
    code = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
    return problem(error.status_code, code, str(error.detail), headers=error.headers)


_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError, TimeoutError)


class UnhandledErrors:
    """ASGI middleware: the last net under every request.

    Starlette's own server-error middleware re-raises after answering, so the
    server logs a second traceback; this one logs once and answers problem JSON.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for a problem document; the server closes the connection
                raise
            if isinstance(error, _UNAVAILABLE):
                response = problem(503, "database_unavailable", "the database is unavailable; try again shortly")
            else:
                response = problem(500, "internal_error", "the server hit an unexpected error; it has been logged")
            await response(scope, receive, send)


def install(app: FastAPI) -> None:
    """Register the handlers above on `app`."""
    app.add_exception_handler(QueueError, queue_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_middleware(UnhandledErrors)
