"""Cron schedules (SPEC §10): the API, firing at given times, misfire after
downtime, and one job per fire time with two replicas firing at once."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from api_fixtures import Api, api_settings, assert_problem, running_api
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.core.model import DEFAULT_NODE_CAPACITY
from queue_service.core.policy import PolicyConfig
from queue_service.db import schedules
from queue_service.db.engine import create_engine
from queue_service.settings import Settings
from queue_service.worker.leader import Leader

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = PolicyConfig()
CAPACITIES = [DEFAULT_NODE_CAPACITY]


@pytest.fixture
async def api(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url)) as api:
        async with api.engine.begin() as conn:
            await conn.execute(sa.text("TRUNCATE schedules"))
        yield api


def schedule(name: str = "every-5", **fields: object) -> dict[str, object]:
    return {"name": name, "cron": "*/5 * * * *", "job_template": {"type": "generate_report"}, **fields}


async def test_create_read_list_patch_delete(api: Api) -> None:
    response = await api.client.post("/schedules", json=schedule(timezone="Europe/Paris", misfire="run_once"))
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["Location"] == "/schedules/every-5"
    assert (created["enabled"], created["misfire"], created["timezone"]) == (True, "run_once", "Europe/Paris")
    times = [datetime.fromisoformat(t) for t in created["next_fire_times"]]
    assert len(times) == 5
    assert all(t.minute % 5 == 0 and t.second == 0 for t in times)
    assert all((b - a) == timedelta(minutes=5) for a, b in itertools.pairwise(times))
    assert created["next_fire_at"] == created["next_fire_times"][0]

    assert (await api.client.get("/schedules/every-5")).json()["name"] == "every-5"
    await api.client.post("/schedules", json=schedule("another", cron="0 3 * * *"))
    assert [s["name"] for s in (await api.client.get("/schedules")).json()["items"]] == ["another", "every-5"]

    disabled = (await api.client.patch("/schedules/every-5", json={"enabled": False})).json()
    assert (disabled["enabled"], disabled["next_fire_times"]) == (False, [])
    hourly = (await api.client.patch("/schedules/every-5", json={"enabled": True, "cron": "0 * * * *"})).json()
    assert all(datetime.fromisoformat(t).minute == 0 for t in hourly["next_fire_times"])

    assert (await api.client.delete("/schedules/every-5")).status_code == 204
    assert_problem(await api.client.get("/schedules/every-5"), 404, "schedule_not_found")
    assert_problem(await api.client.delete("/schedules/every-5"), 404, "schedule_not_found")
    assert_problem(await api.client.patch("/schedules/every-5", json={"enabled": False}), 404, "schedule_not_found")


async def test_bad_schedules_are_422_with_every_problem(api: Api) -> None:
    body = assert_problem(
        await api.client.post(
            "/schedules",
            json=schedule(
                "bad name", cron="every day", timezone="Mars/Olympus", job_template={"job_id": "x", "priority": "?"}
            ),
        ),
        422,
        "invalid_schedule",
    )
    locs = {tuple(e["loc"]) for e in body["errors"]}
    assert {("name",), ("cron",), ("timezone",), ("job_template", "job_id"), ("job_template", "type")} <= locs
    assert_problem(await api.client.post("/schedules", json=schedule(misfire="later")), 422, "validation_error")
    too_big = {"type": "t", "resource_requirements": {"cpu_units": 999}}
    assert_problem(await api.client.post("/schedules", json=schedule(job_template=too_big)), 422, "unschedulable")
    await api.client.post("/schedules", json=schedule())
    assert_problem(await api.client.post("/schedules", json=schedule()), 409, "schedule_exists")
    assert_problem(await api.client.patch("/schedules/every-5", json={"cron": "* *"}), 422, "invalid_schedule")


async def _add(engine: AsyncEngine, name: str, cron: str, misfire: str = "skip", at: datetime = T0) -> None:
    values = {
        "name": name,
        "cron": cron,
        "timezone": "UTC",
        "job_template": {"type": "noop", "priority": "high"},
        "enabled": True,
        "misfire": misfire,
    }
    async with engine.begin() as conn:
        await schedules.create_schedule(conn, values, at)


async def _fire(engine: AsyncEngine, now: datetime) -> list[str]:
    async with engine.begin() as conn:
        return (await schedules.fire_due(conn, now, POLICY, CAPACITIES)).created


async def _job_ids(engine: AsyncEngine, prefix: str) -> list[str]:
    async with engine.begin() as conn:
        rows = await conn.execute(
            sa.text("SELECT job_id FROM jobs WHERE job_id LIKE :p ORDER BY job_id"), {"p": prefix + "%"}
        )
        return list(rows.scalars())


async def test_fires_at_the_given_times_and_creates_the_template_job(api: Api) -> None:
    await _add(api.engine, "minutely", "* * * * *")
    assert await _fire(api.engine, T0 + timedelta(seconds=59)) == []
    assert await _fire(api.engine, T0 + timedelta(minutes=1)) == ["cron:minutely:20260101T120100Z"]
    assert await _fire(api.engine, T0 + timedelta(minutes=1, seconds=30)) == []  # already fired
    made = (await api.client.get("/jobs/cron:minutely:20260101T120100Z")).json()
    assert (made["type"], made["priority"], made["status"]) == ("noop", "high", "ready")
    found = (await api.client.get("/schedules/minutely")).json()
    assert found["last_fired_at"] == "2026-01-01T12:01:00.000000Z"


@pytest.mark.parametrize(("misfire", "expected"), [("skip", []), ("run_once", ["cron:{}:20260101T145900Z"])])
async def test_missed_fires_after_downtime_follow_the_policy(api: Api, misfire: str, expected: list[str]) -> None:
    name = f"down-{misfire.replace('_', '-')}"
    await _add(api.engine, name, "* * * * *", misfire)
    # Down from 12:00 to 15:00:30: 180 fire times were missed; 15:00 is within the grace.
    created = await _fire(api.engine, T0 + timedelta(hours=3, seconds=30))
    assert created == [*(e.format(name) for e in expected), f"cron:{name}:20260101T150000Z"]
    assert await _fire(api.engine, T0 + timedelta(hours=3, minutes=1)) == [f"cron:{name}:20260101T150100Z"]


async def test_two_replicas_firing_at_once_make_one_job_per_fire_time(api: Api, migrated_url: str) -> None:
    """Without the leader lock at all: two engines fire the same ticks concurrently."""
    await _add(api.engine, "every-second", "* * * * * *")
    other = create_engine(Settings(database_url=migrated_url, db_pool_size=2, db_max_overflow=0))
    created: list[str] = []
    try:
        for tick in range(1, 31):
            now = T0 + timedelta(seconds=tick)
            results = await asyncio.gather(_fire(api.engine, now), _fire(other, now))
            created += [job_id for result in results for job_id in result]
    finally:
        await other.dispose()
    ids = await _job_ids(api.engine, "cron:every-second:")
    assert len(ids) == 30  # one per fire time, 12:00:01 … 12:00:30
    assert sorted(created) == ids  # and each created once, by one of the two


async def test_two_leaders_in_real_time_fire_each_second_once(api: Api, migrated_url: str) -> None:
    """Two processes' leadership candidates, real clock: only the leader fires, once per second."""
    start = datetime.now(UTC)
    await _add(api.engine, "live", "* * * * * *", at=start)
    settings = Settings(database_url=migrated_url, leader_interval_seconds=0.2, db_pool_size=2, db_max_overflow=0)
    engines = [create_engine(settings) for _ in range(2)]
    leaders = [Leader(engine, migrated_url, settings, f"replica-{i}") for i, engine in enumerate(engines)]
    try:
        for leader in leaders:
            await leader.start()
        await asyncio.sleep(3.5)
    finally:
        for leader in leaders:
            await leader.stop()
        for engine in engines:
            await engine.dispose()
    end = datetime.now(UTC)
    assert sum(leader.terms for leader in leaders) == 1
    ids = await _job_ids(api.engine, "cron:live:")
    seconds = [datetime.strptime(i.rsplit(":", 1)[1], "%Y%m%dT%H%M%S%z") for i in ids]
    assert len(ids) >= 2
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(seconds))  # no gap
    assert start < seconds[0]
    assert seconds[-1] <= end
