"""Reading the job and attempt history of a time window back out (issue #8): what
`taskqueue export-trace` and `simulate --from-db` turn into a scenario.

Jobs are chosen by `created_at` in [since, until), through `ix_jobs_created`; their
attempts, edges, first `ready` log entries and the nodes that ran them come by job id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True)
class TraceAttempt:
    attempt: int
    node_id: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None


@dataclass
class TraceJob:
    job_id: str
    type: str
    priority: str
    status: str
    payload: dict[str, Any]
    cpu_units: int
    memory_mb: int
    max_attempts: int
    backoff_multiplier: float
    initial_delay_seconds: float
    max_delay_seconds: float
    jitter: float
    timeout_seconds: float
    created_at: datetime
    finished_at: datetime | None
    failure_reason: str | None
    cancel_reason: str | None
    first_ready_at: datetime | None = None
    depends_on: list[str] = field(default_factory=list)
    attempts: list[TraceAttempt] = field(default_factory=list)


@dataclass(frozen=True)
class TraceNode:
    node_id: str
    cpu_capacity: int
    memory_capacity: int


_JOBS_SQL = sa.text(
    """
    SELECT job_id, type, priority, status, payload, cpu_units, memory_mb, max_attempts, backoff_multiplier,
           initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, created_at, finished_at,
           failure_reason, cancel_reason
    FROM jobs
    WHERE created_at >= :since AND created_at < :until
    ORDER BY created_at, job_id
    """
)
_EDGES_SQL = sa.text(
    "SELECT job_id, depends_on_job_id FROM job_dependencies WHERE job_id = ANY(:ids) ORDER BY job_id, depends_on_job_id"
)
_ATTEMPTS_SQL = sa.text(
    "SELECT job_id, attempt, node_id, started_at, ended_at, outcome FROM job_attempts "
    "WHERE job_id = ANY(:ids) ORDER BY job_id, attempt"
)
_FIRST_READY_SQL = sa.text(
    "SELECT job_id, min(at) AS at FROM job_log WHERE job_id = ANY(:ids) AND event = 'ready' GROUP BY job_id"
)
_NODES_SQL = sa.text(
    "SELECT node_id, cpu_capacity, memory_capacity FROM nodes WHERE node_id = ANY(:ids) ORDER BY node_id"
)


async def read_trace(conn: AsyncConnection, since: datetime, until: datetime) -> tuple[list[TraceJob], list[TraceNode]]:
    """Jobs created in [since, until), oldest first, with their history; and the nodes that ran them."""
    jobs = [TraceJob(**row._mapping) for row in await conn.execute(_JOBS_SQL, {"since": since, "until": until})]
    by_id = {job.job_id: job for job in jobs}
    ids = list(by_id)
    for job_id, parent in await conn.execute(_EDGES_SQL, {"ids": ids}):
        by_id[job_id].depends_on.append(parent)
    node_ids: set[str] = set()
    for row in await conn.execute(_ATTEMPTS_SQL, {"ids": ids}):
        by_id[row.job_id].attempts.append(
            TraceAttempt(row.attempt, row.node_id, row.started_at, row.ended_at, row.outcome)
        )
        node_ids.add(row.node_id)
    for job_id, at in await conn.execute(_FIRST_READY_SQL, {"ids": ids}):
        by_id[job_id].first_ready_at = at
    nodes = [TraceNode(*row) for row in await conn.execute(_NODES_SQL, {"ids": sorted(node_ids)})]
    return jobs, nodes
