"""The job log's primary key is (job_id, id), the index its reads use, in place of id alone.

A job's log is read by job, in id order, through the index on (job_id, id); the
primary key on id served no query and cost every log row (five or more per job) an
entry in a second index. The key takes that index's place (as pk_job_events), so
the table keeps a primary key and each row has one index entry. Measured with
loadtest.bench_ceiling's workloads (the same writes without the id index), three
alternations: enqueue one by one +3%, in batches of 1000 +2%, drain rounds of 8 +10%.
The new key's index is built before the old ones are dropped; the build holds a lock
that blocks writes to the log (a few seconds per ten million entries).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE UNIQUE INDEX job_events_job_id_id_key ON job_events (job_id, id)")
    op.execute("ALTER TABLE job_events DROP CONSTRAINT pk_job_events")
    op.execute("DROP INDEX ix_job_events_job_id_id")
    op.execute("ALTER TABLE job_events ADD CONSTRAINT pk_job_events PRIMARY KEY USING INDEX job_events_job_id_id_key")


def downgrade() -> None:
    op.execute("ALTER TABLE job_events DROP CONSTRAINT pk_job_events")
    op.execute("ALTER TABLE job_events ADD CONSTRAINT pk_job_events PRIMARY KEY (id)")
    op.execute("CREATE INDEX ix_job_events_job_id_id ON job_events (job_id, id)")
