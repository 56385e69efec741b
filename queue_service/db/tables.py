"""The declared PostgreSQL schema (SPEC §7) as SQLAlchemy Core tables.

This is the schema the code is written against; `migrations/` builds it, and a
migration test diffs the two. Invariants of the job model live here as named
CHECK constraints, so that even a buggy worker cannot oversubscribe a node, run a
job with unfinished dependencies or hold two running attempts of one job: the
database refuses, and `db.engine.translate_errors` turns the refusal into a
project error by constraint name.

Statuses and priorities are text with CHECKs rather than PostgreSQL enums: adding
a value is then a constraint swap, not an `ALTER TYPE` that cannot run in a
transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from queue_service.core.model import AttemptOutcome, CancelReason, FailureReason, JobStatus, Priority

# Constraint names are part of the contract (translate_errors keys on them), so
# none is left to the server's defaults. CHECKs carry explicit, schema-unique names.
NAMING_CONVENTION: Final = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# Names translate_errors and the repositories refer to.
JOBS_PK: Final = "pk_jobs"
JOBS_IDEMPOTENCY_KEY_UNIQUE: Final = "uq_jobs_idempotency_key"
DEPENDENCY_TARGET_FK: Final = "fk_job_dependencies_depends_on_job_id_jobs"
ATTEMPTS_PK: Final = "pk_job_attempts"
ONE_RUNNING_ATTEMPT: Final = "ux_job_attempts_one_running"
NODE_CPU_CHECK: Final = "node_cpu_within_capacity"
NODE_MEMORY_CHECK: Final = "node_memory_within_capacity"

NODE_STATUSES: Final = ("active", "draining", "stopped", "lost")
EVENT_LEVELS: Final = ("debug", "info", "warning", "error")
MISFIRE_POLICIES: Final = ("skip", "run_once")

_NOW = sa.text("now()")
_EMPTY_OBJECT = sa.text("'{}'::jsonb")


def _in(column: str, values: Iterable[str]) -> str:
    """`column IN ('a', 'b')` for a CHECK over our own enum members (quoted as SQL literals)."""
    literals = ", ".join("'" + str(value).replace("'", "''") + "'" for value in values)
    return f"{column} IN ({literals})"


def _timestamp(name: str, *, nullable: bool = True, now_default: bool = False) -> sa.Column[datetime]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=_NOW if now_default else None,
    )


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("priority", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("payload", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
    sa.Column("cpu_units", sa.Integer, nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("backoff_multiplier", sa.Double, nullable=False),
    sa.Column("initial_delay_seconds", sa.Double, nullable=False),
    sa.Column("max_delay_seconds", sa.Double, nullable=False),
    sa.Column("jitter", sa.Double, nullable=False),
    sa.Column("timeout_seconds", sa.Double, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=True),  # unique where set: see the index below
    # sha256 of the canonical submitted body: same key/id + same hash is a replay, else 409.
    sa.Column("request_hash", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),  # started, numbered 1..n for life
    sa.Column("counted_attempts", sa.Integer, nullable=False, server_default="0"),  # those against the budget
    sa.Column("attempt_budget", sa.Integer, nullable=False),  # max_attempts granted so far; a re-drive adds more
    sa.Column("unfinished_deps", sa.Integer, nullable=False, server_default="0"),  # unblocking by counter
    _timestamp("created_at", nullable=False, now_default=True),
    _timestamp("updated_at", nullable=False, now_default=True),
    _timestamp("ready_at"),
    _timestamp("started_at"),
    _timestamp("finished_at"),
    _timestamp("next_attempt_at"),
    # Epoch seconds of ready_at minus the priority head start (core.policy.sort_key):
    # static, so the ready-queue index serves queue order.
    sa.Column("sort_key", sa.Double, nullable=True),
    sa.Column("lease_token", UUID(as_uuid=True), nullable=True),
    _timestamp("lease_expires_at"),
    sa.Column("worker_id", sa.Text, nullable=True),  # node of the latest attempt; kept after it ends
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("failure_reason", sa.Text, nullable=True),
    sa.Column("cancel_reason", sa.Text, nullable=True),
    sa.Column("result", JSONB, nullable=True),
    sa.CheckConstraint(_in("priority", Priority), name="priority_valid"),
    sa.CheckConstraint(_in("status", JobStatus), name="status_valid"),
    sa.CheckConstraint(
        f"failure_reason IS NULL OR {_in('failure_reason', FailureReason)}", name="failure_reason_valid"
    ),
    sa.CheckConstraint(f"cancel_reason IS NULL OR {_in('cancel_reason', CancelReason)}", name="cancel_reason_valid"),
    sa.CheckConstraint("status <> 'failed' OR failure_reason IS NOT NULL", name="failed_has_reason"),
    sa.CheckConstraint("status <> 'cancelled' OR cancel_reason IS NOT NULL", name="cancelled_has_reason"),
    sa.CheckConstraint("char_length(type) BETWEEN 1 AND 64", name="type_length"),
    sa.CheckConstraint("cpu_units >= 1", name="cpu_units_positive"),
    sa.CheckConstraint("memory_mb >= 1", name="memory_mb_positive"),
    sa.CheckConstraint(
        "max_attempts >= 1 AND backoff_multiplier >= 1 AND initial_delay_seconds >= 0"
        " AND max_delay_seconds >= initial_delay_seconds AND jitter BETWEEN 0 AND 1",
        name="retry_config_valid",
    ),
    sa.CheckConstraint("timeout_seconds > 0", name="timeout_positive"),
    sa.CheckConstraint(
        "counted_attempts >= 0 AND counted_attempts <= attempts AND counted_attempts <= attempt_budget",
        name="attempt_counts_valid",
    ),
    sa.CheckConstraint("unfinished_deps >= 0", name="unfinished_deps_non_negative"),
    # Dependencies respected, in the database: only a job with every dependency
    # completed may be ready, run, retry or complete; a blocked one waits on some.
    sa.CheckConstraint(
        "status IN ('failed', 'cancelled') OR (status = 'blocked') = (unfinished_deps > 0)",
        name="blocked_iff_unfinished_deps",
    ),
    sa.CheckConstraint("status <> 'ready' OR (ready_at IS NOT NULL AND sort_key IS NOT NULL)", name="ready_is_queued"),
    sa.CheckConstraint("status <> 'retrying' OR next_attempt_at IS NOT NULL", name="retrying_has_due_time"),
    # A lease exists exactly while an attempt runs: fencing needs a token to check.
    sa.CheckConstraint(
        "(status = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)",
        name="lease_held_iff_running",
    ),
)

# Of the jobs that have a key only: a job's row gets a new entry in every index at each
# change of status, and most jobs carry no key (migration 0008). `idempotency_key =
# ANY(keys)` implies the key is set, so even a generic plan of a lookup uses it.
sa.Index(
    JOBS_IDEMPOTENCY_KEY_UNIQUE,
    jobs.c.idempotency_key,
    unique=True,
    postgresql_where=jobs.c.idempotency_key.is_not(None),
)
# Hot paths (SPEC §7), each O(log n): the index columns match the query's ORDER BY.
sa.Index("ix_jobs_ready_queue", jobs.c.sort_key, jobs.c.job_id, postgresql_where=jobs.c.status == "ready")
# What a node is running, for plan()'s reservation: a handful of rows per node.
sa.Index("ix_jobs_running_node", jobs.c.worker_id, postgresql_where=jobs.c.status == "running")
sa.Index("ix_jobs_retry_due", jobs.c.next_attempt_at, postgresql_where=jobs.c.status == "retrying")
sa.Index("ix_jobs_lease_expiry", jobs.c.lease_expires_at, postgresql_where=jobs.c.status == "running")
# Keyset listing, newest first: WHERE (created_at, job_id) < (:c, :id) ORDER BY created_at DESC, job_id DESC.
sa.Index("ix_jobs_created", jobs.c.created_at.desc(), jobs.c.job_id.desc())
sa.Index("ix_jobs_status_created", jobs.c.status, jobs.c.created_at.desc(), jobs.c.job_id.desc())
sa.Index("ix_jobs_type_created", jobs.c.type, jobs.c.created_at.desc(), jobs.c.job_id.desc())
# The dead-letter queue: failed jobs, most recently failed first.
sa.Index(
    "ix_jobs_dead_letter",
    jobs.c.finished_at.desc(),
    jobs.c.job_id.desc(),
    postgresql_where=jobs.c.status == "failed",
)
# Retention: finished jobs oldest first, so a purge deletes without a scan.
sa.Index(
    "ix_jobs_retention",
    jobs.c.finished_at,
    postgresql_where=jobs.c.status.in_(["completed", "cancelled"]),
)

job_dependencies = sa.Table(
    "job_dependencies",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True),
    # No cascade: a job others depend on is not deleted from under them.
    sa.Column("depends_on_job_id", sa.Text, sa.ForeignKey("jobs.job_id"), primary_key=True),
    sa.CheckConstraint("job_id <> depends_on_job_id", name="dependency_not_self"),
)
# Completion finds its dependants through this index, then decrements their counters.
sa.Index("ix_job_dependencies_depends_on_job_id", job_dependencies.c.depends_on_job_id)

job_attempts = sa.Table(
    "job_attempts",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("node_id", sa.Text, nullable=False),  # no FK: history outlives the node's row
    _timestamp("started_at", nullable=False),
    _timestamp("ended_at"),
    sa.Column("outcome", sa.Text, nullable=True),  # NULL while the attempt runs
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("lease_token", UUID(as_uuid=True), nullable=False),
    # The queued job this start passed over (backfill, SPEC §5); NULL in queue order.
    sa.Column("backfilled_past", sa.Text, nullable=True),
    sa.CheckConstraint("attempt >= 1", name="attempt_number_positive"),
    sa.CheckConstraint(f"outcome IS NULL OR {_in('outcome', AttemptOutcome)}", name="attempt_outcome_valid"),
    sa.CheckConstraint("(ended_at IS NULL) = (outcome IS NULL)", name="attempt_ended_iff_outcome"),
)
# At most one running attempt per job (SPEC §6), enforced by the database itself.
sa.Index(
    ONE_RUNNING_ATTEMPT,
    job_attempts.c.job_id,
    unique=True,
    postgresql_where=job_attempts.c.outcome.is_(None),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.BigInteger, autoincrement=True),  # a bigserial, in insertion order
    # No foreign key: each entry's check locked and probed its job's row on every status
    # change. Entries are written only beside their job, and the purge deletes them with it.
    sa.Column("job_id", sa.Text, nullable=False),
    _timestamp("at", nullable=False, now_default=True),
    sa.Column("attempt", sa.Integer, nullable=True),
    sa.Column("level", sa.Text, nullable=False, server_default="info"),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    sa.Column("data", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
    sa.CheckConstraint(_in("level", EVENT_LEVELS), name="event_level_valid"),
    # Keyed as it is read: a job's log, oldest first, without a sort. One index, where a
    # key on id alone served no query and cost each row a second entry (migration 0009).
    sa.PrimaryKeyConstraint("job_id", "id"),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("node_id", sa.Text, primary_key=True),
    sa.Column("cpu_capacity", sa.Integer, nullable=False),
    sa.Column("memory_capacity", sa.Integer, nullable=False),
    sa.Column("cpu_used", sa.Integer, nullable=False, server_default="0"),
    sa.Column("memory_used", sa.Integer, nullable=False, server_default="0"),
    _timestamp("started_at", nullable=False, now_default=True),
    _timestamp("heartbeat_at", nullable=False, now_default=True),
    sa.Column("status", sa.Text, nullable=False, server_default="active"),
    sa.CheckConstraint("cpu_capacity >= 1 AND memory_capacity >= 1", name="node_capacity_positive"),
    # Capacity is never exceeded, not for an instant (SPEC §1, §5).
    sa.CheckConstraint("cpu_used BETWEEN 0 AND cpu_capacity", name=NODE_CPU_CHECK),
    sa.CheckConstraint("memory_used BETWEEN 0 AND memory_capacity", name=NODE_MEMORY_CHECK),
    sa.CheckConstraint(_in("status", NODE_STATUSES), name="node_status_valid"),
)

schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("cron", sa.Text, nullable=False),
    sa.Column("timezone", sa.Text, nullable=False, server_default="UTC"),
    sa.Column("job_template", JSONB, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("misfire", sa.Text, nullable=False, server_default="skip"),
    _timestamp("next_fire_at"),
    _timestamp("last_fired_at"),
    _timestamp("created_at", nullable=False, now_default=True),
    _timestamp("updated_at", nullable=False, now_default=True),
    sa.CheckConstraint(_in("misfire", MISFIRE_POLICIES), name="schedule_misfire_valid"),
)
sa.Index("ix_schedules_due", schedules.c.next_fire_at, postgresql_where=schedules.c.enabled)

# Queue depth by (status, priority) without scanning jobs (SPEC §8). Each row is a
# signed delta appended by a statement-level trigger; depth is SUM(delta) per key.
# Append-only rather than one counter row per key, because a shared counter row
# would be locked by every transaction that changes a status until it commits:
# concurrent dispatches and completions would queue on it and could deadlock by
# touching two keys in opposite orders. queue_counters_compact() folds the rows
# back to at most one per key; a leader runs it periodically.
queue_counters = sa.Table(
    "queue_counters",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("priority", sa.Text, nullable=False),
    sa.Column("delta", sa.BigInteger, nullable=False),
)

# The trigger machinery, as DDL the declared schema runs after create_all. The
# migration carries its own frozen copy; the migration test checks they agree.
QUEUE_COUNTER_FUNCTIONS: Final = (
    """
CREATE FUNCTION queue_counters_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_counters (status, priority, delta)
        SELECT status, priority, count(*) FROM new_rows GROUP BY status, priority;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO queue_counters (status, priority, delta)
        SELECT status, priority, -count(*) FROM old_rows GROUP BY status, priority;
    ELSIF TG_OP = 'TRUNCATE' THEN
        DELETE FROM queue_counters;
    ELSE
        INSERT INTO queue_counters (status, priority, delta)
        SELECT status, priority, sum(delta) FROM (
            SELECT status, priority, 1 AS delta FROM new_rows
            UNION ALL
            SELECT status, priority, -1 AS delta FROM old_rows
        ) AS changes
        GROUP BY status, priority
        HAVING sum(delta) <> 0;
    END IF;
    RETURN NULL;
END
$$
""",
    """
CREATE FUNCTION queue_counters_compact() RETURNS void
LANGUAGE sql AS $$
    WITH folded AS (
        DELETE FROM queue_counters RETURNING status, priority, delta
    )
    INSERT INTO queue_counters (status, priority, delta)
    SELECT status, priority, sum(delta) FROM folded
    GROUP BY status, priority
    HAVING sum(delta) <> 0
$$
""",
)
# Statement-level with transition tables: a batch of a thousand jobs appends a few
# rows, not a thousand. PostgreSQL allows one event per trigger with transition tables.
QUEUE_COUNTER_TRIGGERS: Final = (
    "CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_counters_apply()",
    "CREATE TRIGGER jobs_count_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_counters_apply()",
    "CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_counters_apply()",
    # TRUNCATE fires no DELETE trigger; without this a test reset would leave stale depths.
    "CREATE TRIGGER jobs_count_truncate AFTER TRUNCATE ON jobs"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_counters_apply()",
)

QUEUE_COUNTER_DROPS: Final = (
    "DROP FUNCTION IF EXISTS queue_counters_compact()",
    "DROP FUNCTION IF EXISTS queue_counters_apply()",
)


# Queue position without counting the ready jobs ahead (SPEC §4 `position_in_queue`).
# The ready queue is ordered by a static sort_key (seconds), so it is cut into
# buckets of 1 s, 1 min, 1 h and 1 day of sort_key, and a statement-level trigger
# keeps how many ready jobs each bucket holds. A job's position is then the ready
# jobs ahead of it in its own second (an index range), plus at most 59 seconds,
# 59 minutes and 23 hours of bucket sums, plus the days before: bounded work, however
# long the queue. Bucket k of a level holds floor(floor(sort_key) / width) = k.
# Changes are kept as deltas per bucket and per server process (pg_backend_pid()): a
# connection runs one transaction at a time, so no two writers ever share a delta row,
# and each statement updates its process's row for a bucket in place (fillfactor
# leaves room for HOT updates). A position reads a few rows per bucket range, not one
# per statement since the last fold. The leader folds the deltas into one base row
# per bucket, skipping rows an open transaction holds (a writer may wait out a fold's
# few milliseconds on a row it is deleting).
RANK_LEVEL_WIDTHS: Final = (1, 60, 3600, 86400)  # seconds; each a multiple of the last

queue_rank_base = sa.Table(
    "queue_rank_base",
    metadata,
    sa.Column("level", sa.SmallInteger, primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),
    sa.Column("jobs", sa.BigInteger, nullable=False),
)
# Folding leaves emptied buckets at zero; this finds them to delete without a scan.
sa.Index(
    "ix_queue_rank_base_empty",
    queue_rank_base.c.level,
    queue_rank_base.c.bucket,
    postgresql_where=queue_rank_base.c.jobs == 0,
)

queue_rank_deltas = sa.Table(
    "queue_rank_deltas",
    metadata,
    sa.Column("level", sa.SmallInteger, primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),
    sa.Column("backend", sa.Integer, primary_key=True),
    sa.Column("delta", sa.BigInteger, nullable=False),
    postgresql_with={"fillfactor": "50"},
)

_RANK_LEVELS_SQL = "(VALUES " + ", ".join(f"({i}, float8 '{w}')" for i, w in enumerate(RANK_LEVEL_WIDTHS, 1)) + ")"

# How every function that reads the ready queue plans its reads. Only the ready-queue
# index gives ready jobs in (sort_key, job_id) order; with sorts, sequential and bitmap
# scans off, a read asking for that order has no cheaper plan than an ordered scan of
# it. The generic plan a connection keeps is made from the statistics of the moment:
# those of a new queue's first few jobs made it read the whole table, those of a queue
# with nothing ready made it read every ready job through ix_jobs_status_created, for
# each claim's window and each position until the next ANALYZE (migration 0012).
# JIT off: a disabled path's cost would otherwise set it off.
READY_QUEUE_READS: Final = """SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
SET plan_cache_mode = force_generic_plan
SET jit = off"""

QUEUE_RANK_FUNCTIONS: Final = (
    f"""
CREATE FUNCTION queue_rank_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM queue_rank_deltas;
        DELETE FROM queue_rank_base;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO queue_rank_deltas AS d (level, bucket, backend, delta)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint AS bucket, pg_backend_pid(), count(*)
        FROM new_rows AS r CROSS JOIN {_RANK_LEVELS_SQL} AS l(level, width)
        WHERE r.status = 'ready'
        GROUP BY 1, 2
        ON CONFLICT (level, bucket, backend) DO UPDATE SET delta = d.delta + EXCLUDED.delta;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO queue_rank_deltas AS d (level, bucket, backend, delta)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint AS bucket, pg_backend_pid(), -count(*)
        FROM old_rows AS r CROSS JOIN {_RANK_LEVELS_SQL} AS l(level, width)
        WHERE r.status = 'ready'
        GROUP BY 1, 2
        ON CONFLICT (level, bucket, backend) DO UPDATE SET delta = d.delta + EXCLUDED.delta;
    ELSE
        INSERT INTO queue_rank_deltas AS d (level, bucket, backend, delta)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint AS bucket, pg_backend_pid(), sum(r.delta)
        FROM (
            SELECT sort_key, 1 AS delta FROM new_rows WHERE status = 'ready'
            UNION ALL
            SELECT sort_key, -1 AS delta FROM old_rows WHERE status = 'ready'
        ) AS r CROSS JOIN {_RANK_LEVELS_SQL} AS l(level, width)
        GROUP BY 1, 2
        HAVING sum(r.delta) <> 0
        ON CONFLICT (level, bucket, backend) DO UPDATE SET delta = d.delta + EXCLUDED.delta;
    END IF;
    RETURN NULL;
END
$$
""",
    """
CREATE FUNCTION queue_rank_compact() RETURNS void
LANGUAGE sql AS $$
    WITH folded AS (
        DELETE FROM queue_rank_deltas AS d
        USING (SELECT level, bucket, backend FROM queue_rank_deltas FOR UPDATE SKIP LOCKED) AS free
        WHERE (d.level, d.bucket, d.backend) = (free.level, free.bucket, free.backend)
        RETURNING d.level, d.bucket, d.delta
    )
    INSERT INTO queue_rank_base AS base (level, bucket, jobs)
    SELECT level, bucket, sum(delta) FROM folded
    GROUP BY level, bucket
    HAVING sum(delta) <> 0
    ON CONFLICT (level, bucket) DO UPDATE SET jobs = base.jobs + EXCLUDED.jobs;
    DELETE FROM queue_rank_base WHERE jobs = 0;
$$
""",
    # The ready jobs ahead of (key, id): the bucket sums of the ranges it is given (those
    # `jobs.bucket_ranges` names, and its own second's), less the ready jobs at or after
    # it in its own second (most often none: read from the index, where counting those
    # ahead of it read as many rows as a busy second brings). A function, not
    # subqueries of the lone submission's statement: there the estimates of these reads
    # made every execution plan the whole statement afresh (migration 0005 tells why).
    # Its own reads keep one generic plan too: their shape (index ranges) does not
    # depend on the values, and planning them with values cost more than running them.
    # The ready jobs of its second are counted in queue order, so that only the
    # ready-queue index serves them (READY_QUEUE_READS).
    f"""
CREATE FUNCTION queue_position(key float8, id text, levels smallint[], lows bigint[], highs bigint[])
RETURNS bigint
LANGUAGE plpgsql STABLE
{READY_QUEUE_READS}
AS $$
BEGIN
    RETURN (
        SELECT coalesce(sum(b.jobs), 0)
        FROM unnest(levels, lows, highs) AS r(level, low, high)
        JOIN queue_rank_base AS b ON b.level = r.level AND b.bucket >= r.low AND b.bucket < r.high
    ) + (
        SELECT coalesce(sum(d.delta), 0)
        FROM unnest(levels, lows, highs) AS r(level, low, high)
        JOIN queue_rank_deltas AS d ON d.level = r.level AND d.bucket >= r.low AND d.bucket < r.high
    ) - (
        SELECT count(*) FROM (
            SELECT FROM jobs AS j
            WHERE j.status = 'ready' AND (j.sort_key, j.job_id) >= (key, id) AND j.sort_key < floor(key) + 1
            ORDER BY j.sort_key, j.job_id
        ) AS at_or_after
    );
END
$$
""",
)
# A claim's window: the first `size` ready jobs in queue order, read by the ready-queue
# index whatever the statistics say. A queue a burst has just filled has none yet
# (autovacuum analyses it up to a minute later), and the planner then took the window
# for a few rows, fetched every ready job by bitmap and sorted them all to keep the
# first K: a claim cost grown with the queue. One generic plan, made once per session.
READY_WINDOW_FUNCTION: Final = f"""
CREATE FUNCTION ready_window(size integer)
RETURNS TABLE (
    job_id text, type text, priority text, attempts integer, sort_key float8, cpu_units integer,
    memory_mb integer, timeout_seconds float8, ready_at timestamptz
)
LANGUAGE plpgsql STABLE
{READY_QUEUE_READS}
AS $$
BEGIN
    RETURN QUERY
        SELECT j.job_id, j.type, j.priority, j.attempts, j.sort_key, j.cpu_units, j.memory_mb, j.timeout_seconds,
               j.ready_at
        FROM jobs AS j WHERE j.status = 'ready' ORDER BY j.sort_key, j.job_id LIMIT size;
END
$$
"""
# Positions of several ready jobs (a batch's, a page's), per second of sort_key that
# holds some of them: the bucket counts (folded base rows and not yet folded deltas)
# of the ranges `jobs.bucket_ranges` names for that second and of the second itself
# (`jobs.own_second`), less the ready jobs of that second at or after its first asked-for
# job, plus each job's number among the ready jobs from that first one to the last,
# numbered on the ready-queue index: as `queue_position` counts a lone job, so a second
# a burst has filled is not numbered from its start (a batch of 1000 numbered every
# earlier batch of its second: 12 ms for 5,000 rows). Seconds of one minute share their
# minute's, hour's and day's ranges: each distinct range is summed once (a page of 50
# ready jobs asked 200 ranges, 71 of them distinct). A function for READY_QUEUE_READS:
# as a statement its plan read every ready job after an analysis that found none. The
# asked ids are matched as a set (hashed): in a generic plan `= ANY(ids)` searches the
# whole array for each row, a million comparisons for a batch of 1000.
QUEUE_POSITIONS_FUNCTION: Final = f"""
CREATE FUNCTION queue_positions(
    seconds float8[], first_keys float8[], first_ids text[], last_keys float8[], last_ids text[],
    range_levels smallint[], range_lows bigint[], range_highs bigint[], use_seconds float8[], use_ranges bigint[],
    ids text[]
)
RETURNS TABLE (job_id text, ahead bigint)
LANGUAGE plpgsql STABLE
{READY_QUEUE_READS}
AS $$
BEGIN
    RETURN QUERY
    WITH asked AS (
        SELECT * FROM unnest(seconds, first_keys, first_ids, last_keys, last_ids)
            AS s(second, first_key, first_id, last_key, last_id)
    ), ranges AS (
        SELECT * FROM unnest(range_levels, range_lows, range_highs) WITH ORDINALITY
            AS r(level, low, high, range_number)
    ), counted AS (
        SELECT r.range_number, sum(c.jobs) AS jobs
        FROM ranges AS r CROSS JOIN LATERAL (
            SELECT coalesce(sum(b.jobs), 0) AS jobs FROM queue_rank_base AS b
            WHERE b.level = r.level AND b.bucket >= r.low AND b.bucket < r.high
            UNION ALL
            SELECT coalesce(sum(d.delta), 0) FROM queue_rank_deltas AS d
            WHERE d.level = r.level AND d.bucket >= r.low AND d.bucket < r.high
        ) AS c
        GROUP BY r.range_number
    ), through_second AS (
        SELECT u.second, sum(counted.jobs) AS jobs
        FROM unnest(use_seconds, use_ranges) AS u(second, range_number)
        JOIN counted USING (range_number)
        GROUP BY u.second
    )
    SELECT numbered.job_id, CAST(through_second.jobs - later.jobs + numbered.within AS bigint)
    FROM asked JOIN through_second USING (second)
    CROSS JOIN LATERAL (
        SELECT count(*) AS jobs FROM (
            SELECT FROM jobs AS j
            WHERE j.status = 'ready' AND (j.sort_key, j.job_id) >= (asked.first_key, asked.first_id)
              AND j.sort_key < asked.second + 1
            ORDER BY j.sort_key, j.job_id
        ) AS at_or_after
    ) AS later
    CROSS JOIN LATERAL (
        SELECT j.job_id, row_number() OVER (ORDER BY j.sort_key, j.job_id) - 1 AS within
        FROM jobs AS j
        WHERE j.status = 'ready' AND (j.sort_key, j.job_id) >= (asked.first_key, asked.first_id)
          AND (j.sort_key, j.job_id) <= (asked.last_key, asked.last_id)
    ) AS numbered
    WHERE numbered.job_id IN (SELECT unnest(ids));
END
$$
"""
# Announcements go out as JSON arrays of up to this many bytes of messages, one
# notification a group: under PostgreSQL's 8000-byte limit, our messages being a few
# hundred bytes at most.
NOTIFY_GROUP_BYTES: Final = 7000


def grouped_notify_sql(notices: str, channel: str = ":channel") -> str:
    """SQL that announces `notices` (a query of `payload` text, one JSON object each,
    and `place`, their order) on `channel` in groups: each group one notification, a
    JSON array of its objects in order (a group of one: the object alone). Groups end
    past NOTIFY_GROUP_BYTES, so a notification stays under PostgreSQL's limit. One row per
    notification, in order; delivered at commit."""
    return f"""SELECT pg_notify({channel}, g.payload)
        FROM (
            SELECT CASE WHEN count(*) = 1 THEN min(c.payload)
                        ELSE '[' || string_agg(c.payload, ',' ORDER BY c.place) || ']' END AS payload
            FROM (
                SELECT n.payload, n.place,
                       sum(octet_length(n.payload) + 1) OVER (ORDER BY n.place) / {NOTIFY_GROUP_BYTES} AS chunk
                FROM ({notices}) AS n
            ) AS c
            GROUP BY c.chunk
            ORDER BY c.chunk
        ) AS g"""


# Each start's job.updated, in the order of the plan.
_START_NOTICES: Final = """SELECT json_build_object(
            'event', 'job.updated', 'job_id', s.job_id, 'type', s.type, 'priority', s.priority,
            'status', 'running', 'previous_status', 'ready', 'attempt', s.attempt, 'at', at_text
        )::text AS payload, s.place
    FROM started AS s"""
# A claim's start: the planned jobs to running, their attempt rows, the node's use,
# from arrays, and the announcements it builds from them (migration 0007 tells why;
# since 0011 its attempt rows are its log entries, read through job_log). One generic
# plan per session where the statement sent as such was planned afresh at every
# execution (half its cost for the one job an idle node starts); a generic plan is
# made from whatever statistics there were, so only key lookups and nested loops are
# allowed (migration 0006 tells why).
START_ATTEMPTS_FUNCTION: Final = f"""
CREATE FUNCTION start_attempts(
    ids text[], tokens uuid[], numbers integer[], cpu integer[], memory integer[], passed text[],
    at timestamptz, at_text text, node text, lease_until timestamptz, channel text
)
RETURNS TABLE (started_payloads json, announcements bigint)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
BEGIN
    RETURN QUERY
    WITH planned AS (
        SELECT * FROM unnest(ids, tokens, numbers, cpu, memory, passed) WITH ORDINALITY
            AS p(job_id, token, attempt, cpu_units, memory_mb, passed, place)
    ), active AS (
        -- The node still active and dispatch not paused since the read: else nothing starts.
        SELECT n.node_id FROM nodes AS n
        WHERE n.node_id = node AND n.status = 'active' AND NOT (SELECT d.paused FROM dispatch_control AS d)
    ), chosen AS (
        -- In id order, as everything else locks jobs. Still ready with the attempts the
        -- window saw (so no attempt number is taken twice), and not being taken by another node.
        -- The planned rows themselves, not their ids joined back to them: with hash and
        -- merge joins off, every such join compared each start with every other.
        SELECT p.*
        FROM (SELECT * FROM planned ORDER BY planned.job_id) AS p
        CROSS JOIN LATERAL (
            SELECT jobs.job_id FROM jobs
            WHERE jobs.job_id = p.job_id AND (jobs.status = 'ready') IS TRUE AND jobs.attempts = p.attempt - 1
            FOR UPDATE SKIP LOCKED
        ) AS j
        WHERE EXISTS (SELECT FROM active)
    ), started AS (
        UPDATE jobs SET status = 'running', attempts = c.attempt, started_at = at, worker_id = node,
                        lease_token = c.token, lease_expires_at = lease_until, updated_at = at
        FROM chosen AS c
        WHERE jobs.job_id = c.job_id
        RETURNING jobs.job_id, jobs.payload, jobs.type, jobs.priority, c.attempt, c.place
    ), attempt_rows AS (
        -- The attempt row is the start's log entries too (`dispatched`, `started`: see job_log).
        INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token, backfilled_past)
        SELECT c.job_id, c.attempt, node, at, c.token, c.passed FROM chosen AS c
    ), node_use AS (
        -- The node's CHECK refuses use above capacity: the database itself never oversubscribes.
        UPDATE nodes SET cpu_used = cpu_used + (SELECT coalesce(sum(c.cpu_units), 0) FROM chosen AS c),
                         memory_used = memory_used + (SELECT coalesce(sum(c.memory_mb), 0) FROM chosen AS c)
        WHERE nodes.node_id = node
    ), announced AS (
        -- Each start's job.updated, in the order of the plan (delivered at commit), in
        -- groups (grouped_notify_sql): one notification a group.
        {grouped_notify_sql(_START_NOTICES, "channel")}
    )
    SELECT (SELECT json_object_agg(s.job_id, s.payload) FROM started AS s),
           (SELECT count(*) FROM announced);
END
$$"""
# A job's log (SPEC §8), oldest first by (at, step, seq). The entries every job's own
# rows already record are read from them rather than written a second time (migration
# 0011): `submitted` and, for a job with no dependencies, `ready` from its row;
# `dispatched` and `started` from each attempt's row; `succeeded` from a successful
# attempt's end. Every other entry is a row of job_events (step 2: after a job's first
# entries, before a start written at the same instant; seq keeps their insertion order).
JOB_LOG_VIEW: Final = """
CREATE VIEW job_log AS
SELECT j.job_id, j.created_at AS at, CAST(NULL AS integer) AS attempt, CAST('info' AS text) AS level,
       CAST('submitted' AS text) AS event, 'submitted as ' || j.type AS message,
       jsonb_build_object('priority', j.priority, 'cpu_units', j.cpu_units, 'memory_mb', j.memory_mb) AS data,
       0 AS step, CAST(0 AS bigint) AS seq
FROM jobs AS j
UNION ALL
SELECT j.job_id, j.created_at, NULL, 'info', 'ready', 'no dependencies', jsonb '{}', 1, 0
FROM jobs AS j
WHERE NOT EXISTS (SELECT FROM job_dependencies AS d WHERE d.job_id = j.job_id)
UNION ALL
SELECT e.job_id, e.at, e.attempt, e.level, e.event, e.message, e.data, 2, e.id
FROM job_events AS e
UNION ALL
SELECT a.job_id, a.started_at, a.attempt, 'info', 'dispatched',
       'to ' || a.node_id || ' (' || CASE WHEN a.backfilled_past IS NULL THEN 'in queue order'
                                         ELSE 'backfilled past ' || a.backfilled_past END || ')',
       jsonb_build_object('node', a.node_id, 'cpu_units', j.cpu_units, 'memory_mb', j.memory_mb,
                          'backfill', a.backfilled_past IS NOT NULL),
       3, 0
FROM job_attempts AS a JOIN jobs AS j ON j.job_id = a.job_id
UNION ALL
SELECT a.job_id, a.started_at, a.attempt, 'info', 'started', 'attempt ' || a.attempt || ' started', jsonb '{}', 4, 0
FROM job_attempts AS a
UNION ALL
SELECT a.job_id, a.ended_at, a.attempt, 'info', 'succeeded', 'attempt ' || a.attempt || ' succeeded', jsonb '{}',
       5, 0
FROM job_attempts AS a
WHERE a.outcome = 'succeeded'
"""
JOB_LOG_VIEW_DROP: Final = "DROP VIEW IF EXISTS job_log"
QUEUE_RANK_TRIGGERS: Final = (
    "CREATE TRIGGER jobs_rank_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_rank_apply()",
    "CREATE TRIGGER jobs_rank_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_rank_apply()",
    "CREATE TRIGGER jobs_rank_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_rank_apply()",
    "CREATE TRIGGER jobs_rank_truncate AFTER TRUNCATE ON jobs FOR EACH STATEMENT EXECUTE FUNCTION queue_rank_apply()",
)
QUEUE_RANK_DROPS: Final = (
    "DROP FUNCTION IF EXISTS start_attempts(text[], uuid[], integer[], integer[], integer[], text[], timestamptz,"
    " text, text, timestamptz, text)",
    "DROP FUNCTION IF EXISTS queue_positions(float8[], float8[], text[], float8[], text[], smallint[], bigint[],"
    " bigint[], float8[], bigint[], text[])",
    "DROP FUNCTION IF EXISTS ready_window(integer)",
    "DROP FUNCTION IF EXISTS queue_position(float8, text, smallint[], bigint[], bigint[])",
    "DROP FUNCTION IF EXISTS queue_rank_compact()",
    "DROP FUNCTION IF EXISTS queue_rank_apply()",
)


def _executor(statements: Sequence[str]) -> Callable[..., None]:
    """A metadata event listener that runs `statements` in order."""

    def execute(target: sa.MetaData, connection: sa.Connection, **_: object) -> None:
        for statement in statements:
            connection.exec_driver_sql(statement)

    return execute


# The trigger machinery after create_all; dropping the jobs table took the triggers with it.
sa.event.listen(
    metadata,
    "after_create",
    _executor(
        (
            *QUEUE_COUNTER_FUNCTIONS,
            *QUEUE_COUNTER_TRIGGERS,
            *QUEUE_RANK_FUNCTIONS,
            *QUEUE_RANK_TRIGGERS,
            READY_WINDOW_FUNCTION,
            QUEUE_POSITIONS_FUNCTION,
            START_ATTEMPTS_FUNCTION,
            JOB_LOG_VIEW,
        )
    ),
)
sa.event.listen(metadata, "before_drop", _executor((JOB_LOG_VIEW_DROP,)))  # it depends on the tables
sa.event.listen(metadata, "after_drop", _executor((*QUEUE_COUNTER_DROPS, *QUEUE_RANK_DROPS)))

# Operators pause and resume dispatch on every node (SPEC §12): one row, read by each claim.
dispatch_control = sa.Table(
    "dispatch_control",
    metadata,
    sa.Column("singleton", sa.Boolean, primary_key=True, server_default=sa.true()),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.CheckConstraint("singleton", name="dispatch_control_single_row"),
)


def _insert_dispatch_row(target: sa.Table, connection: sa.Connection, **_: object) -> None:
    connection.exec_driver_sql("INSERT INTO dispatch_control (singleton, paused) VALUES (true, false)")


sa.event.listen(dispatch_control, "after_create", _insert_dispatch_row)
