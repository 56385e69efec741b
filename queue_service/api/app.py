"""The FastAPI application factory.

`create_app(settings, run_worker=...)` wires routers, error handling and a
lifespan that opens the process runtime (embedded PostgreSQL if needed,
migrations, engine, event listener, and a worker node for `taskqueue serve`)
and closes it in reverse on shutdown. Nothing is built at import time.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from queue_service.api import errors
from queue_service.api.deps import require_api_key
from queue_service.api.routes import admin, dead_letter, dispatch, docs, health, jobs, metrics, schedules, stream
from queue_service.api.schemas import REQUEST_BODY_MODELS
from queue_service.observability.fanout import EventHub
from queue_service.runtime import open_runtime
from queue_service.settings import Settings

TITLE = "Smart Task Queue"
VERSION = "0.1.0"


class QueueAPI(FastAPI):
    """FastAPI whose OpenAPI document also describes the bodies parsed by hand (JobCreate)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        schema = super().openapi()  # cached on self.openapi_schema, and completed here in place
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_BODY_MODELS:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        _document_errors(schema)
        # Omitted means "generate one"; an explicit null is refused by the parser, so not offered.
        job_id = components["JobCreate"]["properties"]["job_id"]
        string = next(option for option in job_id.pop("anyOf", [job_id]) if option.get("type") == "string")
        job_id.update(string)
        return schema


PROBLEM_JSON_CONTENT = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
OPEN_PATHS = frozenset({"/health", "/ready"})  # SPEC §12: everything else needs the key, when keys are set


def _document_errors(schema: dict[str, Any]) -> None:
    """Say in the document what errors.py does: every error is problem+json (FastAPI would
    write application/json, and its own model for 422), any protected operation may answer
    401, one with a job id in its path 404, one with a body 400 for undecodable JSON."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    response["content"] = copy.deepcopy(PROBLEM_JSON_CONTENT)
            extra = {
                "401": path not in OPEN_PATHS and "missing or wrong API key (when keys are configured)",
                "404": "{job_id}" in path and "no such job",
                "400": "requestBody" in operation and "the body is not JSON",
            }
            for status, description in extra.items():
                if description:
                    responses.setdefault(
                        status, {"description": description, "content": copy.deepcopy(PROBLEM_JSON_CONTENT)}
                    )


def create_app(settings: Settings, *, run_worker: bool) -> FastAPI:
    """The HTTP API; with `run_worker` the process also runs one worker node."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings, run_worker=run_worker) as runtime:
            hub = EventHub(runtime.listener, settings.stream_buffer)
            runtime.metrics.stream_stats = lambda: (hub.client_count, hub.clients_dropped)
            app.state.stream_hub = hub
            app.state.runtime = runtime
            try:
                yield
            finally:
                app.state.runtime = None  # /ready answers 503 while the rest shuts down
                app.state.stream_hub = None
                hub.close()  # stream clients are told the server is going away

    app = QueueAPI(
        title=TITLE,
        version=VERSION,
        description="A PostgreSQL-backed job queue: priorities with aging, dependencies, resources, retries.",
        lifespan=lifespan,
        # Served by routes.docs instead, behind the API key like everything but /health and /ready.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.runtime = None
    app.state.stream_hub = None
    errors.install(app)
    app.include_router(health.router)
    protected = [Depends(require_api_key)]
    app.include_router(jobs.router, dependencies=protected)
    app.include_router(dead_letter.router, dependencies=protected)
    app.include_router(dispatch.router, dependencies=protected)
    app.include_router(schedules.router, dependencies=protected)
    app.include_router(metrics.router, dependencies=protected)
    app.include_router(docs.router, dependencies=protected)
    app.include_router(stream.router)  # authenticates itself: a browser's WebSocket sends ?token=
    admin.install(app, protected)  # the page shell is open (it holds no data); its data API is not
    return app
