"""Aging made visible (SPEC §5): GET /jobs/{id} says when a ready job overtakes
newer jobs of higher levels, and GET /dispatch shows the policy's head starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import pytest
from api_fixtures import Api, api_settings, job, running_api

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(migrated_url: str) -> AsyncIterator[Api]:
    settings = api_settings(migrated_url, headstart_high_seconds=600, headstart_normal_seconds=60)
    async with running_api(settings) as api:
        yield api


async def test_a_ready_job_says_when_it_overtakes_each_higher_level(api: Api) -> None:
    await api.client.post("/jobs", json=job(job_id="old_low", priority="low"))
    found = (await api.client.get("/jobs/old_low")).json()
    aging = found["aging"]
    ready_at = datetime.fromisoformat(found["ready_at"])
    assert aging["sort_key"] == pytest.approx(ready_at.timestamp())
    assert aging["headstart_seconds"] == 0
    by_level = {o["priority"]: o for o in aging["overtakes"]}
    assert list(by_level) == ["critical", "high", "normal"]
    assert (datetime.fromisoformat(by_level["normal"]["at"]) - ready_at).total_seconds() == pytest.approx(60)
    assert (datetime.fromisoformat(by_level["high"]["at"]) - ready_at).total_seconds() == pytest.approx(600)
    assert 0 < by_level["normal"]["in_seconds"] <= 60
    # Not ready, no aging; and listings leave it out.
    await api.client.post("/jobs", json=job(job_id="waits", depends_on=["old_low"]))
    assert (await api.client.get("/jobs/waits")).json()["aging"] is None
    assert "aging" not in (await api.client.get("/jobs")).json()["items"][0]


async def test_dispatch_shows_the_policy(api: Api) -> None:
    state = (await api.client.get("/dispatch")).json()
    assert state["paused"] is False
    assert state["policy"] == {
        "headstart_seconds": {"critical": 10800.0, "high": 600.0, "normal": 60.0, "low": 0.0},
        "candidate_window": 256,
        "backfill": True,
    }
