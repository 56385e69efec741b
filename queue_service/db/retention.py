"""Retention: delete finished jobs older than a cut-off, so finished rows do not
pile up under the hot paths. Completed and cancelled jobs only — failed jobs are
the dead-letter queue and stay until re-driven or purged by hand — and never a
job another stored job depends on (its dependants are purged first, later)."""

from __future__ import annotations

from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

PURGE_BATCH: Final = 1000  # rows per statement: short transactions, bounded locks


async def purge_finished(conn: AsyncConnection, older_than: datetime, batch: int = PURGE_BATCH) -> int:
    """Delete up to `batch` completed or cancelled jobs finished before `older_than`,
    with their attempts and edges (cascade) and their log; returns how many went."""
    result = await conn.execute(
        sa.text(
            """
            WITH gone AS (
                DELETE FROM jobs WHERE job_id IN (
                    SELECT j.job_id FROM jobs j
                    WHERE j.status IN ('completed', 'cancelled') AND j.finished_at < :cutoff
                      AND NOT EXISTS (SELECT 1 FROM job_dependencies d WHERE d.depends_on_job_id = j.job_id)
                    ORDER BY j.finished_at
                    LIMIT :batch
                    FOR UPDATE SKIP LOCKED
                )
                RETURNING job_id
            ), log AS (
                -- The log has no foreign key to cascade along (see tables.job_events).
                DELETE FROM job_events WHERE job_id IN (SELECT job_id FROM gone)
            )
            SELECT count(*) FROM gone
            """
        ),
        {"cutoff": older_than, "batch": batch},
    )
    return int(result.scalar_one())
