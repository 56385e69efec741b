"""Starting the planned jobs is a function with one generic plan.

The start statement (jobs to running, attempt rows, the node's use, the log and the
announcements, from arrays) was sent as a prepared statement, and PostgreSQL planned
it again at every execution: for the one or two jobs an idle node starts, the custom
plans it made from the arrays' real lengths cost less than its generic plan, so the
plan cache never switched, and planning (0.5 ms at bind) cost as much as running it.
Behind `start_attempts` it keeps one generic plan per connection.

A generic plan is made once, from whatever statistics the table had then (a fresh
queue's, before a burst, say the table is tiny). So the function allows only plans
that look every job up by its key: no sequential or bitmap scans, and nested loops
only (a hash or merge join over jobs reads the whole table or index). The status
check asks `IS TRUE`, which the ready-queue index's predicate cannot be proved from,
so that index cannot serve the lookup by id (it holds ids only after sort keys: a
scan of all of it). The joins the rule forces elsewhere are among a few dozen
planned jobs. JIT is off whoever calls: the one-row dispatch_control has no index,
so its scan carries the cost that disables sequential scans, which would otherwise
set any caller's JIT compiling the statement (0.3 s) at every call.

Frozen like 0001 and 0002.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
CREATE FUNCTION start_attempts(
    ids text[], tokens uuid[], numbers integer[], cpu integer[], memory integer[], at timestamptz,
    node text, lease_until timestamptz, log_jobs text[], log_attempts integer[], log_levels text[],
    log_events text[], log_messages text[], log_data text[], channel text, notice_jobs text[],
    notice_payloads text[]
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
        SELECT * FROM unnest(ids, tokens, numbers, cpu, memory) AS p(job_id, token, attempt, cpu_units, memory_mb)
    ), active AS (
        -- The node still active and dispatch not paused since the read: else nothing starts.
        SELECT n.node_id FROM nodes AS n
        WHERE n.node_id = node AND n.status = 'active' AND NOT (SELECT d.paused FROM dispatch_control AS d)
    ), locked AS (
        -- In id order, as everything else locks jobs. Still ready with the attempts the
        -- window saw (so no attempt number is taken twice), and not being taken by another node.
        SELECT j.job_id
        FROM (SELECT * FROM planned ORDER BY planned.job_id) AS p
        CROSS JOIN LATERAL (
            SELECT jobs.job_id FROM jobs
            WHERE jobs.job_id = p.job_id AND (jobs.status = 'ready') IS TRUE AND jobs.attempts = p.attempt - 1
            FOR UPDATE SKIP LOCKED
        ) AS j
        WHERE EXISTS (SELECT FROM active)
    ), chosen AS (
        SELECT planned.* FROM planned JOIN locked ON locked.job_id = planned.job_id
    ), started AS (
        UPDATE jobs SET status = 'running', attempts = c.attempt, started_at = at, worker_id = node,
                        lease_token = c.token, lease_expires_at = lease_until, updated_at = at
        FROM chosen AS c
        WHERE jobs.job_id = c.job_id
        RETURNING jobs.job_id, jobs.payload
    ), attempt_rows AS (
        INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token)
        SELECT c.job_id, c.attempt, node, at, c.token FROM chosen AS c
    ), node_use AS (
        -- The node's CHECK refuses use above capacity: the database itself never oversubscribes.
        UPDATE nodes SET cpu_used = cpu_used + (SELECT coalesce(sum(c.cpu_units), 0) FROM chosen AS c),
                         memory_used = memory_used + (SELECT coalesce(sum(c.memory_mb), 0) FROM chosen AS c)
        WHERE nodes.node_id = node
    ), logged AS (
        INSERT INTO job_events (job_id, at, attempt, level, event, message, data)
        SELECT l.job_id, at, l.attempt, l.level, l.event, l.message, CAST(l.data AS jsonb)
        FROM unnest(log_jobs, log_attempts, log_levels, log_events, log_messages, log_data)
            AS l(job_id, attempt, level, event, message, data)
        WHERE l.job_id IN (SELECT c.job_id FROM chosen AS c)
    ), announced AS (
        SELECT pg_notify(channel, n.payload)
        FROM unnest(notice_jobs, notice_payloads) AS n(job_id, payload)
        WHERE n.job_id IN (SELECT c.job_id FROM chosen AS c)
    )
    SELECT (SELECT json_object_agg(s.job_id, s.payload) FROM started AS s),
           (SELECT count(*) FROM announced);
END
$$
"""
    )


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION IF EXISTS start_attempts(text[], uuid[], integer[], integer[], integer[], timestamptz, text,"
        " timestamptz, text[], integer[], text[], text[], text[], text[], text, text[], text[])"
    )
