"""GET /jobs and GET /dead-letter: filters, keyset pagination, cursors."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from api_fixtures import Api, api_settings, assert_problem, job, running_api

pytestmark = pytest.mark.integration

# Well-formed, but with a timestamp without an offset, which this API never issues.
NAIVE_CURSOR = base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", "job_1"]').decode()


@pytest.fixture
async def api(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url)) as api:
        yield api


async def all_pages(api: Api, path: str, **params: Any) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    cursor = None
    while True:
        response = await api.client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        ids += [item["job_id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages


async def test_keyset_pagination_over_120_jobs_returns_each_once_newest_first(api: Api, seed: Any) -> None:
    async with api.engine.begin() as conn:
        await seed(conn, 100)  # one second apart
    # Twenty more in one batch: they share created_at, so job_id breaks the ties.
    await api.client.post("/jobs/batch", json=[job(job_id=f"same_instant_{i:02d}") for i in range(20)])
    ids, pages = await all_pages(api, "/jobs", limit=7)
    assert len(ids) == 120
    assert len(set(ids)) == 120
    assert pages == 18  # 17 full pages and one of one
    assert ids[:20] == [f"same_instant_{i:02d}" for i in range(19, -1, -1)]
    assert ids[20:] == [f"job_{i}" for i in range(100, 0, -1)]


async def test_filters_combine(api: Api, seed: Any) -> None:
    async with api.engine.begin() as conn:
        await seed(conn, 200)

    async def ids(**params: Any) -> set[str]:
        return set((await all_pages(api, "/jobs", limit=500, **params))[0])

    async with api.engine.connect() as conn:
        expected = {
            row.job_id
            for row in await conn.execute(
                sa.text(
                    "SELECT job_id FROM jobs WHERE status IN ('failed', 'ready') AND type = 'type_3' "
                    "AND created_at >= '2026-01-01T00:01:00Z' AND created_at < '2026-01-01T00:03:00Z'"
                )
            )
        }
    assert expected  # the seed spreads statuses and types, so the filter is not vacuous
    found = await ids(
        status=["failed", "ready"],
        type="type_3",
        created_after="2026-01-01T00:01:00Z",
        created_before="2026-01-01T00:03:00",  # no offset: read as UTC
    )
    assert found == expected
    assert len(await ids(priority="critical")) == 50
    assert await ids(type="no_such_type") == set()


@pytest.mark.parametrize("statuses", [["ready"], ["completed", "failed", "ready"]])
async def test_a_status_filter_pages_newest_first_as_the_unfiltered_list_does(
    api: Api, seed: Any, statuses: list[str]
) -> None:
    """Each status is read on its own (see jobs.list_query) and several are merged: the
    pages still run newest first across them, ties broken by job id, each job once."""
    async with api.engine.begin() as conn:
        await seed(conn, 200)
    await api.client.post("/jobs/batch", json=[job(job_id=f"same_instant_{i:02d}") for i in range(20)])
    async with api.engine.connect() as conn:
        expected = [
            row.job_id
            for row in await conn.execute(
                sa.text(
                    "SELECT job_id FROM jobs WHERE status = ANY(CAST(:statuses AS text[]))"
                    " ORDER BY created_at DESC, job_id DESC"
                ),
                {"statuses": statuses},
            )
        ]
    assert len(expected) > 20  # the same-instant batch and more: ties and several pages
    ids, pages = await all_pages(api, "/jobs", limit=7, status=statuses)
    assert ids == expected
    assert pages == -(-len(expected) // 7)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"limit": "many"},
        {"status": "sleeping"},
        {"priority": "urgent"},
        {"created_after": "yesterday"},
        {"cursor": "not-a-cursor"},
        {"cursor": "W10"},  # valid base64 of "[]"
        {"cursor": NAIVE_CURSOR},
    ],
)
async def test_bad_query_parameters_are_422(api: Api, params: dict[str, Any]) -> None:
    body = assert_problem(await api.client.get("/jobs", params=params), 422, "validation_error")
    assert body["errors"]
    assert all({"loc", "msg"} <= set(e) for e in body["errors"])


async def test_limit_bounds_are_inclusive(api: Api) -> None:
    assert (await api.client.get("/jobs", params={"limit": 1})).status_code == 200
    assert (await api.client.get("/jobs", params={"limit": 500})).status_code == 200


async def test_dead_letter_lists_failed_jobs_most_recently_failed_first(api: Api, seed: Any) -> None:
    async with api.engine.begin() as conn:
        await seed(conn, 300)
        await conn.execute(
            sa.text("UPDATE jobs SET finished_at = created_at + interval '1 hour' WHERE job_id = 'job_190'")
        )
    ids, _ = await all_pages(api, "/dead-letter", limit=5)
    failed = [f"job_{i}" for i in range(300, 0, -1) if 86 <= i % 100 < 95]
    assert ids[0] == "job_190"  # failed last, though created long ago
    assert sorted(ids) == sorted(failed)
    assert len(ids) == len(set(ids))
    item = (await api.client.get("/dead-letter", params={"limit": 1})).json()["items"][0]
    assert item["status"] == "failed"
    assert item["failure_reason"] == "max_attempts_exhausted"
    assert_problem(await api.client.get("/dead-letter", params={"cursor": "%%%"}), 422, "validation_error")
    assert_problem(await api.client.get("/dead-letter", params={"limit": 501}), 422, "validation_error")
