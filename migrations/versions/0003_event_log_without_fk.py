"""The job log without a foreign key to jobs.

Every status change appends log rows, and each row's foreign-key check locked its
job's row (FOR KEY SHARE) and probed the jobs primary key: about a sixth of the
server time of a batch submission. The log is written only in the statements that
write its job, and the retention purge deletes a job's entries with the job
(`queue_service.db.retention`), so the key guarded nothing the code does not.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("fk_job_events_job_id_jobs", "job_events", type_="foreignkey")


def downgrade() -> None:
    # Entries a purge of an older version left behind would fail the key: drop them first.
    op.execute("DELETE FROM job_events e WHERE NOT EXISTS (SELECT FROM jobs j WHERE j.job_id = e.job_id)")
    op.create_foreign_key(
        "fk_job_events_job_id_jobs", "job_events", "jobs", ["job_id"], ["job_id"], ondelete="CASCADE"
    )
