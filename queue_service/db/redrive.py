"""Dead-letter re-drive in SQL (SPEC §4, §10): a failed job back to `ready` or
`blocked` with `max_attempts` more attempts, and the descendants its failure
ended back to `blocked`. Which descendants come back is core's decision
(`core.redrive`); this module reads and writes the rows. Callers own the transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from queue_service.core import dag, states
from queue_service.core import redrive as rules
from queue_service.core.errors import QueueError
from queue_service.core.model import FailureReason, JobStatus
from queue_service.core.policy import PolicyConfig
from queue_service.core.validation import is_valid_job_id
from queue_service.db import lifecycle
from queue_service.db.attempts import JobNotFound
from queue_service.db.events import LogEntry, StatusChange, announce_changes, write_log
from queue_service.db.lifecycle import JobHead

# What a bulk re-drive takes by default: the jobs that failed by themselves. A
# dependency_failed job comes back with the ancestor whose failure ended it.
OWN_FAILURES: Final = (FailureReason.MAX_ATTEMPTS_EXHAUSTED.value, FailureReason.PERMANENT_ERROR.value)
_HEAD = "job_id, type, priority, status, attempts"
_CLEARED = "failure_reason = NULL, last_error = NULL, finished_at = NULL, next_attempt_at = NULL"


class JobNotFailed(QueueError):
    """Only a failed job can be re-driven from the dead-letter queue."""

    code = "job_not_failed"

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id!r} is {status}, not failed: only a failed job can be re-driven")
        self.job_id = job_id


@dataclass(frozen=True)
class Redriven:
    """A re-driven job, where it went, and the descendants that came back with it."""

    job_id: str
    status: JobStatus
    descendants: list[str]


async def redrive(conn: AsyncConnection, job_id: str, now: datetime, policy: PolicyConfig) -> Redriven:
    """Re-drive one failed job; JobNotFound, JobNotFailed, or DependencyNotViable when
    one of its own dependencies is failed or cancelled (it could never run)."""
    if not is_valid_job_id(job_id):  # no such job can exist; and the id may hold bytes SQL text cannot
        raise JobNotFound(f"no job {job_id!r}")
    found = (
        await conn.execute(
            sa.text(f"SELECT {_HEAD}, failure_reason FROM jobs WHERE job_id = :id FOR UPDATE"), {"id": job_id}
        )
    ).one_or_none()
    if found is None:
        raise JobNotFound(f"no job {job_id!r}")
    if found.status != JobStatus.FAILED.value:
        raise JobNotFailed(job_id, found.status)
    head = JobHead(found.job_id, found.type, found.priority, found.status, found.attempts)
    own_parents = await _parent_statuses(conn, [job_id])
    unfinished = dag.count_unfinished(own_parents.get(job_id, []), await _statuses(conn, own_parents, job_id))
    changes = [await _restore_root(conn, head, found.failure_reason, unfinished, now, policy)]
    descendant_changes = await _restore_descendants(conn, job_id, now)
    changes += descendant_changes
    await announce_changes(conn, changes, wake=True)
    return Redriven(job_id, JobStatus(changes[0].status), [c.job_id for c in descendant_changes])


async def redrive_many(
    conn: AsyncConnection,
    now: datetime,
    policy: PolicyConfig,
    *,
    job_type: str | None = None,
    failure_reasons: Sequence[str] = OWN_FAILURES,
    limit: int,
) -> tuple[list[Redriven], list[tuple[str, str]]]:
    """Re-drive the most recently failed jobs matching the filter, up to `limit`.

    Returns those re-driven and those skipped with the reason (each job is its own
    savepoint, so one that cannot come back does not stop the others). Rows another
    transaction holds are skipped, not waited for.
    """
    query = (
        "SELECT job_id FROM jobs WHERE status = 'failed' AND failure_reason = ANY(CAST(:reasons AS text[]))"
        + (" AND type = :type" if job_type is not None else "")
        + " ORDER BY finished_at DESC, job_id DESC LIMIT :limit FOR UPDATE SKIP LOCKED"
    )
    params: dict[str, Any] = {"reasons": list(failure_reasons), "limit": limit, "type": job_type}
    ids = (await conn.execute(sa.text(query), params)).scalars().all()
    done: list[Redriven] = []
    skipped: list[tuple[str, str]] = []
    for job_id in ids:
        try:
            async with conn.begin_nested():
                done.append(await redrive(conn, job_id, now, policy))
        except QueueError as error:  # e.g. an earlier member's re-drive brought it back
            skipped.append((job_id, error.detail))
    return done, skipped


async def _restore_root(
    conn: AsyncConnection, head: JobHead, reason: str | None, unfinished: int, now: datetime, policy: PolicyConfig
) -> StatusChange:
    target = states.transition(head.job_id, JobStatus.FAILED, states.initial_status(unfinished))
    message = f"re-driven from the dead-letter queue (was {reason}); max_attempts more attempts granted"
    if target is JobStatus.READY:
        # make_ready sets the queue position; failure_reason is cleared after it, because
        # the schema refuses a failed job without one even within one statement.
        [change] = await lifecycle.make_ready(conn, [head], now, policy, event="redriven", message=message)
        status_sql = ""
    else:
        change = head.change(JobStatus.BLOCKED, now)
        status_sql = "status = 'blocked', "
        await write_log(conn, [LogEntry(head.job_id, "redriven", message, now, head.attempts or None)])
    await conn.execute(
        sa.text(
            f"UPDATE jobs SET {status_sql}attempt_budget = attempt_budget + max_attempts,"
            f" unfinished_deps = :unfinished, {_CLEARED}, updated_at = :now WHERE job_id = :id"
        ),
        {"unfinished": unfinished, "now": now, "id": head.job_id},
    )
    return change


async def _restore_descendants(conn: AsyncConnection, root: str, now: datetime) -> list[StatusChange]:
    order = await lifecycle.descendants(conn, root)
    if not order:
        return []
    rows = (
        await conn.execute(
            sa.text(
                f"SELECT {_HEAD}, failure_reason FROM jobs WHERE job_id = ANY(CAST(:ids AS text[]))"
                " ORDER BY job_id FOR UPDATE"
            ),
            {"ids": order},
        )
    ).all()
    heads = {r.job_id: JobHead(r.job_id, r.type, r.priority, r.status, r.attempts) for r in rows}
    parents = await _parent_statuses(conn, order)
    stored = {
        r.job_id: rules.Stored(JobStatus(r.status), FailureReason(r.failure_reason) if r.failure_reason else None)
        for r in rows
    }
    outside = {p for ps in parents.values() for p in ps if p not in stored and p != root}
    for job_id, status in (await _lock_statuses(conn, sorted(outside))).items():
        stored[job_id] = rules.Stored(status)
    stored[root] = rules.Stored(JobStatus.READY)  # coming back, so not completed
    restores = rules.restored_descendants(root, order, parents, stored)
    if not restores:
        return []
    await conn.execute(
        sa.text(
            f"""
            UPDATE jobs SET status = 'blocked', unfinished_deps = u.unfinished, {_CLEARED}, updated_at = :now
            FROM unnest(CAST(:ids AS text[]), CAST(:unfinished AS int[])) AS u(job_id, unfinished)
            WHERE jobs.job_id = u.job_id
            """
        ),
        {"now": now, "ids": [r.job_id for r in restores], "unfinished": [r.unfinished_deps for r in restores]},
    )
    message = f"dependency {root} re-driven; waiting for it again"
    await write_log(conn, [LogEntry(r.job_id, "redriven", message, now, data={"ancestor": root}) for r in restores])
    return [heads[r.job_id].change(JobStatus.BLOCKED, now) for r in restores]


async def _parent_statuses(conn: AsyncConnection, job_ids: Sequence[str]) -> dict[str, list[str]]:
    rows = await conn.execute(
        sa.text(
            "SELECT job_id, depends_on_job_id FROM job_dependencies WHERE job_id = ANY(CAST(:ids AS text[]))"
            " ORDER BY job_id, depends_on_job_id"
        ),
        {"ids": list(job_ids)},
    )
    parents: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        parents[r.job_id].append(r.depends_on_job_id)
    return parents


async def _statuses(conn: AsyncConnection, parents: dict[str, list[str]], job_id: str) -> dict[str, JobStatus]:
    return await _lock_statuses(conn, sorted(parents.get(job_id, [])))


async def _lock_statuses(conn: AsyncConnection, job_ids: Sequence[str]) -> dict[str, JobStatus]:
    """Statuses of dependencies outside the re-drive, read FOR SHARE: a parent that
    completes concurrently waits for our commit, and its unblocking then sees our
    blocked rows and counts them down (the same reasoning as submission's lock)."""
    if not job_ids:
        return {}
    rows = await conn.execute(
        sa.text("SELECT job_id, status FROM jobs WHERE job_id = ANY(CAST(:ids AS text[])) ORDER BY job_id FOR SHARE"),
        {"ids": list(job_ids)},
    )
    return {r.job_id: JobStatus(r.status) for r in rows}
