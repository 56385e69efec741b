"""Queue-position buckets: ready jobs counted per second, minute, hour and day of sort_key.

`position_in_queue` counted every ready job ahead of a job; at the back of a long
queue that is a scan of the whole ready index. These tables let it be summed from
bounded ranges of bucket counts instead (see queue_service.db.tables). Frozen like
0001: nothing here imports the application.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RANK_FUNCTIONS = (
    """
CREATE FUNCTION queue_rank_apply() RETURNS trigger
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
CREATE FUNCTION queue_rank_compact() RETURNS void
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

RANK_TRIGGERS = (
    "CREATE TRIGGER jobs_rank_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION queue_rank_apply()",
    "CREATE TRIGGER jobs_rank_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION queue_rank_apply()",
    "CREATE TRIGGER jobs_rank_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION queue_rank_apply()",
    "CREATE TRIGGER jobs_rank_truncate AFTER TRUNCATE ON jobs FOR EACH STATEMENT EXECUTE FUNCTION queue_rank_apply()",
)


def upgrade() -> None:
    op.create_table(
        "queue_rank_base",
        sa.Column("level", sa.SmallInteger, nullable=False),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        sa.Column("jobs", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("level", "bucket", name="pk_queue_rank_base"),
    )
    op.create_index(
        "ix_queue_rank_base_empty", "queue_rank_base", ["level", "bucket"], postgresql_where=sa.text("jobs = 0")
    )
    op.create_table(
        "queue_rank_deltas",
        sa.Column("id", sa.BigInteger, nullable=False, autoincrement=True),
        sa.Column("level", sa.SmallInteger, nullable=False),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        sa.Column("delta", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_queue_rank_deltas"),
    )
    op.create_index("ix_queue_rank_deltas_level_bucket", "queue_rank_deltas", ["level", "bucket"])
    for statement in (*RANK_FUNCTIONS, *RANK_TRIGGERS):
        op.execute(statement)
    # Jobs already waiting are counted once, as the triggers count from now on.
    op.execute(
        """
        INSERT INTO queue_rank_base (level, bucket, jobs)
        SELECT l.level, floor(floor(r.sort_key) / l.width)::bigint, count(*)
        FROM jobs AS r CROSS JOIN (VALUES (1, float8 '1'), (2, float8 '60'), (3, float8 '3600'), (4, float8 '86400')) AS l(level, width)
        WHERE r.status = 'ready'
        GROUP BY 1, 2
        """
    )


def downgrade() -> None:
    for trigger in ("jobs_rank_insert", "jobs_rank_update", "jobs_rank_delete", "jobs_rank_truncate"):
        op.execute(f"DROP TRIGGER {trigger} ON jobs")
    op.execute("DROP FUNCTION queue_rank_compact()")
    op.execute("DROP FUNCTION queue_rank_apply()")
    op.drop_table("queue_rank_deltas")
    op.drop_table("queue_rank_base")
