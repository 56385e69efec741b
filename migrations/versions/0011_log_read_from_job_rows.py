"""The job log reads what a job's own rows record instead of writing it twice.

Every job wrote the same five log rows on its common path: `submitted` and `ready`
at submission, `dispatched` and `started` at each start, `succeeded` at the end,
each a copy of what its job row and attempt row already hold (the job's type,
priority, resources and creation time; each attempt's node, start and end). The
view job_log reads those entries from the rows themselves, beside the rows of
job_events that record everything else, in the order the log was written; each
attempt row now also records the queued job its start passed over
(`backfilled_past`), the one fact of `dispatched` no row had. The schema's ceiling
(loadtest.bench_ceiling, the same writes without the five rows, two alternations of
three runs): enqueue one by one 1.07-1.09x, in batches of 1000 1.31-1.41x, drain
rounds of 8 and 64 within the machine's noise (0.86-1.12x); a batch of 1000
submitted in process 87 -> 69 ms (client CPU 49 -> 40 ms).

The start function also sends its announcements in groups, a JSON array of up to
7000 bytes of them a notification (tables.grouped_notify_sql), where each start
was a notification of its own; listeners read either form.

Upgrade: the column, each recorded backfill copied into it, the copies deleted
from job_events (one DELETE, as long as the log is), the start function that no
longer logs, the view. Every process of the service must run this version: an
earlier one would write the entries the log now reads from rows (they would show
twice) and could not read grouped announcements. Downgrade writes the log back into
job_events whole, in the view's order, so a log read by id reads the same.

Frozen like 0001 and 0002.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DERIVED_EVENTS = (
    "event IN ('submitted', 'dispatched', 'started', 'succeeded')"
    " OR (event = 'ready' AND message = 'no dependencies' AND attempt IS NULL)"
)


def upgrade() -> None:
    op.execute("ALTER TABLE job_attempts ADD COLUMN backfilled_past text")
    op.execute(
        """
UPDATE job_attempts AS a
SET backfilled_past = substring(e.message FROM '\\(backfilled past (.*)\\)$')
FROM job_events AS e
WHERE e.job_id = a.job_id AND e.attempt = a.attempt AND e.event = 'dispatched'
  AND (e.data ->> 'backfill') = 'true'
"""
    )
    op.execute(f"DELETE FROM job_events WHERE {_DERIVED_EVENTS}")
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
        SELECT pg_notify(channel, g.payload)
        FROM (
            SELECT CASE WHEN count(*) = 1 THEN min(c.payload)
                        ELSE '[' || string_agg(c.payload, ',' ORDER BY c.place) || ']' END AS payload
            FROM (
                SELECT n.payload, n.place,
                       sum(octet_length(n.payload) + 1) OVER (ORDER BY n.place) / 7000 AS chunk
                FROM (SELECT json_build_object(
            'event', 'job.updated', 'job_id', s.job_id, 'type', s.type, 'priority', s.priority,
            'status', 'running', 'previous_status', 'ready', 'attempt', s.attempt, 'at', at_text
        )::text AS payload, s.place
    FROM started AS s) AS n
            ) AS c
            GROUP BY c.chunk
            ORDER BY c.chunk
        ) AS g
    )
    SELECT (SELECT json_object_agg(s.job_id, s.payload) FROM started AS s),
           (SELECT count(*) FROM announced);
END
$$"""
    )
    op.execute(
        """
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
    )


def downgrade() -> None:
    # The whole log back into job_events in the view's order: ids then follow it again.
    op.execute(
        "CREATE TEMPORARY TABLE job_log_copy AS"
        " SELECT job_id, at, attempt, level, event, message, data,"
        " row_number() OVER (ORDER BY at, job_id, step, seq) AS place FROM job_log"
    )
    op.execute("DROP VIEW job_log")
    op.execute("TRUNCATE job_events")
    op.execute(
        "INSERT INTO job_events (job_id, at, attempt, level, event, message, data)"
        " SELECT job_id, at, attempt, level, event, message, data FROM job_log_copy ORDER BY place"
    )
    op.execute("DROP TABLE job_log_copy")
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
    op.execute("ALTER TABLE job_attempts DROP COLUMN backfilled_past")
