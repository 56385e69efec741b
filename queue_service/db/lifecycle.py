"""Status changes that several commands share, as SQL over the jobs aggregate:
making jobs ready, unblocking dependants by counter, propagating a failure or
cancel to descendants, releasing a node's resources, ending an attempt.

Every decision (queue position, which descendants end and how, retry or give up)
is taken by `queue_service.core`; these functions only read and write rows.
Callers own the transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa

from queue_service.core import dag
from queue_service.core.model import JobStatus, Priority, Resources
from queue_service.core.policy import PolicyConfig, sort_key
from queue_service.db import driver
from queue_service.db.events import LogEntry, StatusChange, write_log


def epoch(at: datetime) -> float:
    return at.timestamp()


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class JobHead:
    """The columns a status change needs to announce itself."""

    job_id: str
    type: str
    priority: str
    status: str
    attempts: int

    def change(self, status: JobStatus, at: datetime) -> StatusChange:
        return StatusChange(self.job_id, self.type, self.priority, status.value, self.status, self.attempts, at)


_HEAD = "job_id, type, priority, status, attempts"


def _heads(rows: Iterable[Any]) -> list[JobHead]:
    return [JobHead(r.job_id, r.type, r.priority, r.status, r.attempts) for r in rows]


_MAKE_READY_SQL: Final = driver.Statement(
    sa.text(
        """
    UPDATE jobs SET status = 'ready', ready_at = :now, sort_key = k.sort_key, next_attempt_at = NULL,
                    unfinished_deps = 0, updated_at = :now
    FROM unnest(CAST(:ids AS text[]), CAST(:keys AS float8[])) AS k(job_id, sort_key)
    WHERE jobs.job_id = k.job_id
    """
    )
)


async def make_ready(
    conn: driver.Executor, heads: Sequence[JobHead], now: datetime, policy: PolicyConfig, *, event: str, message: str
) -> list[StatusChange]:
    """Put locked waiting jobs, whose dependencies have all completed, into the ready
    queue at the position core gives them."""
    if not heads:
        return []
    keys = [sort_key(epoch(now), Priority(h.priority), policy) for h in heads]
    await driver.execute(conn, _MAKE_READY_SQL, {"now": now, "ids": [h.job_id for h in heads], "keys": keys})
    await write_log(conn, [LogEntry(h.job_id, event, message, now, h.attempts or None) for h in heads])
    return [h.change(JobStatus.READY, now) for h in heads]


_BLOCKED_DEPENDANTS_SQL: Final = driver.Statement(
    sa.text(
        f"""
    SELECT {_HEAD}, unfinished_deps,
           (SELECT count(*) FROM job_dependencies d
            WHERE d.job_id = jobs.job_id AND d.depends_on_job_id = ANY(CAST(:parents AS text[]))) AS done
    FROM jobs
    WHERE job_id IN (SELECT job_id FROM job_dependencies
                     WHERE depends_on_job_id = ANY(CAST(:parents AS text[])))
      AND status = 'blocked'
    ORDER BY job_id
    FOR UPDATE
    """
    )
)
_COUNT_DOWN_SQL: Final = driver.Statement(
    sa.text(
        """
    UPDATE jobs SET unfinished_deps = unfinished_deps - u.done, updated_at = :now
    FROM unnest(CAST(:ids AS text[]), CAST(:done AS int[])) AS u(job_id, done)
    WHERE jobs.job_id = u.job_id
    """
    )
)


async def unblock_dependants(
    conn: driver.Executor, parent_ids: Sequence[str], now: datetime, policy: PolicyConfig
) -> list[StatusChange]:
    """Dependencies completed: count them off each blocked dependant (found by index,
    never by scan); those with nothing left to wait for become ready. A dependant of
    several parents completed together counts each of them."""
    if not parent_ids:
        return []
    rows = await driver.fetch(conn, _BLOCKED_DEPENDANTS_SQL, {"parents": list(parent_ids)})
    still_waiting = [r for r in rows if r.unfinished_deps > r.done]
    if still_waiting:
        await driver.execute(
            conn,
            _COUNT_DOWN_SQL,
            {"ids": [r.job_id for r in still_waiting], "done": [r.done for r in still_waiting], "now": now},
        )
    freed = [JobHead(r.job_id, r.type, r.priority, r.status, r.attempts) for r in rows if r.unfinished_deps <= r.done]
    # The counter reaches zero in the statement that makes the job ready: the schema
    # refuses a blocked job with nothing to wait for, even for an instant.
    return await make_ready(conn, freed, now, policy, event="ready", message="every dependency completed")


_DESCENDANT_EDGES_SQL: Final = driver.Statement(
    sa.text(
        """
    WITH RECURSIVE below(job_id, parent) AS (
        SELECT job_id, depends_on_job_id FROM job_dependencies WHERE depends_on_job_id = :root
        UNION
        SELECT d.job_id, d.depends_on_job_id
        FROM job_dependencies d JOIN below b ON d.depends_on_job_id = b.job_id
    )
    SELECT job_id, parent FROM below
    """
    )
)


async def descendants(conn: driver.Executor, root: str) -> list[str]:
    """Every job that transitively depends on `root`, in core's order (breadth first,
    ties by id), found through the dependency index by one recursive query."""
    edges = await driver.fetch(conn, _DESCENDANT_EDGES_SQL, {"root": root})
    children: dict[str, list[str]] = defaultdict(list)
    for edge in edges:
        children[edge.parent].append(edge.job_id)
    return dag.descendants_in_order(root, lambda job_id: children.get(job_id, ()))


_LOCK_HEADS_SQL: Final = driver.Statement(
    sa.text(f"SELECT {_HEAD} FROM jobs WHERE job_id = ANY(CAST(:ids AS text[])) ORDER BY job_id FOR UPDATE")
)


def _end_waiting_sql(reason_column: str) -> driver.Statement:
    return driver.Statement(
        sa.text(
            f"""
    UPDATE jobs SET status = :status, {reason_column} = :reason, last_error = :message,
                    finished_at = :now, updated_at = :now, next_attempt_at = NULL
    WHERE job_id = ANY(CAST(:ids AS text[]))
    """
        )
    )


# Descendants end failed with a failure reason, or cancelled with a cancel reason.
_END_WAITING_SQL: Final = {
    JobStatus.FAILED: _end_waiting_sql("failure_reason"),
    JobStatus.CANCELLED: _end_waiting_sql("cancel_reason"),
}


async def propagate_end(
    conn: driver.Executor, ancestor_id: str, ancestor_status: JobStatus, now: datetime
) -> list[StatusChange]:
    """End every still-waiting descendant of a failed or cancelled job, as core says:
    failed with dependency_failed, or cancelled with dependency_cancelled."""
    order = await descendants(conn, ancestor_id)
    if not order:
        return []
    rows = await driver.fetch(conn, _LOCK_HEADS_SQL, {"ids": order})
    by_id = {h.job_id: h for h in _heads(rows)}
    waiting = [by_id[j] for j in order if j in by_id and JobStatus(by_id[j].status).is_waiting]
    if not waiting:
        return []
    end_status, reason = dag.propagated_end(ancestor_status)
    message = dag.propagation_message(ancestor_id, ancestor_status)
    await driver.execute(
        conn,
        _END_WAITING_SQL[end_status],
        {
            "status": end_status.value,
            "reason": reason.value,
            "message": message,
            "now": now,
            "ids": [h.job_id for h in waiting],
        },
    )
    event = "dependency_failed" if end_status is JobStatus.FAILED else "cancelled"
    await write_log(conn, [LogEntry(h.job_id, event, message, now, level="warning") for h in waiting])
    return [h.change(end_status, now) for h in waiting]


# Give nodes back what attempts held, from `release_arrays` (also a CTE body of attempts._CLOSE_SQL).
RELEASE_SQL: Final = """UPDATE nodes SET cpu_used = cpu_used - u.cpu, memory_used = memory_used - u.memory
        FROM unnest(CAST(:nodes AS text[]), CAST(:cpu AS int[]), CAST(:memory AS int[])) AS u(node_id, cpu, memory)
        WHERE nodes.node_id = u.node_id"""


def release_arrays(freed: dict[str, Resources]) -> dict[str, list[Any]]:
    """RELEASE_SQL's parameters, in node order (a fixed lock order)."""
    nodes = sorted(freed)
    return {"nodes": nodes, "cpu": [freed[n].cpu_units for n in nodes], "memory": [freed[n].memory_mb for n in nodes]}


_RELEASE_STATEMENT: Final = driver.Statement(sa.text(RELEASE_SQL))


async def release_many(conn: driver.Executor, freed: dict[str, Resources]) -> None:
    """Give attempts' resources back to their nodes, in node order (a fixed lock order)."""
    if not freed:
        return
    await driver.execute(conn, _RELEASE_STATEMENT, release_arrays(freed))
