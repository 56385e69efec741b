"""A start without joins that compare every start with every other.

`start_attempts` found the planned rows it had locked by joining their ids back to
the plan, and each started row's attempt and place in the plan the same way. Its
generic plan may only use key lookups and nested loops (migration 0006), so each
of those joins compared every start with every other: 4,032 comparisons for a
64-unit node's round of 64, twice. The locked rows now carry the plan's columns
themselves, and the update returns the attempt and place it wrote. The same
starts, log entries and announcements, in the same order. A call starting 64
jobs, the two functions alternated on one database (medians of 30): 12.96 ->
11.08 ms on a slow spell of the machine, 7.66 -> 6.91 ms on a faster one; one
starting 8, as the default node does, unchanged (1.95 ms both).

Frozen like 0001 and 0002.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
CREATE OR REPLACE FUNCTION start_attempts(
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
        INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token)
        SELECT c.job_id, c.attempt, node, at, c.token FROM chosen AS c
    ), node_use AS (
        -- The node's CHECK refuses use above capacity: the database itself never oversubscribes.
        UPDATE nodes SET cpu_used = cpu_used + (SELECT coalesce(sum(c.cpu_units), 0) FROM chosen AS c),
                         memory_used = memory_used + (SELECT coalesce(sum(c.memory_mb), 0) FROM chosen AS c)
        WHERE nodes.node_id = node
    ), logged AS (
        -- Each start's `dispatched` and `started` entries, in the order of the plan.
        INSERT INTO job_events (job_id, at, attempt, level, event, message, data)
        SELECT c.job_id, at, c.attempt, 'info', e.event, e.message, e.data
        FROM chosen AS c CROSS JOIN LATERAL (VALUES
            (1, 'dispatched',
             'to ' || node || ' (' || CASE WHEN c.passed IS NULL THEN 'in queue order'
                                           ELSE 'backfilled past ' || c.passed END || ')',
             jsonb_build_object('node', node, 'cpu_units', c.cpu_units, 'memory_mb', c.memory_mb,
                                'backfill', c.passed IS NOT NULL)),
            (2, 'started', 'attempt ' || c.attempt || ' started', jsonb '{}')
        ) AS e(step, event, message, data)
        ORDER BY c.place, e.step
    ), announced AS (
        -- Each start's job.updated, in the order of the plan (delivered at commit).
        SELECT pg_notify(channel, o.payload)
        FROM (
            SELECT json_build_object(
                       'event', 'job.updated', 'job_id', s.job_id, 'type', s.type, 'priority', s.priority,
                       'status', 'running', 'previous_status', 'ready', 'attempt', s.attempt, 'at', at_text
                   )::text AS payload
            FROM started AS s
            ORDER BY s.place
        ) AS o
    )
    SELECT (SELECT json_object_agg(s.job_id, s.payload) FROM started AS s),
           (SELECT count(*) FROM announced);
END
$$
"""
    )


def downgrade() -> None:
    op.execute(
        """
CREATE OR REPLACE FUNCTION start_attempts(
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
        RETURNING jobs.job_id, jobs.payload, jobs.type, jobs.priority
    ), attempt_rows AS (
        INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token)
        SELECT c.job_id, c.attempt, node, at, c.token FROM chosen AS c
    ), node_use AS (
        -- The node's CHECK refuses use above capacity: the database itself never oversubscribes.
        UPDATE nodes SET cpu_used = cpu_used + (SELECT coalesce(sum(c.cpu_units), 0) FROM chosen AS c),
                         memory_used = memory_used + (SELECT coalesce(sum(c.memory_mb), 0) FROM chosen AS c)
        WHERE nodes.node_id = node
    ), logged AS (
        -- Each start's `dispatched` and `started` entries, in the order of the plan.
        INSERT INTO job_events (job_id, at, attempt, level, event, message, data)
        SELECT c.job_id, at, c.attempt, 'info', e.event, e.message, e.data
        FROM chosen AS c CROSS JOIN LATERAL (VALUES
            (1, 'dispatched',
             'to ' || node || ' (' || CASE WHEN c.passed IS NULL THEN 'in queue order'
                                           ELSE 'backfilled past ' || c.passed END || ')',
             jsonb_build_object('node', node, 'cpu_units', c.cpu_units, 'memory_mb', c.memory_mb,
                                'backfill', c.passed IS NOT NULL)),
            (2, 'started', 'attempt ' || c.attempt || ' started', jsonb '{}')
        ) AS e(step, event, message, data)
        ORDER BY c.place, e.step
    ), announced AS (
        -- Each start's job.updated, in the order of the plan (delivered at commit).
        SELECT pg_notify(channel, o.payload)
        FROM (
            SELECT json_build_object(
                       'event', 'job.updated', 'job_id', s.job_id, 'type', s.type, 'priority', s.priority,
                       'status', 'running', 'previous_status', 'ready', 'attempt', c.attempt, 'at', at_text
                   )::text AS payload
            FROM chosen AS c JOIN started AS s ON s.job_id = c.job_id
            ORDER BY c.place
        ) AS o
    )
    SELECT (SELECT json_object_agg(s.job_id, s.payload) FROM started AS s),
           (SELECT count(*) FROM announced);
END
$$
"""
    )
