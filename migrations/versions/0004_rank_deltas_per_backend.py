"""Queue-position deltas kept per bucket and per server process, updated in place.

0002 appended a delta row per statement and bucket; between two folds a position
summed every row appended since the last one (thousands a second under load, plus the
dead rows each fold left in the index), which cost more than the insert it answered.
Now a statement adds its changes to its own server process's row of each bucket
(`pg_backend_pid()`): a connection runs one transaction at a time, so no two
writers share a row, and a position reads a few rows per bucket range. Folding skips
the rows an open transaction holds. Frozen like 0001 and 0002.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RANK_FUNCTIONS = (
    """
CREATE OR REPLACE FUNCTION queue_rank_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM queue_rank_deltas;
        DELETE FROM queue_rank_base;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO queue_rank_deltas AS d (level, bucket, backend, delta)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint AS bucket, pg_backend_pid(), count(*)
        FROM new_rows AS r CROSS JOIN (VALUES (1, float8 '1'), (2, float8 '60'), (3, float8 '3600'), (4, float8 '86400')) AS l(level, width)
        WHERE r.status = 'ready'
        GROUP BY 1, 2
        ON CONFLICT (level, bucket, backend) DO UPDATE SET delta = d.delta + EXCLUDED.delta;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO queue_rank_deltas AS d (level, bucket, backend, delta)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint AS bucket, pg_backend_pid(), -count(*)
        FROM old_rows AS r CROSS JOIN (VALUES (1, float8 '1'), (2, float8 '60'), (3, float8 '3600'), (4, float8 '86400')) AS l(level, width)
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
        ) AS r CROSS JOIN (VALUES (1, float8 '1'), (2, float8 '60'), (3, float8 '3600'), (4, float8 '86400')) AS l(level, width)
        GROUP BY 1, 2
        HAVING sum(r.delta) <> 0
        ON CONFLICT (level, bucket, backend) DO UPDATE SET delta = d.delta + EXCLUDED.delta;
    END IF;
    RETURN NULL;
END
$$
""",
    """
CREATE OR REPLACE FUNCTION queue_rank_compact() RETURNS void
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
)

# 0002's functions, put back by downgrade.
OLD_RANK_FUNCTIONS = (
    """
CREATE OR REPLACE FUNCTION queue_rank_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM queue_rank_deltas;
        DELETE FROM queue_rank_base;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO queue_rank_deltas (level, bucket, delta)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint AS bucket, count(*)
        FROM new_rows AS r CROSS JOIN (VALUES (1, float8 '1'), (2, float8 '60'), (3, float8 '3600'), (4, float8 '86400')) AS l(level, width)
        WHERE r.status = 'ready'
        GROUP BY 1, 2;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO queue_rank_deltas (level, bucket, delta)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint AS bucket, -count(*)
        FROM old_rows AS r CROSS JOIN (VALUES (1, float8 '1'), (2, float8 '60'), (3, float8 '3600'), (4, float8 '86400')) AS l(level, width)
        WHERE r.status = 'ready'
        GROUP BY 1, 2;
    ELSE
        INSERT INTO queue_rank_deltas (level, bucket, delta)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint AS bucket, sum(r.delta)
        FROM (
            SELECT sort_key, 1 AS delta FROM new_rows WHERE status = 'ready'
            UNION ALL
            SELECT sort_key, -1 AS delta FROM old_rows WHERE status = 'ready'
        ) AS r CROSS JOIN (VALUES (1, float8 '1'), (2, float8 '60'), (3, float8 '3600'), (4, float8 '86400')) AS l(level, width)
        GROUP BY 1, 2
        HAVING sum(r.delta) <> 0;
    END IF;
    RETURN NULL;
END
$$
""",
    """
CREATE OR REPLACE FUNCTION queue_rank_compact() RETURNS void
LANGUAGE sql AS $$
    WITH folded AS (
        DELETE FROM queue_rank_deltas RETURNING level, bucket, delta
    )
    INSERT INTO queue_rank_base AS base (level, bucket, jobs)
    SELECT level, bucket, sum(delta) FROM folded
    GROUP BY level, bucket
    HAVING sum(delta) <> 0
    ON CONFLICT (level, bucket) DO UPDATE SET jobs = base.jobs + EXCLUDED.jobs;
    DELETE FROM queue_rank_base WHERE jobs = 0;
$$
""",
)


def upgrade() -> None:
    # The table is rebuilt: fold what 0002's deltas hold first, and keep writers out
    # until the new functions are in place.
    op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
    op.execute("SELECT queue_rank_compact()")
    op.drop_table("queue_rank_deltas")
    op.create_table(
        "queue_rank_deltas",
        sa.Column("level", sa.SmallInteger, nullable=False),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        sa.Column("backend", sa.Integer, nullable=False),
        sa.Column("delta", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("level", "bucket", "backend", name="pk_queue_rank_deltas"),
        postgresql_with={"fillfactor": "50"},
    )
    for statement in RANK_FUNCTIONS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
    op.execute("SELECT queue_rank_compact()")
    op.drop_table("queue_rank_deltas")
    op.create_table(
        "queue_rank_deltas",
        sa.Column("id", sa.BigInteger, nullable=False, autoincrement=True),
        sa.Column("level", sa.SmallInteger, nullable=False),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        sa.Column("delta", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_queue_rank_deltas"),
    )
    op.create_index("ix_queue_rank_deltas_level_bucket", "queue_rank_deltas", ["level", "bucket"])
    for statement in OLD_RANK_FUNCTIONS:
        op.execute(statement)
