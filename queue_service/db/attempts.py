"""The attempt lifecycle in SQL: claim what `core.plan()` chooses, end an attempt
(fenced by its lease token), wake due retries, recover expired leases, requeue on
shutdown, cancel. One transaction per call; the caller opens it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from queue_service.core import execution, states
from queue_service.core.errors import QueueError
from queue_service.core.model import ZERO, AttemptOutcome, JobStatus, Resources, RetryConfig
from queue_service.core.policy import Candidate, PolicyConfig, RunningJob, Start, first_read, is_complete, plan
from queue_service.db import driver, lifecycle, tables
from queue_service.db.events import (
    CANCEL_ATTEMPT,
    CHANNEL,
    DISPATCH_PAUSED,
    DISPATCH_RESUMED,
    LOG_INSERT_SQL,
    WAKE_DISPATCH,
    LogEntry,
    StatusChange,
    announce,
    compact_json,
    iso_z,
    log_arrays,
    write_log,
)
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
    ready_at: datetime  # when it entered the queue this time: its wait ends now
    started_at: datetime


@dataclass(frozen=True)
class Queued:
    """A ready job as a claim plans and starts it: a row of the window `ready_window`
    reads, or what a submission announced of a job it queued (see events.StatusChange)."""

    job_id: str
    type: str
    priority: str
    attempts: int
    sort_key: float
    cpu_units: int
    memory_mb: int
    timeout_seconds: float
    ready_at: datetime


@dataclass(frozen=True)
class ClaimRound:
    """What a claim started (None: dispatch is paused), and the window it planned
    over; `whole_queue` when that window held every ready job (it read fewer than it
    asked for)."""

    claims: list[Claim] | None
    window: Sequence[Any]  # rows with Queued's fields
    whole_queue: bool


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
    await announce(conn, [{"event": DISPATCH_RESUMED if not paused else DISPATCH_PAUSED}])


# What a claim plans from, in one round trip: the node, the pause switch, what already
# runs on the node, and the first `window` ready jobs in queue order (none when paused or
# the node is not active). Nothing is locked: a claim's starts are checked where they are
# written (_START_SQL), and the node serialises its own claims (`worker.node`). A job
# that ended since still counts as running, which only makes the plan more careful.
# What runs comes with the window's first row only: repeated on each, a 64-unit node's
# read sent and decoded the same array of 64 running jobs some forty times a round.
_READ_SQL = driver.Statement(
    sa.text(
        """
    SELECT n.cpu_capacity, n.memory_capacity, n.status, d.paused,
           CASE WHEN w.place IS NULL OR w.place = 1 THEN r.running END AS running,
           w.job_id, w.type, w.priority, w.attempts, w.sort_key, w.cpu_units, w.memory_mb, w.timeout_seconds,
           w.ready_at
    FROM nodes AS n CROSS JOIN dispatch_control AS d
    CROSS JOIN LATERAL (
        SELECT coalesce(json_agg(json_build_array(
                   j.job_id, j.cpu_units, j.memory_mb, extract(epoch FROM j.started_at) + j.timeout_seconds)),
               '[]') AS running
        FROM jobs AS j WHERE j.status = 'running' AND j.worker_id = n.node_id
    ) AS r
    LEFT JOIN LATERAL (
        SELECT q.*, row_number() OVER () AS place
        FROM ready_window(CASE WHEN d.paused OR n.status <> 'active' THEN 0 ELSE :window END) AS q
    ) AS w ON true
    WHERE n.node_id = :node
    """
    )
)

# More of the window, when the first read left the node room (policy.is_complete).
_WINDOW_SQL = driver.Statement(sa.text("SELECT * FROM ready_window(:window)"))

# Starting the chosen jobs is one statement: the jobs, their attempt rows and the node's
# use from arrays, and the log entries and announcements (delivered at commit) the
# function `start_attempts` builds from them (migrations 0006 and 0007). It keeps one
# generic plan where the statement sent as such was planned again at every execution.
_START_SQL = driver.Statement(
    sa.text(
        """
    SELECT started_payloads AS payloads, announcements AS announced FROM start_attempts(
        CAST(:ids AS text[]), CAST(:tokens AS uuid[]), CAST(:numbers AS integer[]), CAST(:cpu AS integer[]),
        CAST(:memory AS integer[]), CAST(:passed AS text[]), CAST(:now AS timestamptz), CAST(:at AS text),
        CAST(:node AS text), CAST(:lease_until AS timestamptz), CAST(:channel AS text)
    )
    """
    )
)


async def claim_round(
    conn: driver.Executor,
    node_id: str,
    clock: Callable[[], datetime],
    policy: PolicyConfig,
    lease_seconds: float,
    *,
    first_window: int | None = None,
) -> ClaimRound:
    """Read the node and the first ready jobs, let core.plan() choose, and start what it
    chose: two statements, which need no transaction around them. Its claims are None
    when dispatch is paused: nothing starts anywhere until it is resumed.

    The caller serialises the claims of one node (two at once would plan the same free
    capacity; the node's CHECK would refuse the second's starts). `first_window` is how
    many candidates to read first (core.first_read over what the caller knows runs; by
    default the fewest it reads); the whole window is read only when those leave the
    node room. The clock is read after the node: an attempt whose end that read saw has
    an earlier end than our starts, so attempt intervals on a node never appear to
    overlap beyond its capacity.
    """
    asked = first_read(ZERO, [], policy) if first_window is None else first_window  # nothing known: the fewest
    rows = await driver.fetch(conn, _READ_SQL, {"node": node_id, "window": asked})
    if not rows:
        return ClaimRound([], [], False)
    node = rows[0]
    if node.paused:
        return ClaimRound(None, [], False)
    if node.status != "active":
        return ClaimRound([], [], False)
    now = clock()
    running_now = next(row.running for row in rows if row.running is not None)
    running = [RunningJob(job_id, Resources(cpu, memory), end) for job_id, cpu, memory, end in running_now]
    capacity = Resources(node.cpu_capacity, node.memory_capacity)
    window = [row for row in rows if row.job_id is not None]
    while True:
        candidates = [
            Candidate(r.job_id, r.sort_key, Resources(r.cpu_units, r.memory_mb), r.timeout_seconds) for r in window
        ]
        starts = plan(epoch(now), candidates, running, capacity, policy)
        if is_complete(starts, running, capacity, len(window), asked, policy):
            break
        asked = policy.candidate_window
        window = await driver.fetch(conn, _WINDOW_SQL, {"window": asked})
    claims = await start_planned(conn, node_id, starts, {r.job_id: r for r in window}, now, lease_seconds)
    return ClaimRound(claims, window, len(window) < asked)


async def start_planned(
    conn: driver.Executor,
    node_id: str,
    starts: list[Start],
    queued: Mapping[str, Any],
    now: datetime,
    lease_seconds: float,
) -> list[Claim]:
    """Start what core.plan() chose among `queued` (Queued, or rows with its fields)
    on this node, in one statement: a job only if it is still ready with the attempts
    `queued` gives, and only while the node is active and dispatch is not paused (else
    it is not among the claims). The node's CHECK refuses use beyond its capacity."""
    if not starts:
        return []
    tokens = {s.job_id: uuid.uuid4() for s in starts}
    numbers = {s.job_id: queued[s.job_id].attempts + 1 for s in starts}  # _START_SQL starts it only if still so
    # The function writes each start's `dispatched` and `started` entries and its
    # job.updated (events.StatusChange's payload, with `at` as iso_z renders it).
    result = await driver.one(
        conn,
        _START_SQL,
        {
            "ids": list(tokens),
            "tokens": list(tokens.values()),
            "numbers": list(numbers.values()),
            "cpu": [s.resources.cpu_units for s in starts],
            "memory": [s.resources.memory_mb for s in starts],
            "passed": [s.passed.job_id if s.passed else None for s in starts],
            "now": now,
            "at": iso_z(now),
            "node": node_id,
            "lease_until": now + timedelta(seconds=lease_seconds),
            "channel": CHANNEL,
        },
    )
    started = result.payloads or {}  # a job another node started meanwhile is not among them
    return [
        Claim(
            start.job_id,
            queued[start.job_id].type,
            queued[start.job_id].priority,
            started[start.job_id],
            numbers[start.job_id],
            tokens[start.job_id],
            queued[start.job_id].timeout_seconds,
            start.resources,
            start.backfilled,
            queued[start.job_id].ready_at,
            now,
        )
        for start in starts
        if start.job_id in started
    ]


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt ended, as the worker (or the reaper, or shutdown) reports it."""

    outcome: AttemptOutcome
    error: str | None = None
    result: Any = None


# The ended jobs still running, locked in id order (as every writer locks jobs).
# "Running" is read from the lease (held exactly while running: CHECK
# lease_held_iff_running), so that only the primary key can serve the ids: asked by
# status, a generic plan made from statistics that call running jobs rare took the
# status index and walked every dead 'running' entry a drain leaves behind (2,500
# pages and 8-17 ms for 64 jobs).
_RUNNING_ROWS_SQL = driver.Statement(
    sa.text(
        """
    SELECT job_id, type, priority, status, attempts, counted_attempts, attempt_budget, worker_id, cpu_units, memory_mb,
           max_attempts, backoff_multiplier, initial_delay_seconds, max_delay_seconds, jitter, lease_token
    FROM jobs WHERE job_id = ANY(CAST(:ids AS text[])) AND lease_token IS NOT NULL ORDER BY job_id FOR UPDATE
    """
    )
)
_CLEAR_LEASE = "lease_token = NULL, lease_expires_at = NULL"
_FAILURE_EVENTS = {AttemptOutcome.TIMED_OUT: "timed_out", AttemptOutcome.WORKER_LOST: "worker_lost"}


@dataclass(frozen=True)
class Ending:
    """One attempt's end to record. With a lease token, only the attempt's owner may
    end it (fencing); without one (the reaper), whoever holds the row may."""

    job_id: str
    lease_token: uuid.UUID | None
    end: AttemptEnd


async def end_attempt(
    conn: driver.Executor,
    job_id: str,
    lease_token: uuid.UUID | None,
    end: AttemptEnd,
    now: datetime,
    policy: PolicyConfig,
) -> bool:
    """Record how one attempt ended; False (and nothing changed) for a stale owner."""
    (owned,) = await end_attempts(conn, [Ending(job_id, lease_token, end)], now, policy)
    return owned


def _json_result(result: Any) -> str:
    """The handler's result as JSON; what JSON cannot hold is kept as its repr."""
    if result is None:  # most handlers return nothing
        return "null"
    try:
        return json.dumps(result)
    except (TypeError, ValueError):
        return json.dumps({"unserialisable_result": repr(result)[:1000]})


@dataclass
class _Outcomes:
    """What a batch of endings does, grouped so each kind is one statement."""

    completed: list[tuple[str, str]] = field(default_factory=list)  # job id, result JSON
    requeued: list[str] = field(default_factory=list)
    retrying: list[tuple[str, int, str, datetime]] = field(default_factory=list)
    failed: list[tuple[str, int, str, str]] = field(default_factory=list)
    entries: list[LogEntry] = field(default_factory=list)
    changes: list[StatusChange] = field(default_factory=list)


async def end_attempts(
    conn: driver.Executor, endings: Sequence[Ending], now: datetime, policy: PolicyConfig
) -> list[bool]:
    """Record how attempts ended and move their jobs on, in one round of statements
    for the whole batch (each kind of change is one set-based statement). Returns,
    per ending, whether it was recorded (False: the caller no longer owns it)."""
    rows = await driver.fetch(conn, _RUNNING_ROWS_SQL, {"ids": sorted({e.job_id for e in endings})})
    by_id = {row.job_id: row for row in rows}
    owned: dict[str, tuple[Any, AttemptEnd]] = {}
    for ending in endings:
        row = by_id.get(ending.job_id)
        if row is not None and ending.job_id not in owned and ending.lease_token in (None, row.lease_token):
            owned[ending.job_id] = (row, ending.end)
    if owned:
        outcomes = _Outcomes()
        for row, end in owned.values():
            _decide(outcomes, row, end, now)
        await _apply_unsuccessful(conn, outcomes, now)
        waiting = await _close(conn, list(owned.values()), outcomes, now, wake=not outcomes.failed)
        later: list[StatusChange] = []
        if waiting:
            later += await lifecycle.unblock_dependants(conn, [job_id for job_id, _ in outcomes.completed], now, policy)
        for job_id, *_ in outcomes.failed:
            later += await lifecycle.propagate_end(conn, job_id, JobStatus.FAILED, now)
        if waiting or outcomes.failed:
            await announce(conn, [*(c.payload() for c in later), {"event": WAKE_DISPATCH}])
    return [ending.job_id in owned and owned[ending.job_id][1] is ending.end for ending in endings]


# Each change's notice, then the wake-up if asked and no completed job has dependants
# (their release wakes the dispatchers instead).
_CLOSE_NOTICES: Final = """SELECT n.payload, n.place
    FROM waiting CROSS JOIN LATERAL unnest(
        CAST(:notices AS text[])
        || CASE WHEN CAST(:wake AS boolean) AND NOT waiting.found THEN ARRAY[CAST(:wake_payload AS text)] END
    ) WITH ORDINALITY AS n(payload, place)"""


# The rest of recording a batch of endings, after any retrying, failed or requeued jobs
# are written: one statement, so the common batch (every attempt succeeded, no job
# waiting on them) costs four round trips with BEGIN and COMMIT where it took nine.
# It ends the attempt rows, gives the nodes back what they held, completes the
# succeeded jobs, writes the log and announces the changes (delivered at commit, in
# order), and answers whether any completed job has dependants. Its snapshot is taken
# after _RUNNING_ROWS_SQL locked the jobs, so it sees every edge a submitter committed
# while holding its share lock (see jobs._lock_dependencies). Without dependants to
# count down (or failures to propagate, when `wake` is false) it also wakes the dispatchers.
_CLOSE_SQL = driver.Statement(
    sa.text(
        f"""
    WITH closed AS (
        UPDATE job_attempts AS a SET ended_at = :now, outcome = u.outcome, error = u.error
        FROM unnest(CAST(:ids AS text[]), CAST(:numbers AS int[]), CAST(:outcomes AS text[]),
                    CAST(:errors AS text[])) AS u(job_id, attempt, outcome, error)
        WHERE a.job_id = u.job_id AND a.attempt = u.attempt
    ), released AS (
        {lifecycle.RELEASE_SQL}
    ), completed AS (
        UPDATE jobs SET status = 'completed', finished_at = :now, updated_at = :now,
                        result = CAST(u.result AS jsonb), last_error = NULL, {_CLEAR_LEASE}
        FROM unnest(CAST(:completed_ids AS text[]), CAST(:results AS text[])) AS u(job_id, result)
        WHERE jobs.job_id = u.job_id
    ), logged AS (
        {LOG_INSERT_SQL}
    ), waiting AS (
        SELECT EXISTS (
            SELECT FROM job_dependencies WHERE depends_on_job_id = ANY(CAST(:completed_ids AS text[]))
        ) AS found
    ), announced AS (
        {tables.grouped_notify_sql(_CLOSE_NOTICES)}
    )
    SELECT (SELECT found FROM waiting) AS waiting, (SELECT count(*) FROM announced) AS announced
    """
    )
)


async def _close(
    conn: driver.Executor, owned: list[tuple[Any, AttemptEnd]], outcomes: _Outcomes, now: datetime, *, wake: bool
) -> bool:
    """_CLOSE_SQL for these attempts; True when a completed job has dependants."""
    freed: dict[str, Resources] = {}
    for row, _ in owned:
        freed[row.worker_id] = freed.get(row.worker_id, ZERO) + Resources(row.cpu_units, row.memory_mb)
    entries = outcomes.entries
    result = await driver.one(
        conn,
        _CLOSE_SQL,
        {
            "now": now,
            "ids": [row.job_id for row, _ in owned],
            "numbers": [row.attempts for row, _ in owned],
            "outcomes": [end.outcome.value for _, end in owned],
            "errors": [end.error for _, end in owned],
            **lifecycle.release_arrays(freed),
            "completed_ids": [job_id for job_id, _ in outcomes.completed],
            "results": [result for _, result in outcomes.completed],
            **log_arrays(entries),
            "channel": CHANNEL,
            "notices": [compact_json(c.payload()) for c in outcomes.changes],
            "wake": wake,
            "wake_payload": compact_json({"event": WAKE_DISPATCH}),
        },
    )
    return bool(result.waiting)


def _decide(outcomes: _Outcomes, row: Any, end: AttemptEnd, now: datetime) -> None:
    """Where one job goes after its attempt, as core decides."""
    head = JobHead(row.job_id, row.type, row.priority, row.status, row.attempts)
    current = JobStatus(row.status)
    if end.outcome is AttemptOutcome.SUCCEEDED:
        outcomes.changes.append(head.change(states.transition(head.job_id, current, JobStatus.COMPLETED), now))
        outcomes.completed.append((head.job_id, _json_result(end.result)))  # its attempt's end logs it
        return
    if end.outcome is AttemptOutcome.INTERRUPTED:
        # Graceful shutdown: back to ready at its old queue position; the attempt
        # keeps its number and does not count against max_attempts.
        outcomes.changes.append(head.change(states.transition(head.job_id, current, JobStatus.READY), now))
        outcomes.requeued.append(head.job_id)
        message = f"attempt {head.attempts} interrupted by shutdown; back in the queue"
        outcomes.entries.append(LogEntry(head.job_id, "requeued", message, now, head.attempts, level="warning"))
        return
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
    event = _FAILURE_EVENTS.get(end.outcome, "attempt_failed")
    data = {"outcome": end.outcome.value}
    outcomes.entries.append(
        LogEntry(head.job_id, event, f"attempt {head.attempts}: {error}", now, head.attempts, level="error", data=data)
    )
    if isinstance(decision, execution.RetryAt):
        outcomes.changes.append(head.change(states.transition(head.job_id, current, JobStatus.RETRYING), now))
        outcomes.retrying.append((head.job_id, counted, error, from_epoch(decision.next_attempt_at)))
        message = f"attempt {head.attempts + 1} in {decision.delay_seconds:.3f}s"
        data_retry = {"delay_seconds": decision.delay_seconds}
        outcomes.entries.append(LogEntry(head.job_id, "retry_scheduled", message, now, head.attempts, data=data_retry))
        return
    outcomes.changes.append(head.change(states.transition(head.job_id, current, JobStatus.FAILED), now))
    outcomes.failed.append((head.job_id, counted, error, decision.reason.value))
    message = f"failed: {decision.reason.value}"
    outcomes.entries.append(LogEntry(head.job_id, "failed", message, now, head.attempts, level="error"))


_REQUEUE_SQL: Final = driver.Statement(
    sa.text(
        f"UPDATE jobs SET status = 'ready', updated_at = :now, {_CLEAR_LEASE} WHERE job_id = ANY(CAST(:ids AS text[]))"
    )
)
_RETRYING_SQL: Final = driver.Statement(
    sa.text(
        f"""
    UPDATE jobs SET status = 'retrying', counted_attempts = u.counted, last_error = u.error,
                    next_attempt_at = u.due, updated_at = :now, {_CLEAR_LEASE}
    FROM unnest(CAST(:ids AS text[]), CAST(:counted AS int[]), CAST(:errors AS text[]),
                CAST(:due AS timestamptz[])) AS u(job_id, counted, error, due)
    WHERE jobs.job_id = u.job_id
    """
    )
)
_FAILED_SQL: Final = driver.Statement(
    sa.text(
        f"""
    UPDATE jobs SET status = 'failed', counted_attempts = u.counted, last_error = u.error,
                    failure_reason = u.reason, finished_at = :now, updated_at = :now, {_CLEAR_LEASE}
    FROM unnest(CAST(:ids AS text[]), CAST(:counted AS int[]), CAST(:errors AS text[]),
                CAST(:reasons AS text[])) AS u(job_id, counted, error, reason)
    WHERE jobs.job_id = u.job_id
    """
    )
)


async def _apply_unsuccessful(conn: driver.Executor, outcomes: _Outcomes, now: datetime) -> None:
    """Jobs whose attempt did not succeed: one statement per kind, whatever the batch size
    (completions, attempts, nodes and the log are _CLOSE_SQL's)."""
    if outcomes.requeued:
        await driver.execute(conn, _REQUEUE_SQL, {"now": now, "ids": outcomes.requeued})
    if outcomes.retrying:
        ids, counted, errors, due = zip(*outcomes.retrying, strict=True)
        await driver.execute(
            conn,
            _RETRYING_SQL,
            {"now": now, "ids": list(ids), "counted": list(counted), "errors": list(errors), "due": list(due)},
        )
    if outcomes.failed:
        ids, counted, errors, reasons = zip(*outcomes.failed, strict=True)
        await driver.execute(
            conn,
            _FAILED_SQL,
            {"now": now, "ids": list(ids), "counted": list(counted), "errors": list(errors), "reasons": list(reasons)},
        )


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

    Job rows are locked in id order and before the node row, the order every other
    command uses (end an attempt: its job, then its node), so a heartbeat never
    deadlocks with them. A bare UPDATE would lock them in the order it finds them on
    disk, and deadlocked with the recorder ending the same node's attempts.
    """
    held: set[uuid.UUID] = set()
    if tokens:
        rows = await conn.execute(
            sa.text(
                """
                UPDATE jobs SET lease_expires_at = :until
                FROM (
                    SELECT job_id FROM jobs
                    WHERE status = 'running' AND worker_id = :node AND lease_token = ANY(CAST(:tokens AS uuid[]))
                    ORDER BY job_id FOR UPDATE
                ) AS renewed
                WHERE jobs.job_id = renewed.job_id
                RETURNING jobs.lease_token
                """
            ),
            {"until": now + timedelta(seconds=lease_seconds), "node": node_id, "tokens": tokens},
        )
        held = {r.lease_token for r in rows}
    # A node the reaper gave up on comes back with its first heartbeat.
    await conn.execute(
        sa.text(
            "UPDATE nodes SET heartbeat_at = :now, status = CASE WHEN status = 'lost' THEN 'active' ELSE status END "
            "WHERE node_id = :node"
        ),
        {"now": now, "node": node_id},
    )
    return held


async def mark_lost_nodes(conn: AsyncConnection, now: datetime, lease_seconds: float) -> list[str]:
    """Nodes silent for a whole lease (killed, cut off) are `lost`: no longer counted as
    live capacity, shown or offered work. Their running attempts are the reaper's."""
    rows = await conn.execute(
        sa.text(
            "UPDATE nodes SET status = 'lost' WHERE status IN ('active', 'draining') AND heartbeat_at < :cutoff "
            "RETURNING node_id"
        ),
        {"cutoff": now - timedelta(seconds=lease_seconds)},
    )
    return sorted(row.node_id for row in rows)


async def cancel_job(conn: AsyncConnection, job_id: str, now: datetime) -> list[StatusChange]:
    """Cancel a job at once; a running attempt is ended here (resources freed) and
    its worker is told to stop the task. Descendants still waiting are cancelled too."""
    row = (
        await conn.execute(
            sa.text(
                "SELECT job_id, type, priority, status, attempts, worker_id, cpu_units, memory_mb "
                "FROM jobs WHERE job_id = :id FOR UPDATE"
            ),
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
        await lifecycle.release_many(conn, {row.worker_id: Resources(row.cpu_units, row.memory_mb)})
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
