"""Helpers for the API tests: the app on a real database, driven in-process.

httpx's ASGITransport does not run the lifespan, so `running_api` enters it
itself (`app.router.lifespan_context`), exactly as uvicorn would, and leaves it
afterwards. Tests import these helpers and wrap them in their own fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.api.app import create_app
from queue_service.runtime import Runtime
from queue_service.settings import Settings
from simulator.scenario import Scenario

BASE_URL = "http://testserver"
PROBLEM_JSON = "application/problem+json"
TABLES = "jobs, job_dependencies, job_attempts, job_events, nodes, queue_counters"


def api_settings(url: str, **overrides: Any) -> Settings:
    # A pool large enough that ten concurrent requests really run concurrently.
    values: dict[str, Any] = {"database_url": url, "db_pool_size": 12, "db_max_overflow": 4}
    return Settings(**(values | overrides))


@dataclass
class Api:
    """The app under test, a client on it, and its engine for arranging rows directly."""

    client: httpx.AsyncClient
    app: FastAPI

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    @property
    def engine(self) -> AsyncEngine:
        return self.runtime.engine


@asynccontextmanager
async def running_api(settings: Settings, *, clean: bool = True) -> AsyncIterator[Api]:
    """A client on `create_app(settings, run_worker=False)`, its lifespan running."""
    app = create_app(settings, run_worker=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            api = Api(client, app)
            if clean:
                await reset(api.engine)
            yield api


async def reset(engine: AsyncEngine) -> None:
    """Empty every table a test writes, and resume dispatch."""
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"TRUNCATE {TABLES} CASCADE"))
        await conn.execute(sa.text("UPDATE dispatch_control SET paused = false"))


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is problem+json with this status and code; returns the document."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert {"type", "title", "detail"} <= body.keys()
    return body


def job(job_type: str = "noop", **fields: Any) -> dict[str, Any]:
    """A submission body."""
    return {"type": job_type, **fields}


async def add_node(engine: AsyncEngine, node_id: str, cpu: int, memory: int, status: str = "active") -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, status) "
                "VALUES (:id, :cpu, :memory, :status)"
            ),
            {"id": node_id, "cpu": cpu, "memory": memory, "status": status},
        )


async def set_status(engine: AsyncEngine, job_id: str, status: str, **columns: Any) -> None:
    """Force a job to an end status (as a worker would have), for tests of what follows."""
    values: Mapping[str, Any] = {"status": status, **columns}
    assignments = ", ".join(f"{name} = :{name}" for name in values)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(f"UPDATE jobs SET {assignments}, finished_at = now() WHERE job_id = :job_id"),
            {**values, "job_id": job_id},
        )


SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


@asynccontextmanager
async def live_service(url: str, scenario: Scenario, node_id: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API and one worker node of the scenario's capacity, in this process."""
    settings = Settings(
        database_url=url,
        node_id=node_id,
        node_cpu_units=scenario.capacity.cpu_units,
        node_memory_mb=scenario.capacity.memory_mb,
        poll_interval_seconds=0.2,
        lease_seconds=10,
        shutdown_grace_seconds=1,
    )
    app = create_app(settings, run_worker=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client
