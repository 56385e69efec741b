"""The reads of the two hottest statements, as functions with plans of their own.

A lone submission's queue position was three subqueries of its one statement
(`jobs._INSERT_ALONE_SQL`): bucket sums over ranges passed as arrays, and a count of
the ready jobs ahead in the job's own second. For the generic plan the planner could
not know the ranges' length nor that the second lies past the statistics, and its
estimate grew with the queue while a custom plan's stayed near nothing: beside a
backlog every execution planned the whole statement again, a third of its server
time. Behind `queue_position` the statement keeps its generic plan.

A claim's window of ready jobs (`ready_window`) is read in the statement that reads
the node, where the claim's first statement used to turn bitmap scans off for the
statements after it (a queue a burst has just filled has no statistics, and the
planner then fetched every ready job by bitmap and sorted them to keep K). The
function turns them off for itself, and sequential scans too: it reads the ready-queue
index in order, whatever the statistics say.

Frozen like 0001 and 0002.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
CREATE FUNCTION ready_window(size integer)
RETURNS TABLE (
    job_id text, type text, priority text, attempts integer, sort_key float8, cpu_units integer,
    memory_mb integer, timeout_seconds float8, ready_at timestamptz
)
LANGUAGE plpgsql STABLE
SET enable_bitmapscan = off
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
        SELECT j.job_id, j.type, j.priority, j.attempts, j.sort_key, j.cpu_units, j.memory_mb, j.timeout_seconds,
               j.ready_at
        FROM jobs AS j WHERE j.status = 'ready' ORDER BY j.sort_key, j.job_id LIMIT size;
END
$$
"""
    )
    op.execute(
        """
CREATE FUNCTION queue_position(key float8, id text, levels smallint[], lows bigint[], highs bigint[])
RETURNS bigint
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
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
        SELECT count(*) FROM jobs AS j
        WHERE j.status = 'ready' AND (j.sort_key, j.job_id) >= (key, id) AND j.sort_key < floor(key) + 1
    );
END
$$
"""
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS queue_position(float8, text, smallint[], bigint[], bigint[])")
    op.execute("DROP FUNCTION IF EXISTS ready_window(integer)")
