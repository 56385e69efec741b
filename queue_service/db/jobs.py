"""The jobs aggregate's submission and read queries (SPEC §3, §4, §6).

Submission checks what only the database knows (does a node fit the job, do its
dependencies exist and can they still complete, is this a replay), inserts the
jobs, their dependency edges and their first log entries, and announces them.
Reads turn rows into the public job document the API returns. Every rule is
core's; this module only reads and writes rows. Callers own the transaction.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import operator
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from queue_service.core import dag, states
from queue_service.core.errors import DependencyNotViable, FieldProblem, InvalidJob, UnknownDependency, Unschedulable
from queue_service.core.model import JobSpec, JobStatus, Resources
from queue_service.core.policy import PolicyConfig, sort_key
from queue_service.core.validation import check_schedulable, generated_job_id, is_valid_job_id, standard_json
from queue_service.db import driver, tables
from queue_service.db.attempts import JobNotFound
from queue_service.db.engine import is_retryable, translate_errors
from queue_service.db.errors import IdempotencyKeyConflict, JobIdConflict
from queue_service.db.events import (
    CHANNEL,
    WAKE_DISPATCH,
    LogEntry,
    StatusChange,
    announce,
    compact_json,
    iso_z,
    queue_entry,
)
from queue_service.db.lifecycle import epoch

# A submission that loses a race to an identical concurrent one is re-run this
# many times; the re-run sees the winner's committed row and answers with it.
RACE_ATTEMPTS: Final = 3

_jobs = tables.jobs


@dataclass(frozen=True)
class Submitted:
    """One submitted job as the API returns it, and whether this request created it
    (False: an idempotent replay answered with the original, as a full public job;
    True: the submission answer of SPEC §4)."""

    job: dict[str, Any]
    created: bool


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


class InvalidCursor(InvalidJob):
    """A `cursor` this API did not issue (or one for another listing)."""

    def __init__(self) -> None:
        super().__init__([FieldProblem(("query", "cursor"), "not a cursor this listing issued")])


class _LostRace(Exception):
    """A concurrent submission committed a row with one of our ids or keys after we looked."""


# ----------------------------------------------------------------------------- submission
_LIVE_CAPACITIES_SQL: Final = driver.Statement(
    sa.text("SELECT DISTINCT cpu_capacity, memory_capacity FROM nodes WHERE status = 'active'")
)


async def live_capacities(conn: driver.Executor) -> list[Resources]:
    """The distinct capacities of active nodes: a job is schedulable if it fits one of them."""
    rows = await driver.fetch(conn, _LIVE_CAPACITIES_SQL, {})
    return [Resources(r.cpu_capacity, r.memory_capacity) for r in rows]


SUBMIT_ATTEMPTS: Final = 3  # a submission aborted by a deadlock is run again, this many times in all


def new_job_id() -> str:
    """An id drawn for a job whose client chose none (SPEC §3: `job_` + 12 hex characters)."""
    return generated_job_id(secrets.token_hex(6))


async def submit_request(
    engine: AsyncEngine,
    specs: Sequence[JobSpec],
    request_hashes: Sequence[str],
    clock: Callable[[], datetime],
    policy: PolicyConfig,
    capacities: Callable[[driver.Executor], Awaitable[Sequence[Resources]]],
) -> list[Submitted]:
    """One request's jobs, in transactions of their own: what POST /jobs and POST
    /jobs/batch run. A lone job depending on nothing is one statement (`submit_alone`);
    a stored id or key, or a job that fits no node, makes it write nothing, and `submit`
    then answers the replay, the conflict or the refusal. `capacities` reads the live
    nodes' (or the default) on the connection used."""
    maybe_replay = False
    if can_submit_alone(specs):
        async with driver.pooled(engine) as conn:
            alone = await submit_alone(conn, specs[0], request_hashes[0], clock(), policy, await capacities(conn))
        if alone is not None:
            return [alone]
        maybe_replay = True  # its id or key is stored, or it fits no node (refused unless a replay)
    for attempt in range(1, SUBMIT_ATTEMPTS + 1):
        try:
            async with driver.transaction(engine) as conn:
                return await submit(
                    conn,
                    specs,
                    request_hashes,
                    clock(),
                    policy,
                    await capacities(conn),
                    read_replays_first=maybe_replay,
                )
        except DBAPIError as error:
            # A deadlock with a completing dependency (we share-lock a parent and its child
            # while the parent's completion locks the child) is resolved by running again.
            if attempt == SUBMIT_ATTEMPTS or not is_retryable(error):
                raise
    raise AssertionError("unreachable")


async def submit(
    conn: AsyncConnection,
    specs: Sequence[JobSpec],
    request_hashes: Sequence[str],
    now: datetime,
    policy: PolicyConfig,
    capacities: Sequence[Resources],
    *,
    read_replays_first: bool = False,
) -> list[Submitted]:
    """Create the jobs of one request, all or nothing, answering in input order.

    A spec whose idempotency key, or client job id, is already stored with the same
    request hash is a replay: the original is returned and nothing is created; with
    another hash it is a 409 error. `capacities` are the live nodes' (or the
    configured default when none is live); a job must fit one of them.
    `read_replays_first`: the caller expects a replay (an id or key it knows is stored).
    """
    if len(specs) != len(request_hashes):
        raise ValueError("one request hash per spec")
    if not capacities:
        raise ValueError("no capacity to check jobs against: pass the configured default when no node is live")
    specs = _distinct_generated_ids(specs)
    _check_batch_identity(specs)
    dag.check_acyclic({spec.job_id: spec.depends_on for spec in specs})
    # The first try inserts without reading for replays: a new submission, the common
    # one, then costs one statement less. Should the insert skip a row (its id or key is
    # stored) or a check refuse a job (a replay is answered whatever became of its
    # dependencies or of the nodes since), the try is undone and the next reads first.
    replays_read, races = read_replays_first, 0
    while True:
        try:
            if len(specs) == 1:  # a skipped insert wrote nothing (see _INSERT_SQL): no savepoint to pay for
                return await _submit_once(conn, specs, request_hashes, now, policy, capacities, replays_read)
            # A savepoint, so a retried try undoes only itself, not the caller's transaction.
            async with conn.begin_nested():
                return await _submit_once(conn, specs, request_hashes, now, policy, capacities, replays_read)
        except _LostRace:
            if replays_read:
                races += 1
                if races == RACE_ATTEMPTS:
                    raise RuntimeError(
                        f"submission lost {RACE_ATTEMPTS} races in a row to concurrent identical submissions"
                    ) from None
            replays_read = True
        except (Unschedulable, UnknownDependency, DependencyNotViable):
            # Raised by the checks before the insert: the try wrote nothing.
            if replays_read:
                raise
            replays_read = True
        except _GeneratedIdsTaken as taken:
            # Drawn again, and kept apart from the batch's other ids as the first draws were.
            specs = _distinct_generated_ids([_redrawn(s) if s.job_id in taken.job_ids else s for s in specs])


class _GeneratedIdsTaken(Exception):
    """Ids drawn for the client (JobSpec.job_id_generated) that stored jobs already have."""

    def __init__(self, job_ids: set[str]) -> None:
        super().__init__(", ".join(sorted(job_ids)))
        self.job_ids = job_ids


def _redrawn(spec: JobSpec) -> JobSpec:
    return dataclasses.replace(spec, job_id=new_job_id())


def _distinct_generated_ids(specs: Sequence[JobSpec]) -> Sequence[JobSpec]:
    """Draw again an id drawn for the client that another member of the batch has: a
    coincidence of draws, not the client naming one job twice."""
    seen = {spec.job_id for spec in specs if not spec.job_id_generated}
    distinct: list[JobSpec] = []
    for spec in specs:
        while spec.job_id_generated and spec.job_id in seen:
            spec = _redrawn(spec)
        seen.add(spec.job_id)
        distinct.append(spec)
    return distinct


def _check_batch_identity(specs: Sequence[JobSpec]) -> None:
    """Two members of one batch cannot claim the same job id or idempotency key."""
    problems: list[FieldProblem] = []
    seen_ids: set[str] = set()
    seen_keys: set[str] = set()
    for index, spec in enumerate(specs):
        if spec.job_id in seen_ids:
            problems.append(FieldProblem(("body", index, "job_id"), f"job id {spec.job_id} appears twice in the batch"))
        if spec.idempotency_key is not None and spec.idempotency_key in seen_keys:
            problems.append(FieldProblem(("body", index, "idempotency_key"), "idempotency key appears twice"))
        seen_ids.add(spec.job_id)
        if spec.idempotency_key is not None:
            seen_keys.add(spec.idempotency_key)
    if problems:
        raise InvalidJob(problems)


async def _submit_once(
    conn: AsyncConnection,
    specs: Sequence[JobSpec],
    hashes: Sequence[str],
    now: datetime,
    policy: PolicyConfig,
    capacities: Sequence[Resources],
    read_replays: bool,
) -> list[Submitted]:
    originals = await _replays(conn, specs, hashes) if read_replays else {}
    new = [(spec, digest) for spec, digest in zip(specs, hashes, strict=True) if spec.job_id not in originals]
    created = await _create(conn, new, now, policy, capacities) if new else {}
    replayed = await _public_many(conn, originals.values()) if originals else {}
    return [
        Submitted(replayed[originals[spec.job_id]], False)
        if spec.job_id in originals
        else Submitted(created[spec.job_id], True)
        for spec in specs
    ]


_REPLAYS_SQL: Final = driver.Statement(
    sa.text(
        "SELECT job_id, idempotency_key, request_hash FROM jobs "
        "WHERE job_id = ANY(CAST(:ids AS text[])) OR idempotency_key = ANY(CAST(:keys AS text[]))"
    )
)


async def _replays(conn: AsyncConnection, specs: Sequence[JobSpec], hashes: Sequence[str]) -> dict[str, str]:
    """Map each spec that repeats a stored submission to the stored job's id; raise
    on a stored id or key that came with a different body, and _GeneratedIdsTaken for
    ids drawn for the client that stored jobs have (no repetition: a coincidence)."""
    keys = [s.idempotency_key for s in specs if s.idempotency_key is not None]
    rows = await driver.fetch(conn, _REPLAYS_SQL, {"ids": [s.job_id for s in specs], "keys": keys})
    by_id = {r.job_id: r for r in rows}
    by_key = {r.idempotency_key: r for r in rows if r.idempotency_key is not None}
    originals: dict[str, str] = {}
    taken: set[str] = set()
    for spec, digest in zip(specs, hashes, strict=True):
        # The key names the request the client meant to repeat, so it decides first.
        keyed = by_key.get(spec.idempotency_key) if spec.idempotency_key is not None else None
        if keyed is not None:
            if keyed.request_hash != digest:
                raise IdempotencyKeyConflict(spec.idempotency_key)
            originals[spec.job_id] = keyed.job_id
        elif (same_id := by_id.get(spec.job_id)) is not None:
            if spec.job_id_generated:
                taken.add(spec.job_id)
            elif same_id.request_hash != digest:
                raise JobIdConflict(spec.job_id)
            else:
                originals[spec.job_id] = same_id.job_id
    if taken:
        raise _GeneratedIdsTaken(taken)
    return originals


async def _create(
    conn: AsyncConnection,
    new: Sequence[tuple[JobSpec, str]],
    now: datetime,
    policy: PolicyConfig,
    capacities: Sequence[Resources],
) -> dict[str, dict[str, Any]]:
    """Store new jobs; returns each one's submission answer (SPEC §4), built from what
    was written rather than read back, so a submit costs no extra round trips."""
    specs = [spec for spec, _ in new]
    for spec in specs:
        if not any(spec.resources.fits_in(capacity) for capacity in capacities):
            check_schedulable(spec, max(capacities))  # fits no node, so not the largest either: raises
    new_ids = {spec.job_id for spec in specs}
    statuses = await _lock_dependencies(conn, specs, new_ids)
    unfinished: dict[str, int] = {}
    for spec in specs:
        # Raises for a dependency that already failed or was cancelled: it can never complete.
        unfinished[spec.job_id] = dag.count_unfinished(spec.depends_on, statuses, new_ids)
    rows = [_job_row(spec, digest, unfinished[spec.job_id], now, policy) for spec, digest in new]
    entries = [entry for spec in specs for entry in _first_entries(spec, statuses, new_ids, now)]
    changes = [
        StatusChange(s.job_id, s.type, str(s.priority), row["status"], None, 0, now, _queue_entry(row))
        for s, row in zip(specs, rows, strict=True)
    ]
    notices: list[tuple[str | None, Mapping[str, Any]]] = [(c.job_id, c.payload()) for c in changes]
    notices.append((None, {"event": WAKE_DISPATCH}))
    if len(rows) >= COPY_MIN_JOBS and not any(spec.depends_on for spec in specs):  # then no log entries either
        await _copy_in(conn, rows, [message for _, message in notices])
    else:
        await _insert(conn, specs, rows, entries, notices, now, new_ids)
    queued = [_Queued(row["job_id"], row["sort_key"]) for row in rows if row["status"] == _READY]
    positions = await queue_positions(conn, queued)
    return {
        row["job_id"]: {
            "job_id": row["job_id"],
            "status": row["status"],
            "created_at": iso_z(now),
            "priority": row["priority"],
            "position_in_queue": positions.get(row["job_id"]),
        }
        for row in rows
    }


async def _copy_in(
    conn: AsyncConnection, rows: Sequence[Mapping[str, Any]], notices: Sequence[Mapping[str, Any]]
) -> None:
    """COPY the jobs in, then announce them. An id or key already stored (a replay,
    or a race lost to a concurrent identical submission) fails the COPY: _LostRace,
    and the caller undoes the try."""
    values = operator.itemgetter(*_JOB_COLUMNS)
    records = [values({**row, "payload": standard_json(row["payload"]).decode()}) for row in rows]
    try:
        with translate_errors():
            await driver.copy_records(conn, "jobs", _JOB_COLUMNS, records)
    except (JobIdConflict, IdempotencyKeyConflict) as stored:
        raise _LostRace from stored
    await announce(conn, notices)


async def _insert(
    conn: AsyncConnection,
    specs: Sequence[JobSpec],
    rows: Sequence[Mapping[str, Any]],
    entries: Sequence[LogEntry],
    notices: Sequence[tuple[str | None, Mapping[str, Any]]],
    now: datetime,
    new_ids: set[str],
) -> None:
    """_INSERT_SQL for these jobs, their edges, log entries and announcements."""
    with translate_errors():
        result = await driver.one(
            conn,
            _INSERT_SQL,
            {
                **{column: [row[column] for row in rows] for column in _INSERTED_COLUMNS},
                "payload": [standard_json(row["payload"]).decode() for row in rows],
                "now": now,
                "edge_jobs": [s.job_id for s in specs for _ in s.depends_on],
                "edge_parents": [d for s in specs for d in s.depends_on],
                "log_jobs": [e.job_id for e in entries],
                "log_events": [e.event for e in entries],
                "log_messages": [e.message for e in entries],
                "log_data": [compact_json(e.data) for e in entries],
                "channel": CHANNEL,
                "notice_jobs": [job_id for job_id, _ in notices],
                "notice_payloads": [compact_json(m) for _, m in notices],
            },
        )
        if set(result.inserted) != new_ids:
            # ON CONFLICT skipped a stored id or key (or waited for the concurrent transaction
            # that held it, and it committed). Re-run: the replay check now sees its row.
            raise _LostRace


@dataclass(frozen=True)
class _Queued:
    """A just-queued job's place in queue order, for its position."""

    job_id: str
    sort_key: float


# Every column a submission writes of a job, in the order the statements below and
# COPY name them.
_JOB_COLUMNS: Final = (
    "job_id",
    "type",
    "priority",
    "status",
    "payload",
    "cpu_units",
    "memory_mb",
    "max_attempts",
    "backoff_multiplier",
    "initial_delay_seconds",
    "max_delay_seconds",
    "jitter",
    "timeout_seconds",
    "idempotency_key",
    "request_hash",
    "attempt_budget",
    "unfinished_deps",
    "created_at",
    "updated_at",
    "ready_at",
    "sort_key",
)
# Those the statements set from per-job arrays (payload, as JSON text, the attempt
# budget and the timestamps are handled apart).
_INSERTED_COLUMNS: Final = tuple(
    column
    for column in _JOB_COLUMNS
    if column not in {"payload", "attempt_budget", "created_at", "updated_at", "ready_at"}
)
# Jobs go in by COPY when a submission brings at least this many and none depends on
# another (no edges, no log entries to write beside them): binary rows, where the
# statement's arrays cost the client their encoding, element by element, and the
# server their parsing.
COPY_MIN_JOBS: Final = 100
_INSERT_INTO_JOBS: Final = f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)})"
# The batch's notices of the jobs inserted, and the wake-up (no job) if any was.
_BATCH_NOTICES: Final = """SELECT n.payload, n.place
    FROM unnest(CAST(:notice_jobs AS text[]), CAST(:notice_payloads AS text[]))
        WITH ORDINALITY AS n(job_id, payload, place)
    WHERE n.job_id IN (SELECT job_id FROM inserted) OR (n.job_id IS NULL AND EXISTS (SELECT FROM inserted))"""
# A whole submission in one statement and one round trip, with no per-row SQL to
# build: the jobs from arrays, then only for the rows really inserted (ON CONFLICT
# skips a job id or key a concurrent transaction committed first) their edges, log
# entries and announcements. So a lost race writes nothing at all.
_INSERT_SQL: Final = driver.Statement(
    sa.text(
        f"""
    WITH inserted AS (
        {_INSERT_INTO_JOBS}
        SELECT j.job_id, j.type, j.priority, j.status, CAST(j.payload AS jsonb), j.cpu_units, j.memory_mb,
               j.max_attempts, j.backoff_multiplier, j.initial_delay_seconds, j.max_delay_seconds, j.jitter,
               j.timeout_seconds, j.idempotency_key, j.request_hash, j.max_attempts, j.unfinished_deps,
               CAST(:now AS timestamptz), CAST(:now AS timestamptz),
               CASE WHEN j.status = 'ready' THEN CAST(:now AS timestamptz) END, j.sort_key
        FROM unnest(
            CAST(:job_id AS text[]), CAST(:type AS text[]), CAST(:priority AS text[]), CAST(:status AS text[]),
            CAST(:payload AS text[]), CAST(:cpu_units AS integer[]), CAST(:memory_mb AS integer[]),
            CAST(:max_attempts AS integer[]), CAST(:backoff_multiplier AS float8[]),
            CAST(:initial_delay_seconds AS float8[]), CAST(:max_delay_seconds AS float8[]),
            CAST(:jitter AS float8[]), CAST(:timeout_seconds AS float8[]), CAST(:idempotency_key AS text[]),
            CAST(:request_hash AS text[]), CAST(:unfinished_deps AS integer[]), CAST(:sort_key AS float8[])
        ) AS j(
            job_id, type, priority, status, payload, cpu_units, memory_mb, max_attempts, backoff_multiplier,
            initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, idempotency_key, request_hash,
            unfinished_deps, sort_key
        )
        ON CONFLICT DO NOTHING
        RETURNING job_id
    ), edges AS (
        INSERT INTO job_dependencies (job_id, depends_on_job_id)
        SELECT e.job_id, e.depends_on_job_id
        FROM unnest(CAST(:edge_jobs AS text[]), CAST(:edge_parents AS text[])) AS e(job_id, depends_on_job_id)
        WHERE e.job_id IN (SELECT job_id FROM inserted)
    ), logged AS (
        INSERT INTO job_events (job_id, at, level, event, message, data)
        SELECT l.job_id, CAST(:now AS timestamptz), 'info', l.event, l.message, CAST(l.data AS jsonb)
        FROM unnest(
            CAST(:log_jobs AS text[]), CAST(:log_events AS text[]), CAST(:log_messages AS text[]),
            CAST(:log_data AS text[])
        ) AS l(job_id, event, message, data)
        WHERE l.job_id IN (SELECT job_id FROM inserted)
    ), announced AS (
        -- Delivered at commit, in array order; the last one (no job) wakes the dispatchers.
        {tables.grouped_notify_sql(_BATCH_NOTICES)}
    )
    SELECT ARRAY(SELECT job_id FROM inserted) AS inserted, (SELECT count(*) FROM announced) AS announced
    """
    )
)


# A job alone with no dependencies, the common submission, in one statement that is its
# own transaction: one round trip where BEGIN, the replay check, the insert, the position
# and COMMIT took five. It inserts only if neither the id nor the key is stored (else the
# caller runs `submit`, which answers the replay or the conflict) and counts the ready jobs
# ahead of the new one in the function `queue_position` (the new row is not yet visible to
# it, nor counted in the buckets: the triggers run after the statement), so this
# statement keeps one generic plan (see migration 0005).
_INSERT_ALONE_SQL: Final = driver.Statement(
    sa.text(
        f"""
    WITH inserted AS (
        {_INSERT_INTO_JOBS} VALUES (
            :job_id, :type, :priority, 'ready', CAST(:payload AS jsonb), :cpu_units, :memory_mb, :max_attempts,
            :backoff_multiplier, :initial_delay_seconds, :max_delay_seconds, :jitter, :timeout_seconds,
            :idempotency_key, :request_hash, :max_attempts, 0, :now, :now, :now, :sort_key
        )
        ON CONFLICT DO NOTHING
        RETURNING job_id
    ), announced AS (
        SELECT pg_notify(:channel, n.payload)
        FROM inserted CROSS JOIN unnest(CAST(:notice_payloads AS text[])) AS n(payload)
    )
    SELECT (SELECT job_id FROM inserted) AS inserted,
           (SELECT count(*) FROM announced) AS announced,
           queue_position(
               CAST(:sort_key AS float8), CAST(:job_id AS text), CAST(:range_levels AS smallint[]),
               CAST(:range_lows AS bigint[]), CAST(:range_highs AS bigint[])
           ) AS position
    """
    )
)


def can_submit_alone(specs: Sequence[JobSpec]) -> bool:
    """Whether `submit_alone` can take this request: one job, depending on nothing."""
    return len(specs) == 1 and not specs[0].depends_on


async def submit_alone(
    conn: driver.Executor,
    spec: JobSpec,
    digest: str,
    now: datetime,
    policy: PolicyConfig,
    capacities: Sequence[Resources],
) -> Submitted | None:
    """Create one job that depends on nothing, in one statement (see _INSERT_ALONE_SQL).

    `conn` must be in autocommit mode (the statement is its own transaction). None,
    and nothing written, when the job's id or idempotency key is already stored or
    the job fits no node: `submit` then answers the replay, or else the conflict or
    the refusal.
    """
    if not can_submit_alone([spec]):
        raise ValueError("submit_alone takes one job without dependencies")
    if not any(spec.resources.fits_in(capacity) for capacity in capacities):
        return None  # refused unless it repeats a stored submission: a replay is answered as such
    row = _job_row(spec, digest, 0, now, policy)  # its own `submitted` and `ready` log entries
    change = StatusChange(spec.job_id, spec.type, str(spec.priority), row["status"], None, 0, now, _queue_entry(row))
    ranges = [*bucket_ranges(row["sort_key"]), own_second(row["sort_key"])]
    with translate_errors():
        result = await driver.one(
            conn,
            _INSERT_ALONE_SQL,
            {
                **{column: row[column] for column in _INSERTED_COLUMNS if column not in _FIXED_ALONE},
                "payload": standard_json(row["payload"]).decode(),
                "now": now,
                "channel": CHANNEL,
                # Its job.updated (ready) wakes the dispatchers too: no separate wake notice.
                "notice_payloads": [compact_json(change.payload())],
                "range_levels": [level for level, _, _ in ranges],
                "range_lows": [low for _, low, _ in ranges],
                "range_highs": [high for _, _, high in ranges],
            },
        )
    if result.inserted is None:
        return None
    answer = {
        "job_id": spec.job_id,
        "status": row["status"],
        "created_at": iso_z(now),
        "priority": row["priority"],
        "position_in_queue": int(result.position),
    }
    return Submitted(answer, True)


def _queue_entry(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """What an idle node needs to start a job this submission queues (events.QUEUE_ENTRY)."""
    if row["status"] != _READY:
        return None
    return queue_entry(row["sort_key"], row["cpu_units"], row["memory_mb"], row["timeout_seconds"], 0)


# Columns of _INSERTED_COLUMNS that _INSERT_ALONE_SQL writes as constants.
_FIXED_ALONE: Final = frozenset({"status", "unfinished_deps"})


# Locked in id order, as everything else locks jobs, so lockers cannot deadlock.
_LOCK_DEPENDENCIES_SQL: Final = driver.Statement(
    sa.text("SELECT job_id, status FROM jobs WHERE job_id = ANY(CAST(:ids AS text[])) ORDER BY job_id FOR SHARE")
)


async def _lock_dependencies(
    conn: AsyncConnection, specs: Sequence[JobSpec], new_ids: set[str]
) -> dict[str, JobStatus]:
    """The statuses of the stored jobs the new ones depend on, read FOR SHARE.

    The share lock is what makes the unfinished-dependency counter exact. A
    completion (or failure, or cancel) of a dependency updates its row, which
    conflicts with our lock: either it committed before we read (we see the final
    status and count it accordingly), or it waits until we commit, and then its
    unblock/propagate step finds our new edges and counts us down or ends us.
    Without the lock, a parent could complete between our read and our insert;
    its completion would not see our edge and our job would stay blocked forever.
    """
    wanted = list(dict.fromkeys(d for spec in specs for d in spec.depends_on if d not in new_ids))
    if not wanted:
        return {}
    rows = await driver.fetch(conn, _LOCK_DEPENDENCIES_SQL, {"ids": wanted})
    statuses = {r.job_id: JobStatus(r.status) for r in rows}
    missing = [d for d in wanted if d not in statuses]
    if missing:
        raise UnknownDependency(missing)  # every missing id of the request at once
    return statuses


# A StrEnum member's str() is its value: the `.value` property cost 0.3-0.5 us a read,
# and a submission read it about seven times a job.
_READY: Final = str(JobStatus.READY)


def _job_row(spec: JobSpec, digest: str, unfinished: int, now: datetime, policy: PolicyConfig) -> dict[str, Any]:
    status = states.initial_status(unfinished)
    ready = status is JobStatus.READY
    return {
        "job_id": spec.job_id,
        "type": spec.type,
        "priority": str(spec.priority),
        "status": str(status),
        "payload": spec.payload,
        "cpu_units": spec.resources.cpu_units,
        "memory_mb": spec.resources.memory_mb,
        "max_attempts": spec.retry.max_attempts,
        "backoff_multiplier": spec.retry.backoff_multiplier,
        "initial_delay_seconds": spec.retry.initial_delay_seconds,
        "max_delay_seconds": spec.retry.max_delay_seconds,
        "jitter": spec.retry.jitter,
        "timeout_seconds": spec.timeout_seconds,
        "idempotency_key": spec.idempotency_key,
        "request_hash": digest,
        "attempt_budget": spec.retry.max_attempts,
        "unfinished_deps": unfinished,
        "created_at": now,
        "updated_at": now,
        "ready_at": now if ready else None,
        "sort_key": sort_key(epoch(now), spec.priority, policy) if ready else None,
    }


def _first_entries(
    spec: JobSpec, statuses: Mapping[str, JobStatus], new_ids: set[str], now: datetime
) -> list[LogEntry]:
    """The entries a submission writes: the job's row is its `submitted` entry, and
    `ready` too when it depends on nothing (tables.JOB_LOG_VIEW)."""
    if not spec.depends_on:
        return []
    waiting_for = [d for d in spec.depends_on if d in new_ids or statuses[d] is not JobStatus.COMPLETED]
    if waiting_for:
        message = "waiting for " + ", ".join(waiting_for)
        return [LogEntry(spec.job_id, "blocked", message, now, data={"waiting_for": waiting_for})]
    return [LogEntry(spec.job_id, "ready", "every dependency already completed", now)]


# ----------------------------------------------------------------------------- reads
_parent = _jobs.alias("parent")
_edges = tables.job_dependencies
# A job's dependencies with their statuses, [[id, status], ...] in id order, read with
# the job's row (a primary-key range per job) rather than by a query of their own.
_DEPENDENCIES: Final = (
    sa.select(
        sa.func.coalesce(
            sa.func.json_agg(
                aggregate_order_by(
                    sa.func.json_build_array(_edges.c.depends_on_job_id, _parent.c.status), _edges.c.depends_on_job_id
                )
            ),
            sa.literal_column("'[]'::json"),
        )
    )
    .select_from(_edges.join(_parent, _parent.c.job_id == _edges.c.depends_on_job_id))
    .where(_edges.c.job_id == _jobs.c.job_id)
    .correlate(_jobs)
    .scalar_subquery()
    .label("dependencies")
)
_PUBLIC_COLUMNS: Final = (
    _jobs.c.job_id,
    _jobs.c.type,
    _jobs.c.priority,
    _jobs.c.status,
    _jobs.c.payload,
    _jobs.c.cpu_units,
    _jobs.c.memory_mb,
    _jobs.c.max_attempts,
    _jobs.c.backoff_multiplier,
    _jobs.c.initial_delay_seconds,
    _jobs.c.max_delay_seconds,
    _jobs.c.jitter,
    _jobs.c.timeout_seconds,
    _jobs.c.idempotency_key,
    _jobs.c.attempts,
    _jobs.c.created_at,
    _jobs.c.updated_at,
    _jobs.c.ready_at,
    _jobs.c.started_at,
    _jobs.c.finished_at,
    _jobs.c.next_attempt_at,
    _jobs.c.sort_key,
    _jobs.c.worker_id,
    _jobs.c.last_error,
    _jobs.c.failure_reason,
    _jobs.c.cancel_reason,
    _jobs.c.result,
    _DEPENDENCIES,
)


async def get_job(conn: driver.Executor, job_id: str) -> dict[str, Any]:
    """The full public job; JobNotFound if there is none."""
    row = await driver.fetchrow(conn, PUBLIC_ONE_SQL, {"id": job_id}) if is_valid_job_id(job_id) else None
    if row is None:
        raise JobNotFound(f"no job {job_id!r}")
    [job] = await _public_rows(conn, [row])
    return job


@dataclass(frozen=True)
class JobListing:
    """A page of GET /jobs: its filters (`created_after` inclusive, `created_before`
    exclusive, so consecutive windows tile without overlap), size and cursor."""

    limit: int
    statuses: Sequence[str] = ()
    job_type: str | None = None
    priority: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    cursor: str | None = None


async def list_jobs(conn: AsyncConnection, listing: JobListing) -> Page:
    """Jobs newest first, keyset-paged on (created_at, job_id) so each page is an
    index range scan however deep it is."""
    return await _page(conn, (await conn.execute(list_query(listing))).all(), "created_at", listing.limit)


def list_query(listing: JobListing) -> sa.Select[Any]:
    """The statement behind `list_jobs`: one more row than the page, newest first.

    Filtered by status alone, each status is asked as a range (`status >= s AND
    status <= s`) and ordered by it first. With `status = s` PostgreSQL drops the
    status from the order, and for a status most rows have it then filters
    ix_jobs_created, estimating a page is found among as many rows; but the newest
    jobs are the ones not yet finished, so a page of completed jobs beside 10,000
    ready ones read all 10,000 first. A range keeps the status in the order, which
    only ix_jobs_status_created gives. Several statuses are one such branch each,
    merged. With a type, ix_jobs_type_created serves it as before: the range would
    make the planner sort every job of a rare type."""
    query: sa.Select[Any] = sa.select(*_PUBLIC_COLUMNS)
    if listing.job_type is not None:
        query = query.where(_jobs.c.type == listing.job_type)
    if listing.priority is not None:
        query = query.where(_jobs.c.priority == listing.priority)
    if listing.created_after is not None:
        query = query.where(_jobs.c.created_at >= listing.created_after)
    if listing.created_before is not None:
        query = query.where(_jobs.c.created_at < listing.created_before)
    query = _after_cursor(query, (_jobs.c.created_at, _jobs.c.job_id), listing.cursor)
    newest_first = (_jobs.c.created_at.desc(), _jobs.c.job_id.desc())
    rows = listing.limit + 1
    if not listing.statuses:
        return query.order_by(*newest_first).limit(rows)
    if listing.job_type is not None:
        return query.where(_jobs.c.status.in_(list(listing.statuses))).order_by(*newest_first).limit(rows)
    branches = [
        query.where(_jobs.c.status >= status, _jobs.c.status <= status)
        .order_by(_jobs.c.status, *newest_first)
        .limit(rows)
        for status in dict.fromkeys(listing.statuses)
    ]
    if len(branches) == 1:
        return branches[0]
    merged = sa.union_all(*branches).subquery("by_status")
    return sa.select(merged).order_by(merged.c.created_at.desc(), merged.c.job_id.desc()).limit(rows)


async def dead_letter(conn: AsyncConnection, *, limit: int, cursor: str | None = None) -> Page:
    """Failed jobs, most recently failed first (the partial dead-letter index)."""
    query = sa.select(*_PUBLIC_COLUMNS).where(_jobs.c.status == JobStatus.FAILED.value)
    return await _keyset_page(conn, query, (_jobs.c.finished_at, _jobs.c.job_id), "finished_at", limit, cursor)


async def job_logs(conn: AsyncConnection, job_id: str) -> list[dict[str, Any]]:
    """A job's log entries, oldest first; JobNotFound if there is no such job."""
    exists = (
        is_valid_job_id(job_id)
        and (await conn.execute(sa.text("SELECT 1 FROM jobs WHERE job_id = :id"), {"id": job_id})).first()
    )
    if not exists:
        raise JobNotFound(f"no job {job_id!r}")
    rows = await conn.execute(
        sa.text(
            "SELECT at, attempt, level, event, message, data FROM job_log WHERE job_id = :id ORDER BY at, step, seq"
        ),
        {"id": job_id},
    )
    return [
        {
            "at": iso_z(r.at),
            "attempt": r.attempt,
            "level": r.level,
            "event": r.event,
            "message": r.message,
            "data": r.data,
        }
        for r in rows
    ]


async def _keyset_page(
    conn: AsyncConnection,
    query: sa.Select[Any],
    order: tuple[sa.ColumnElement[datetime], sa.ColumnElement[str]],
    time_field: str,
    limit: int,
    cursor: str | None,
) -> Page:
    """One page newest first on (timestamp, job_id); the cursor is the last row's pair."""
    query = _after_cursor(query, order, cursor)
    rows = (await conn.execute(query.order_by(order[0].desc(), order[1].desc()).limit(limit + 1))).all()
    return await _page(conn, rows, time_field, limit)


def _after_cursor(
    query: sa.Select[Any], order: tuple[sa.ColumnElement[datetime], sa.ColumnElement[str]], cursor: str | None
) -> sa.Select[Any]:
    """Only the rows after the cursor's (timestamp, job_id), newest first."""
    if cursor is None:
        return query
    at, last_id = decode_cursor(cursor)
    return query.where(sa.tuple_(*order) < sa.tuple_(sa.literal(at, order[0].type), sa.literal(last_id)))


async def _page(conn: AsyncConnection, rows: Sequence[Any], time_field: str, limit: int) -> Page:
    """A page from up to limit + 1 rows newest first; the next cursor when there were more."""
    more = len(rows) > limit
    rows = rows[:limit]
    items = await _public_rows(conn, rows)
    next_cursor = encode_cursor(getattr(rows[-1], time_field), rows[-1].job_id) if more else None
    return Page(items, next_cursor)


def encode_cursor(at: datetime, job_id: str) -> str:
    """Opaque to clients: URL-safe base64 of the last row's sort key."""
    raw = json.dumps([at.isoformat(), job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at_text, job_id = json.loads(raw)
        at = datetime.fromisoformat(at_text)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursor from None
    if at.tzinfo is None or not is_valid_job_id(job_id):
        raise InvalidCursor
    return at, job_id


# ----------------------------------------------------------------------------- public form
# On the driver: GET /jobs/{id} is the read clients poll, and SQLAlchemy's path cost
# more than the statement (an IN list rebuilt and its cache key computed per call).
PUBLIC_BY_ID_SQL: Final = driver.Statement(
    sa.select(*_PUBLIC_COLUMNS).where(_jobs.c.job_id == sa.any_(sa.bindparam("ids", type_=ARRAY(sa.Text))))
)
# One job by its id, as GET /jobs/{id} asks: by a scalar, not a one-element array, so
# the plan cache settles on the generic plan (a key lookup either way). Asked by array,
# the generic plan's guess of ten ids cost more than each custom plan for one, and every
# call was planned afresh: 0.19 ms, four times the lookup.
PUBLIC_ONE_SQL: Final = driver.Statement(
    sa.select(*_PUBLIC_COLUMNS).where(_jobs.c.job_id == sa.bindparam("id", type_=sa.Text))
)


async def _public_many(conn: driver.Executor, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    ids = list(dict.fromkeys(job_ids))
    rows = await driver.fetch(conn, PUBLIC_BY_ID_SQL, {"ids": ids})
    return {job["job_id"]: job for job in await _public_rows(conn, rows)}


async def _public_rows(conn: driver.Executor, rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows (of _PUBLIC_COLUMNS) as public jobs, with the queue positions of the ready ones."""
    if not rows:
        return []
    positions = await queue_positions(conn, [r for r in rows if r.status == JobStatus.READY.value])
    return [_public(r, positions.get(r.job_id)) for r in rows]


_LOWEST_BUCKET: Final = -(2**63)

# Positions of several ready jobs: see tables.QUEUE_POSITIONS_FUNCTION.
POSITIONS_SQL: Final = driver.Statement(
    sa.text(
        """
    SELECT p.job_id, p.ahead AS position FROM queue_positions(
        CAST(:seconds AS float8[]), CAST(:first_keys AS float8[]), CAST(:first_ids AS text[]),
        CAST(:last_keys AS float8[]), CAST(:last_ids AS text[]), CAST(:range_levels AS smallint[]),
        CAST(:range_lows AS bigint[]), CAST(:range_highs AS bigint[]), CAST(:use_seconds AS float8[]),
        CAST(:use_ranges AS bigint[]), CAST(:ids AS text[])
    ) AS p
    """
    )
)


def bucket_ranges(key: float) -> list[tuple[int, int, int]]:
    """The (level, first, past-last) bucket ranges whose counts, summed, give the ready
    jobs ahead of a job with sort key `key` outside its own second: the seconds
    before it in its minute, the minutes before it in its hour, the hours before it
    in its day, and every day before. Bucket arithmetic as the trigger does it."""
    second = math.floor(key)
    widths = tables.RANK_LEVEL_WIDTHS
    buckets = [math.floor(second / width) for width in widths]
    ranges = [
        (level, buckets[level] * (widths[level] // widths[level - 1]), buckets[level - 1])
        for level in range(1, len(widths))
    ]
    ranges.append((len(widths), _LOWEST_BUCKET, buckets[-1]))
    return ranges


def own_second(key: float) -> tuple[int, int, int]:
    """The bucket range of `key`'s own second (level 1), which `queue_position` counts
    whole and then takes the ready jobs at or after `key` away from."""
    second = math.floor(key)
    return 1, second, second + 1


def positions_parameters(ready: Sequence[Any]) -> dict[str, list[Any]]:
    """POSITIONS_SQL's parameters for these ready jobs (each has job_id and sort_key)."""
    asked_of_second: dict[float, tuple[tuple[float, str], tuple[float, str]]] = {}  # first, last
    for row in ready:
        second = float(math.floor(row.sort_key))
        job = (row.sort_key, row.job_id)
        first, last = asked_of_second.get(second, (job, job))
        asked_of_second[second] = (min(first, job), max(last, job))
    numbers: dict[tuple[int, int, int], int] = {}  # each distinct range, numbered from 1 as sent
    use_seconds: list[float] = []
    use_ranges: list[int] = []
    for second in asked_of_second:
        for bucket_range in (*bucket_ranges(second), own_second(second)):
            use_seconds.append(second)
            use_ranges.append(numbers.setdefault(bucket_range, len(numbers) + 1))
    return {
        "seconds": list(asked_of_second),
        "first_keys": [first[0] for first, _ in asked_of_second.values()],
        "first_ids": [first[1] for first, _ in asked_of_second.values()],
        "last_keys": [last[0] for _, last in asked_of_second.values()],
        "last_ids": [last[1] for _, last in asked_of_second.values()],
        "range_levels": [level for level, _, _ in numbers],
        "range_lows": [low for _, low, _ in numbers],
        "range_highs": [high for _, _, high in numbers],
        "use_seconds": use_seconds,
        "use_ranges": use_ranges,
        "ids": [r.job_id for r in ready],
    }


async def queue_positions(conn: driver.Executor, ready: Sequence[Any]) -> dict[str, int]:
    """How many ready jobs come before each one in queue order (sort_key, job_id).

    Bounded work however long the queue: a few dozen bucket rows and, per distinct
    second among `ready`, the ready jobs of that second from the first one asked for,
    where numbering every ready row ahead grew with the position.
    """
    if not ready:
        return {}
    rows = await driver.fetch(conn, POSITIONS_SQL, positions_parameters(ready))
    return {r.job_id: int(r.position) for r in rows}


def _iso(at: datetime | None) -> str | None:
    return iso_z(at) if at is not None else None


def _public(row: Any, position: int | None) -> dict[str, Any]:
    """The job document of SPEC §3: what was submitted, and the read-only state."""
    depends_on = [parent for parent, _ in row.dependencies]
    unfinished = [parent for parent, status in row.dependencies if status != JobStatus.COMPLETED.value]
    blocked_by = unfinished if row.status == JobStatus.BLOCKED.value else []
    retry: Mapping[str, Any] = {
        "max_attempts": row.max_attempts,
        "backoff_multiplier": row.backoff_multiplier,
        "initial_delay_seconds": row.initial_delay_seconds,
        "max_delay_seconds": row.max_delay_seconds,
        "jitter": row.jitter,
    }
    return {
        "job_id": row.job_id,
        "type": row.type,
        "priority": row.priority,
        "status": row.status,
        "payload": row.payload,
        "resource_requirements": {"cpu_units": row.cpu_units, "memory_mb": row.memory_mb},
        "depends_on": depends_on,
        "blocked_by": blocked_by,
        "retry_config": dict(retry),
        "timeout_seconds": row.timeout_seconds,
        "idempotency_key": row.idempotency_key,
        "attempts": row.attempts,
        "position_in_queue": position,
        "worker_id": row.worker_id,
        "created_at": iso_z(row.created_at),
        "updated_at": iso_z(row.updated_at),
        "ready_at": _iso(row.ready_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "next_attempt_at": _iso(row.next_attempt_at),
        "last_error": row.last_error,
        "failure_reason": row.failure_reason,
        "cancel_reason": row.cancel_reason,
        "result": row.result,
    }


async def dead_letter_filtered(
    conn: AsyncConnection,
    *,
    job_type: str | None = None,
    failure_reason: str | None = None,
    limit: int,
    cursor: str | None = None,
) -> Page:
    """The dead-letter queue narrowed by type and failure reason, most recently failed
    first; still a range scan of the partial dead-letter index, filtered as it goes."""
    query = sa.select(*_PUBLIC_COLUMNS).where(_jobs.c.status == JobStatus.FAILED.value)
    if job_type is not None:
        query = query.where(_jobs.c.type == job_type)
    if failure_reason is not None:
        query = query.where(_jobs.c.failure_reason == failure_reason)
    return await _keyset_page(conn, query, (_jobs.c.finished_at, _jobs.c.job_id), "finished_at", limit, cursor)
