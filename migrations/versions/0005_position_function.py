"""A lone submission's queue position, computed by a function.

The position was three subqueries of the one-statement submission
(`jobs._INSERT_ALONE_SQL`): bucket sums over ranges passed as arrays, and a count of
the ready jobs ahead in the job's own second. For the generic plan the planner could
not know the ranges' length nor that the second lies past the statistics, and its
estimate grew with the queue while a custom plan's stayed near nothing: every
execution planned the whole statement again, a third of its server time. Behind a
function the statement keeps its generic plan and only the small reads inside are
planned. Frozen like 0001 and 0002.

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
    ) + (
        SELECT count(*) FROM jobs AS j
        WHERE j.status = 'ready' AND j.sort_key >= floor(key) AND (j.sort_key, j.job_id) < (key, id)
    );
END
$$
"""
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS queue_position(float8, text, smallint[], bigint[], bigint[])")
