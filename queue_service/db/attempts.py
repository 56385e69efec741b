"""The attempt lifecycle in SQL: claim what `core.plan()` chooses, end an attempt
(fenced by its lease token), wake due retries, recover expired leases, requeue on
shutdown, cancel. One transaction per call; the caller opens it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from queue_service.core import execution, states
from queue_service.core.errors import QueueError
from queue_service.core.model import AttemptOutcome, JobStatus, Resources, RetryConfig
from queue_service.core.policy import Candidate, PolicyConfig, RunningJob, Start, plan
from queue_service.db import lifecycle
from queue_service.db.events import CANCEL_ATTEMPT, WAKE_DISPATCH, LogEntry, StatusChange, announce, write_log
from queue_service.db.lifecycle import JobHead, epoch, from_epoch

RETRY_WAKE_BATCH = 500  # due retries moved to ready per statement
REAP_BATCH = 100  # expired leases recovered per statement


class JobNotFound(QueueError):
    code = "job_not_found"


class JobTerminal(QueueError):
    code = "job_terminal"


@dataclass(frozen=True)
class Claim:
    """An attempt this node now owns: what the handler needs, and the fencing token."""

    job_id: str
    type: str
    priority: str
    payload: dict[str, Any]
    attempt: int
    lease_token: uuid.UUID
    timeout_seconds: float
    resources: Resources
    backfilled: bool


async def is_paused(conn: AsyncConnection) -> bool:
    return bool((await conn.execute(sa.text("SELECT paused FROM dispatch_control"))).scalar_one_or_none())


async def set_paused(conn: AsyncConnection, paused: bool) -> None:
    await conn.execute(
        sa.text(
            "INSERT INTO dispatch_control (singleton, paused) VALUES (true, :paused) "
            "ON CONFLICT (singleton) DO UPDATE SET paused = EXCLUDED.paused"
        ),
        {"paused": paused},
    )
    if not paused:
        await announce(conn, [{"event": WAKE_DISPATCH}])


async def _running_on(conn: AsyncConnection, node_id: str) -> list[RunningJob]:
    rows = await conn.execute(
        sa.text(
            "SELECT job_id, cpu_units, memory_mb, started_at, timeout_seconds FROM jobs "
            "WHERE status = 'running' AND worker_id = :node"
        ),
        {"node": node_id},
    )
    return [
        RunningJob(r.job_id, Resources(r.cpu_units, r.memory_mb), epoch(r.started_at) + r.timeout_seconds) for r in rows
    ]


async def claim(
    conn: AsyncConnection, node_id: str, clock: Callable[[], datetime], policy: PolicyConfig, lease_seconds: float
) -> list[Claim]:
    """Lock the node and the first K ready jobs (SKIP LOCKED), let core.plan() choose,
    and start what it chose, all in this transaction.

    The clock is read once the node is locked: an attempt that ended while we
    waited for the lock has an earlier end than our starts, so attempt intervals
    on a node never appear to overlap beyond its capacity.
    """
    node = (
        await conn.execute(
            sa.text("SELECT cpu_capacity, memory_capacity, status FROM nodes WHERE node_id = :node FOR UPDATE"),
            {"node": node_id},
        )
    ).one_or_none()
    if node is None or node.status != "active" or await is_paused(conn):
        return []
    now = clock()
    rows = (
        await conn.execute(
            sa.text(
                "SELECT job_id, sort_key, cpu_units, memory_mb, timeout_seconds FROM jobs WHERE status = 'ready' "
                "ORDER BY sort_key, job_id LIMIT :window FOR UPDATE SKIP LOCKED"
            ),
            {"window": policy.candidate_window},
        )
    ).all()
    if not rows:
        return []
    candidates = [Candidate(r.job_id, r.sort_key, Resources(r.cpu_units, r.memory_mb), r.timeout_seconds) for r in rows]
    capacity = Resources(node.cpu_capacity, node.memory_capacity)
    starts = plan(epoch(now), candidates, await _running_on(conn, node_id), capacity, policy)
    if not starts:
        return []
    return await _start(conn, node_id, starts, now, lease_seconds)


async def _start(
    conn: AsyncConnection, node_id: str, starts: list[Start], now: datetime, lease_seconds: float
) -> list[Claim]:
    tokens = {s.job_id: uuid.uuid4() for s in starts}
    lease_until = now + timedelta(seconds=lease_seconds)
    rows = (
        await conn.execute(
            sa.text(
                """
                UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = :now, worker_id = :node,
                                lease_token = t.token, lease_expires_at = :lease_until, updated_at = :now
                FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS uuid[])) AS t(job_id, token)
                WHERE jobs.job_id = t.job_id
                RETURNING jobs.job_id, type, priority, payload, attempts, timeout_seconds, cpu_units, memory_mb
                """
            ),
            {
                "now": now,
                "node": node_id,
                "lease_until": lease_until,
                "ids": list(tokens),
                "tokens": list(tokens.values()),
            },
        )
    ).all()
    by_id = {r.job_id: r for r in rows}
    await conn.execute(
        sa.text(
            "INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token) "
            "SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:numbers AS int[]), CAST(:nodes AS text[]), "
            "CAST(:starts AS timestamptz[]), CAST(:tokens AS uuid[]))"
        ),
        {
            "ids": [s.job_id for s in starts],
            "numbers": [by_id[s.job_id].attempts for s in starts],
            "nodes": [node_id] * len(starts),
            "starts": [now] * len(starts),
            "tokens": [tokens[s.job_id] for s in starts],
        },
    )
    # The node's CHECK refuses use above capacity: the database itself never oversubscribes.
    total = Resources(sum(s.resources.cpu_units for s in starts), sum(s.resources.memory_mb for s in starts))
    await conn.execute(
        sa.text(
            "UPDATE nodes SET cpu_used = cpu_used + :cpu, memory_used = memory_used + :memory WHERE node_id = :node"
        ),
        {"cpu": total.cpu_units, "memory": total.memory_mb, "node": node_id},
    )
    entries, changes, claims = [], [], []
    for start in starts:
        row = by_id[start.job_id]
        how = f"backfilled past {start.passed.job_id}" if start.passed else "in queue order"
        data = {"node": node_id, "cpu_units": row.cpu_units, "memory_mb": row.memory_mb, "backfill": start.backfilled}
        entries.append(LogEntry(row.job_id, "dispatched", f"to {node_id} ({how})", now, row.attempts, data=data))
        entries.append(LogEntry(row.job_id, "started", f"attempt {row.attempts} started", now, row.attempts))
        changes.append(StatusChange(row.job_id, row.type, row.priority, "running", "ready", row.attempts, now))
        claims.append(
            Claim(
                row.job_id,
                row.type,
                row.priority,
                row.payload,
                row.attempts,
                tokens[row.job_id],
                row.timeout_seconds,
                start.resources,
                start.backfilled,
            )
        )
    await write_log(conn, entries)
    await announce(conn, [c.payload() for c in changes])
    return claims


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt ended, as the worker (or the reaper, or shutdown) reports it."""

    outcome: AttemptOutcome
    error: str | None = None
    result: Any = None


_RUNNING_ROW = """
    SELECT job_id, type, priority, status, attempts, counted_attempts, attempt_budget, worker_id, cpu_units, memory_mb,
           max_attempts, backoff_multiplier, initial_delay_seconds, max_delay_seconds, jitter, lease_token
    FROM jobs WHERE job_id = :id AND status = 'running' {fence} FOR UPDATE
"""


async def end_attempt(
    conn: AsyncConnection,
    job_id: str,
    lease_token: uuid.UUID | None,
    end: AttemptEnd,
    now: datetime,
    policy: PolicyConfig,
) -> bool:
    """Record how the attempt ended and move the job on. With a token, only the
    attempt's owner may end it (fencing): a stale worker gets False and changes nothing."""
    fence = "AND lease_token = :token" if lease_token is not None else ""
    row = (
        await conn.execute(sa.text(_RUNNING_ROW.format(fence=fence)), {"id": job_id, "token": lease_token})
    ).one_or_none()
    if row is None:
        return False
    head = JobHead(row.job_id, row.type, row.priority, row.status, row.attempts)
    await conn.execute(
        sa.text(
            "UPDATE job_attempts SET ended_at = :now, outcome = :outcome, error = :error "
            "WHERE job_id = :id AND attempt = :attempt"
        ),
        {"now": now, "outcome": end.outcome.value, "error": end.error, "id": job_id, "attempt": row.attempts},
    )
    await lifecycle.release(conn, row.worker_id, Resources(row.cpu_units, row.memory_mb))
    if end.outcome is AttemptOutcome.SUCCEEDED:
        changes = await _complete(conn, head, end, now, policy)
    elif end.outcome is AttemptOutcome.INTERRUPTED:
        changes = await _requeue(conn, head, now)
    else:
        changes = await _after_failure(conn, row, head, end, now)
    await announce(conn, [*(c.payload() for c in changes), {"event": WAKE_DISPATCH}])
    return True


_CLEAR_LEASE = "lease_token = NULL, lease_expires_at = NULL"


async def _complete(
    conn: AsyncConnection, head: JobHead, end: AttemptEnd, now: datetime, policy: PolicyConfig
) -> list[StatusChange]:
    states.transition(head.job_id, JobStatus(head.status), JobStatus.COMPLETED)
    await conn.execute(
        sa.text(
            f"UPDATE jobs SET status = 'completed', finished_at = :now, updated_at = :now, result = :result, "
            f"last_error = NULL, {_CLEAR_LEASE} WHERE job_id = :id"
        ).bindparams(sa.bindparam("result", type_=sa.JSON)),
        {"now": now, "result": end.result, "id": head.job_id},
    )
    await write_log(
        conn, [LogEntry(head.job_id, "succeeded", f"attempt {head.attempts} succeeded", now, head.attempts)]
    )
    return [head.change(JobStatus.COMPLETED, now), *await lifecycle.unblock_dependants(conn, head.job_id, now, policy)]


async def _requeue(conn: AsyncConnection, head: JobHead, now: datetime) -> list[StatusChange]:
    """Graceful shutdown: back to ready at its old queue position; the attempt does
    not count against max_attempts."""
    states.transition(head.job_id, JobStatus(head.status), JobStatus.READY)
    await conn.execute(
        sa.text(f"UPDATE jobs SET status = 'ready', updated_at = :now, {_CLEAR_LEASE} WHERE job_id = :id"),
        {"now": now, "id": head.job_id},
    )
    message = f"attempt {head.attempts} interrupted by shutdown; back in the queue"
    await write_log(conn, [LogEntry(head.job_id, "requeued", message, now, head.attempts, level="warning")])
    return [head.change(JobStatus.READY, now)]


_FAILURE_EVENTS = {AttemptOutcome.TIMED_OUT: "timed_out", AttemptOutcome.WORKER_LOST: "worker_lost"}


async def _after_failure(
    conn: AsyncConnection, row: Any, head: JobHead, end: AttemptEnd, now: datetime
) -> list[StatusChange]:
    counted = row.counted_attempts + 1
    retry = RetryConfig(
        row.attempt_budget, row.backoff_multiplier, row.initial_delay_seconds, row.max_delay_seconds, row.jitter
    )
    decision = execution.after_failed_attempt(
        job_id=head.job_id,
        retry=retry,
        attempt=head.attempts,
        counted_attempts=counted,
        permanent=end.outcome is AttemptOutcome.PERMANENT_FAILURE,
        failed_at=epoch(now),
    )
    error = end.error or end.outcome.value
    entries = [
        LogEntry(
            head.job_id,
            _FAILURE_EVENTS.get(end.outcome, "attempt_failed"),
            f"attempt {head.attempts}: {error}",
            now,
            head.attempts,
            level="error",
            data={"outcome": end.outcome.value},
        )
    ]
    params = {"id": head.job_id, "now": now, "counted": counted, "error": error}
    if isinstance(decision, execution.RetryAt):
        states.transition(head.job_id, JobStatus(head.status), JobStatus.RETRYING)
        await conn.execute(
            sa.text(
                f"UPDATE jobs SET status = 'retrying', counted_attempts = :counted, last_error = :error, "
                f"next_attempt_at = :due, updated_at = :now, {_CLEAR_LEASE} WHERE job_id = :id"
            ),
            {**params, "due": from_epoch(decision.next_attempt_at)},
        )
        entries.append(
            LogEntry(
                head.job_id,
                "retry_scheduled",
                f"attempt {head.attempts + 1} in {decision.delay_seconds:.3f}s",
                now,
                head.attempts,
                data={"delay_seconds": decision.delay_seconds},
            )
        )
        await write_log(conn, entries)
        return [head.change(JobStatus.RETRYING, now)]
    states.transition(head.job_id, JobStatus(head.status), JobStatus.FAILED)
    await conn.execute(
        sa.text(
            f"UPDATE jobs SET status = 'failed', counted_attempts = :counted, last_error = :error, "
            f"failure_reason = :reason, finished_at = :now, updated_at = :now, {_CLEAR_LEASE} WHERE job_id = :id"
        ),
        {**params, "reason": decision.reason.value},
    )
    entries.append(
        LogEntry(head.job_id, "failed", f"failed: {decision.reason.value}", now, head.attempts, level="error")
    )
    await write_log(conn, entries)
    return [
        head.change(JobStatus.FAILED, now),
        *await lifecycle.propagate_end(conn, head.job_id, JobStatus.FAILED, now),
    ]


async def wake_due_retries(conn: AsyncConnection, now: datetime, policy: PolicyConfig) -> int:
    """Move retrying jobs whose backoff has elapsed to ready (partial index on next_attempt_at)."""
    rows = (
        await conn.execute(
            sa.text(
                "SELECT job_id, type, priority, status, attempts FROM jobs "
                "WHERE status = 'retrying' AND next_attempt_at <= :now "
                "ORDER BY next_attempt_at LIMIT :batch FOR UPDATE SKIP LOCKED"
            ),
            {"now": now, "batch": RETRY_WAKE_BATCH},
        )
    ).all()
    heads = [JobHead(r.job_id, r.type, r.priority, r.status, r.attempts) for r in rows]
    changes = await lifecycle.make_ready(conn, heads, now, policy, event="ready", message="backoff elapsed")
    if changes:
        await announce(conn, [*(c.payload() for c in changes), {"event": WAKE_DISPATCH}])
    return len(changes)


async def next_retry_due(conn: AsyncConnection) -> datetime | None:
    return (
        await conn.execute(
            sa.text("SELECT next_attempt_at FROM jobs WHERE status = 'retrying' ORDER BY next_attempt_at LIMIT 1")
        )
    ).scalar_one_or_none()


async def reap_expired_leases(conn: AsyncConnection, now: datetime, policy: PolicyConfig) -> list[str]:
    """Attempts whose worker stopped renewing the lease count as failed (worker_lost):
    resources freed on that node, the job retried or failed by the usual rules."""
    rows = (
        await conn.execute(
            sa.text(
                "SELECT job_id FROM jobs WHERE status = 'running' AND lease_expires_at < :now "
                "ORDER BY lease_expires_at LIMIT :batch FOR UPDATE SKIP LOCKED"
            ),
            {"now": now, "batch": REAP_BATCH},
        )
    ).all()
    recovered = []
    for row in rows:
        end = AttemptEnd(AttemptOutcome.WORKER_LOST, "lease expired: the worker stopped renewing it")
        if await end_attempt(conn, row.job_id, None, end, now, policy):
            recovered.append(row.job_id)
    return recovered


async def renew_leases(
    conn: AsyncConnection, node_id: str, tokens: list[uuid.UUID], now: datetime, lease_seconds: float
) -> set[uuid.UUID]:
    """Extend this node's live leases; returns the tokens still held (a cancelled or
    reaped attempt's token is gone, and its task should stop).

    Job rows are locked before the node row, the order every other command uses
    (end an attempt: job, then its node), so a heartbeat never deadlocks with them.
    """
    held: set[uuid.UUID] = set()
    if tokens:
        rows = await conn.execute(
            sa.text(
                "UPDATE jobs SET lease_expires_at = :until WHERE status = 'running' AND worker_id = :node "
                "AND lease_token = ANY(CAST(:tokens AS uuid[])) RETURNING lease_token"
            ),
            {"until": now + timedelta(seconds=lease_seconds), "node": node_id, "tokens": tokens},
        )
        held = {r.lease_token for r in rows}
    await conn.execute(
        sa.text("UPDATE nodes SET heartbeat_at = :now WHERE node_id = :node"), {"now": now, "node": node_id}
    )
    return held


async def cancel_job(conn: AsyncConnection, job_id: str, now: datetime) -> list[StatusChange]:
    """Cancel a job at once; a running attempt is ended here (resources freed) and
    its worker is told to stop the task. Descendants still waiting are cancelled too."""
    row = (
        await conn.execute(
            sa.text(f"{_RUNNING_ROW.format(fence='')}".replace("AND status = 'running' ", "")),
            {"id": job_id},
        )
    ).one_or_none()
    if row is None:
        raise JobNotFound(f"no job {job_id!r}")
    status = JobStatus(row.status)
    if status.is_terminal:
        raise JobTerminal(f"job {job_id!r} is already {status.value}")
    states.transition(job_id, status, JobStatus.CANCELLED)
    head = JobHead(row.job_id, row.type, row.priority, row.status, row.attempts)
    messages: list[dict[str, Any]] = []
    if status is JobStatus.RUNNING:
        await conn.execute(
            sa.text(
                "UPDATE job_attempts SET ended_at = :now, outcome = 'cancelled', error = 'cancelled by user' "
                "WHERE job_id = :id AND attempt = :attempt"
            ),
            {"now": now, "id": job_id, "attempt": row.attempts},
        )
        await lifecycle.release(conn, row.worker_id, Resources(row.cpu_units, row.memory_mb))
        messages.append({"event": CANCEL_ATTEMPT, "job_id": job_id, "node_id": row.worker_id, "attempt": row.attempts})
    await conn.execute(
        sa.text(
            f"UPDATE jobs SET status = 'cancelled', cancel_reason = 'user', finished_at = :now, updated_at = :now, "
            f"next_attempt_at = NULL, {_CLEAR_LEASE} WHERE job_id = :id"
        ),
        {"now": now, "id": job_id},
    )
    await write_log(
        conn, [LogEntry(job_id, "cancelled", "cancelled by user", now, row.attempts or None, level="warning")]
    )
    changes = [
        head.change(JobStatus.CANCELLED, now),
        *await lifecycle.propagate_end(conn, job_id, JobStatus.CANCELLED, now),
    ]
    await announce(conn, [*(c.payload() for c in changes), *messages, {"event": WAKE_DISPATCH}])
    return changes
