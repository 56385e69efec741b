"""The schema ceiling benchmark writes, per job, the rows SPEC asks of the service:
its SQL runs against the real migrated schema (indexes, triggers, constraints), so a
schema change that the benchmark no longer matches fails here, not in an evaluation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from loadtest import bench_ceiling
from queue_service.db.engine import asyncpg_dsn

pytestmark = pytest.mark.integration

DatabaseFactory = Callable[[], Awaitable[str]]


def _workload(name: str) -> bench_ceiling.Workload:
    return next(w for w in bench_ceiling.WORKLOADS if w.name == name)


async def _counts(url: str, query: str) -> dict[str, int]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return {row[0]: row[1] for row in await connection.fetch(query)}
    finally:
        await connection.close()


@pytest.mark.parametrize("name", ["enqueue_one", "enqueue_batch"])
async def test_an_enqueue_writes_the_job_logs_it_and_counts_it_ready(
    create_database: DatabaseFactory, name: str
) -> None:
    workload = _workload(name)
    url = await create_database()
    output = await bench_ceiling.run_pgbench(url, workload, ["-t", "3"])
    assert bench_ceiling.jobs_per_second(output, workload.jobs) > 0
    jobs = 3 * workload.jobs
    assert await _counts(url, "SELECT status, count(*) FROM jobs GROUP BY status") == {"ready": jobs}
    events = await _counts(url, "SELECT event, count(*) FROM job_log GROUP BY event")
    assert events == {"submitted": jobs, "ready": jobs}  # as the service's own submissions log them
    # The depth counters the service reads for its metrics saw them, through the triggers.
    depth = await _counts(url, "SELECT status, sum(delta)::int FROM queue_counters GROUP BY status")
    assert depth == {"ready": jobs}


async def test_a_drain_round_ends_what_the_last_one_started_and_starts_as_many(
    create_database: DatabaseFactory,
) -> None:
    workload = _workload("drain_8")
    url = await create_database()
    await bench_ceiling.run_pgbench(url, workload, ["-t", "3"])
    statuses = await _counts(url, "SELECT status, count(*) FROM jobs WHERE status <> 'ready' GROUP BY status")
    assert statuses == {"completed": 16, "running": 8}
    events = await _counts(url, "SELECT event, count(*) FROM job_log WHERE attempt IS NOT NULL GROUP BY event")
    assert events == {"dispatched": 24, "started": 24, "succeeded": 16}
    attempts = await _counts(url, "SELECT coalesce(outcome, 'open'), count(*) FROM job_attempts GROUP BY 1")
    assert attempts == {"succeeded": 16, "open": 8}
    used = await _counts(url, "SELECT node_id, cpu_used FROM nodes")
    assert used == {"n1": 8}  # what is still running: the ended jobs gave theirs back


def test_jobs_per_second_reads_pgbench_tps() -> None:
    output = "latency average = 4.502 ms\ntps = 222.123279 (without initial connection time)\n"
    assert bench_ceiling.jobs_per_second(output, 8) == pytest.approx(1776.986232)
    with pytest.raises(ValueError, match="no tps"):
        bench_ceiling.jobs_per_second("pgbench: fatal", 8)


def _ablation(name: str) -> bench_ceiling.Variant:
    return next(v for v in bench_ceiling.ABLATIONS if v.name == name)


async def test_the_ablations_drop_only_what_they_name(create_database: DatabaseFactory) -> None:
    """Without the listing indexes, the triggers and the notices, a drain round still
    writes every row as built; the parts named are gone, and the triggers' counters stay empty."""
    url = await create_database()
    await bench_ceiling.run_pgbench(url, _workload("drain_8"), ["-t", "3"], _ablation("none_of_these"))
    statuses = await _counts(url, "SELECT status, count(*) FROM jobs WHERE status <> 'ready' GROUP BY status")
    assert statuses == {"completed": 16, "running": 8}
    attempts = await _counts(url, "SELECT coalesce(outcome, 'open'), count(*) FROM job_attempts GROUP BY 1")
    assert attempts == {"succeeded": 16, "open": 8}
    assert await _counts(url, "SELECT 'rows', count(*) FROM queue_counters") == {"rows": 0}
    indexes = await _counts(url, "SELECT indexname, 1 FROM pg_indexes WHERE tablename = 'jobs'")
    assert {"ix_jobs_ready_queue", "pk_jobs"} <= set(indexes)
    assert not {"ix_jobs_created", "ix_jobs_status_created", "ix_jobs_type_created"} & set(indexes)
    triggers = await _counts(url, "SELECT tgname, 1 FROM pg_trigger WHERE tgrelid = 'jobs'::regclass")
    assert {name for name in triggers if name.startswith("jobs_")} == {"jobs_count_truncate", "jobs_rank_truncate"}


@pytest.mark.parametrize("name", ["enqueue_one", "drain_8"])
def test_only_the_script_without_notices_sends_none(name: str) -> None:
    script = _workload(name).script
    assert "pg_notify" in script(True)
    assert "pg_notify" not in script(False)
