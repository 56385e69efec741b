"""Read-only queries for metrics and the admin dashboard, each cheap at a million jobs.

Queue depth reads the `queue_counters` deltas (a few rows per key once folded),
never the jobs table; nodes are a handful of rows; running jobs come from the
partial running index; a job's neighbourhood walks the dependency indexes with
a depth and a row limit. `fold_queue_counters` is the periodic folding the
counters table needs so that depth stays a small read (see tables.queue_counters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

# Any stable 64-bit number: the advisory lock that makes one process fold at a time.
FOLD_LOCK_KEY: Final = 0x7461736B_666F6C64  # "taskfold"
FOLD_THRESHOLD_ROWS: Final = 256  # below this, folding is not worth a write
# Position reads sum the rank deltas of a few bucket ranges, rows per server process
# that are updated in place: a second of steady submissions adds one row per process
# and level, and these are what a position walks, so they are folded sooner.
RANK_FOLD_THRESHOLD_ROWS: Final = 64
# What folding deletes or rewrites, vacuumed after it (see vacuum_folded).
VACUUMED_TABLES: Final = ("queue_counters", "queue_rank_deltas", "queue_rank_base")
# The queue's tables that hot paths join by key, analysed as soon as a burst has changed
# them (see refresh_statistics). Not job_events: the largest, only appended and read by
# one job's index range, where fresh statistics change no plan.
ANALYSED_TABLES: Final = ("jobs", "job_attempts", "job_dependencies")
STALE_ROWS: Final = 1000  # changed rows since the last ANALYZE that make a table's statistics stale...
STALE_FRACTION: Final = 0.1  # ...or this share of its rows, whichever is more (autovacuum's own default share)
# The queue's tables that every job's run churns: each status change of a job is a new
# row version (status is indexed, so no update is in place), and so is each attempt's end
# and each round's change of a node's use. Vacuumed by the leader once this many dead
# rows have piled up (see vacuum_churned)...
CHURNED_TABLES: Final = ("jobs", "job_attempts", "nodes")
CHURN_DEAD_ROWS: Final = 20_000
CHURN_DEAD_FRACTION: Final = 0.05  # ...or this share of the live rows, whichever is more
RUNNING_LIMIT: Final = 500  # running jobs shown on the dashboard; capacity bounds it in practice anyway
NEIGHBOURHOOD_DEPTH: Final = 3  # generations drawn above and below a job
NEIGHBOURHOOD_LIMIT: Final = 60  # jobs drawn in all: a graph larger than this is unreadable anyway


@dataclass(frozen=True)
class Depth:
    status: str
    priority: str
    jobs: int


@dataclass(frozen=True)
class NodeUsage:
    node_id: str
    status: str
    cpu_capacity: int
    cpu_used: int
    memory_capacity: int
    memory_used: int
    heartbeat_at: datetime


async def queue_depth(conn: AsyncConnection) -> tuple[list[Depth], int]:
    """Jobs per (status, priority) from the counters, and how many counter rows that read."""
    rows = await conn.execute(
        sa.text(
            "SELECT status, priority, sum(delta) AS jobs, count(*) AS rows FROM queue_counters "
            "GROUP BY status, priority ORDER BY status, priority"
        )
    )
    depths, read = [], 0
    for r in rows:
        read += r.rows
        if r.jobs:
            depths.append(Depth(r.status, r.priority, int(r.jobs)))
    return depths, read


# Delta tables, the function that folds each (see queue_service.db.tables), and the
# rows above which it is worth running.
_FOLDED_TABLES: Final = (
    ("queue_counters", "queue_counters_compact", FOLD_THRESHOLD_ROWS),
    ("queue_rank_deltas", "queue_rank_compact", RANK_FOLD_THRESHOLD_ROWS),
)


async def fold_queue_counters(conn: AsyncConnection) -> bool:
    """Fold the depth counters and the queue-position deltas, each only if no other
    process is doing it and there are enough rows to be worth it; True if anything
    was folded."""
    locked = (await conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": FOLD_LOCK_KEY})).scalar()
    if not locked:
        return False
    folded = False
    for table, compact, threshold in _FOLDED_TABLES:
        # Counting at most threshold+1 rows keeps the check itself cheap on a long table.
        rows = (
            await conn.execute(
                sa.text(f"SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT :limit) AS sample"),
                {"limit": threshold + 1},
            )
        ).scalar_one()
        if rows > threshold:
            await conn.execute(sa.text(f"SELECT {compact}()"))
            folded = True
    return folded


async def vacuum_folded(conn: AsyncConnection) -> None:
    """VACUUM the tables folding churns, on a connection in autocommit mode.

    Folding deletes every delta it sums (and rewrites or deletes base rows), and rank
    deltas are updated in place, so under a steady stream of submissions these small
    tables gain dead rows by the thousand, which position reads walk through.
    Autovacuum wakes once a minute: measured (with 0002's appended deltas), 85,000
    dead rows made a lone submission's position read 1.9 ms where 0.05 ms after a
    VACUUM. Tables another VACUUM holds are skipped, not waited for.
    """
    await conn.execute(sa.text("VACUUM (SKIP_LOCKED) " + ", ".join(VACUUMED_TABLES)))


async def vacuum_churned(
    conn: AsyncConnection, *, rows: int = CHURN_DEAD_ROWS, fraction: float = CHURN_DEAD_FRACTION
) -> list[str]:
    """VACUUM the churned queue tables holding more than max(`rows`, `fraction` of their
    live rows) dead rows, on a connection in autocommit mode; their names.

    Until a vacuum, the dead versions of ready and running jobs stay in the partial
    indexes the claims walk from their head, and the tables and indexes only grow:
    measured on a server whose autovacuum was off, 100,000 jobs drained left 200,000
    dead rows and a ready-queue index of 6.6 MB for no ready job (26,000 and 3.1 MB with
    this run every 5 s). Autovacuum, where it runs, waits for a fifth of a table to be
    dead and wakes once a minute. Cheap when nothing is due (one read of the statistics
    view); a table another VACUUM holds is skipped, not waited for.
    """
    due = await _tables_over(conn, CHURNED_TABLES, "n_dead_tup", rows, fraction)
    if due:
        await conn.execute(sa.text("VACUUM (SKIP_LOCKED) " + ", ".join(due)))  # names from CHURNED_TABLES only
    return due


async def refresh_statistics(conn: AsyncConnection) -> list[str]:
    """ANALYZE the queue tables a burst has changed since their last analysis; their names.

    Autovacuum analyses them too, but wakes once a minute: in between, a queue just
    filled by a burst (or a database just created) has statistics that call it tiny,
    and the planner joins a handful of keys to it by scanning it whole. Cheap when
    nothing is stale (one read of the statistics view); a lock another ANALYZE or a
    VACUUM holds is not waited for.
    """
    stale = await _tables_over(conn, ANALYSED_TABLES, "n_mod_since_analyze", STALE_ROWS, STALE_FRACTION)
    if stale:
        await conn.execute(sa.text("SET LOCAL lock_timeout = '100ms'"))
        await conn.execute(sa.text("ANALYZE " + ", ".join(stale)))  # names from ANALYSED_TABLES only
    return stale


async def _tables_over(
    conn: AsyncConnection, tables: Sequence[str], count: str, rows: int, fraction: float
) -> list[str]:
    """Those of `tables` whose statistics column `count` (one of ours, never input) is over
    max(`rows`, `fraction` of their live rows), by name."""
    found = await conn.execute(
        sa.text(
            f"""
            SELECT relname FROM pg_stat_user_tables
            WHERE schemaname = current_schema() AND relname = ANY(CAST(:tables AS text[]))
              AND {count} > greatest(:rows, :fraction * n_live_tup)
            ORDER BY relname
            """
        ),
        {"tables": list(tables), "rows": rows, "fraction": fraction},
    )
    return [row.relname for row in found]


async def live_nodes(conn: AsyncConnection) -> list[NodeUsage]:
    """Active and draining nodes, with capacity and use (stopped ones are history)."""
    rows = await conn.execute(
        sa.text(
            "SELECT node_id, status, cpu_capacity, cpu_used, memory_capacity, memory_used, heartbeat_at "
            "FROM nodes WHERE status IN ('active', 'draining') ORDER BY node_id"
        )
    )
    return [NodeUsage(**r._mapping) for r in rows]


async def running_jobs(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Running jobs by node, oldest first (the partial running index: a few rows)."""
    rows = await conn.execute(
        sa.text(
            "SELECT job_id, type, priority, worker_id, attempts, cpu_units, memory_mb, started_at, timeout_seconds "
            "FROM jobs WHERE status = 'running' ORDER BY worker_id, started_at, job_id LIMIT :limit"
        ),
        {"limit": RUNNING_LIMIT},
    )
    return [dict(r._mapping) for r in rows]


async def attempts_of(conn: AsyncConnection, job_id: str) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.text(
            "SELECT attempt, node_id, started_at, ended_at, outcome, error FROM job_attempts "
            "WHERE job_id = :id ORDER BY attempt"
        ),
        {"id": job_id},
    )
    return [dict(r._mapping) for r in rows]


async def neighbourhood(conn: AsyncConnection, job_id: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The job's ancestors and descendants up to NEIGHBOURHOOD_DEPTH generations, at
    most NEIGHBOURHOOD_LIMIT jobs (nearest first), with their statuses; and the
    dependency edges among them as (job, depends_on) pairs. `depth` is negative
    for ancestors, positive for descendants, 0 for the job itself."""
    rows = await conn.execute(
        sa.text(
            """
            WITH RECURSIVE up(job_id, depth) AS (
                SELECT CAST(:id AS text), 0
                UNION
                SELECT d.depends_on_job_id, up.depth - 1 FROM job_dependencies d JOIN up ON d.job_id = up.job_id
                WHERE up.depth > -CAST(:generations AS integer)
            ), down(job_id, depth) AS (
                SELECT CAST(:id AS text), 0
                UNION
                SELECT d.job_id, down.depth + 1 FROM job_dependencies d JOIN down ON d.depends_on_job_id = down.job_id
                WHERE down.depth < CAST(:generations AS integer)
            ), near AS (
                SELECT job_id, min(depth) AS depth FROM (SELECT * FROM (SELECT * FROM up LIMIT :limit) AS u
                    UNION ALL SELECT * FROM (SELECT * FROM down LIMIT :limit) AS d) AS both_ways
                GROUP BY job_id
            )
            SELECT j.job_id, j.type, j.priority, j.status, near.depth
            FROM near JOIN jobs j ON j.job_id = near.job_id
            ORDER BY abs(near.depth), j.job_id LIMIT :limit
            """
        ),
        {"id": job_id, "generations": NEIGHBOURHOOD_DEPTH, "limit": NEIGHBOURHOOD_LIMIT},
    )
    nodes = [dict(r._mapping) for r in rows]
    ids = [n["job_id"] for n in nodes]
    edges = await conn.execute(
        sa.text(
            "SELECT job_id, depends_on_job_id FROM job_dependencies "
            "WHERE job_id = ANY(CAST(:ids AS text[])) AND depends_on_job_id = ANY(CAST(:ids AS text[])) "
            "ORDER BY job_id, depends_on_job_id"
        ),
        {"ids": ids},
    )
    return nodes, [(e.job_id, e.depends_on_job_id) for e in edges]


async def statuses_of(conn: AsyncConnection, job_ids: Sequence[str]) -> dict[str, str]:
    rows = await conn.execute(
        sa.text("SELECT job_id, status FROM jobs WHERE job_id = ANY(CAST(:ids AS text[]))"), {"ids": list(job_ids)}
    )
    return {r.job_id: r.status for r in rows}
