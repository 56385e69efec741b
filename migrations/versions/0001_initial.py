"""Initial schema: jobs, dependencies, attempts, events, nodes, schedules, queue counters, dispatch control.

Written by hand and frozen: it imports nothing from the application, so later
changes to queue_service.db.tables cannot rewrite history. The migration test
diffs the schema this builds against the declared one.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")
EMPTY_OBJECT = sa.text("'{}'::jsonb")


def _ts(name: str, *, nullable: bool = True, now_default: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, server_default=NOW if now_default else None)


COUNTER_FUNCTIONS = (
    """
CREATE FUNCTION queue_counters_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_counters (status, priority, delta)
        SELECT status, priority, count(*) FROM new_rows GROUP BY status, priority;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO queue_counters (status, priority, delta)
        SELECT status, priority, -count(*) FROM old_rows GROUP BY status, priority;
    ELSIF TG_OP = 'TRUNCATE' THEN
        DELETE FROM queue_counters;
    ELSE
        INSERT INTO queue_counters (status, priority, delta)
        SELECT status, priority, sum(delta) FROM (
            SELECT status, priority, 1 AS delta FROM new_rows
            UNION ALL
            SELECT status, priority, -1 AS delta FROM old_rows
        ) AS changes
        GROUP BY status, priority
        HAVING sum(delta) <> 0;
    END IF;
    RETURN NULL;
END
$$
""",
    """
CREATE FUNCTION queue_counters_compact() RETURNS void
LANGUAGE sql AS $$
    WITH folded AS (
        DELETE FROM queue_counters RETURNING status, priority, delta
    )
    INSERT INTO queue_counters (status, priority, delta)
    SELECT status, priority, sum(delta) FROM folded
    GROUP BY status, priority
    HAVING sum(delta) <> 0
$$
""",
)

COUNTER_TRIGGERS = (
    "CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_counters_apply()",
    "CREATE TRIGGER jobs_count_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_counters_apply()",
    "CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_counters_apply()",
    # TRUNCATE fires no DELETE trigger; without this a test reset would leave stale depths.
    "CREATE TRIGGER jobs_count_truncate AFTER TRUNCATE ON jobs"
    " FOR EACH STATEMENT EXECUTE FUNCTION queue_counters_apply()",
)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("priority", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("cpu_units", sa.Integer, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("backoff_multiplier", sa.Double, nullable=False),
        sa.Column("initial_delay_seconds", sa.Double, nullable=False),
        sa.Column("max_delay_seconds", sa.Double, nullable=False),
        sa.Column("jitter", sa.Double, nullable=False),
        sa.Column("timeout_seconds", sa.Double, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=True),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("counted_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempt_budget", sa.Integer, nullable=False),
        sa.Column("unfinished_deps", sa.Integer, nullable=False, server_default="0"),
        _ts("created_at", nullable=False, now_default=True),
        _ts("updated_at", nullable=False, now_default=True),
        _ts("ready_at"),
        _ts("started_at"),
        _ts("finished_at"),
        _ts("next_attempt_at"),
        sa.Column("sort_key", sa.Double, nullable=True),
        sa.Column("lease_token", UUID(as_uuid=True), nullable=True),
        _ts("lease_expires_at"),
        sa.Column("worker_id", sa.Text, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("cancel_reason", sa.Text, nullable=True),
        sa.Column("result", JSONB, nullable=True),
        sa.PrimaryKeyConstraint("job_id", name="pk_jobs"),
        sa.UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),
        sa.CheckConstraint("priority IN ('critical', 'high', 'normal', 'low')", name="priority_valid"),
        sa.CheckConstraint(
            "status IN ('blocked', 'ready', 'running', 'retrying', 'completed', 'failed', 'cancelled')",
            name="status_valid",
        ),
        sa.CheckConstraint(
            "failure_reason IS NULL OR failure_reason IN ('max_attempts_exhausted', 'permanent_error',"
            " 'dependency_failed')",
            name="failure_reason_valid",
        ),
        sa.CheckConstraint(
            "cancel_reason IS NULL OR cancel_reason IN ('user', 'dependency_cancelled')", name="cancel_reason_valid"
        ),
        sa.CheckConstraint("status <> 'failed' OR failure_reason IS NOT NULL", name="failed_has_reason"),
        sa.CheckConstraint("status <> 'cancelled' OR cancel_reason IS NOT NULL", name="cancelled_has_reason"),
        sa.CheckConstraint("char_length(type) BETWEEN 1 AND 64", name="type_length"),
        sa.CheckConstraint("cpu_units >= 1", name="cpu_units_positive"),
        sa.CheckConstraint("memory_mb >= 1", name="memory_mb_positive"),
        sa.CheckConstraint(
            "max_attempts >= 1 AND backoff_multiplier >= 1 AND initial_delay_seconds >= 0"
            " AND max_delay_seconds >= initial_delay_seconds AND jitter BETWEEN 0 AND 1",
            name="retry_config_valid",
        ),
        sa.CheckConstraint("timeout_seconds > 0", name="timeout_positive"),
        sa.CheckConstraint(
            "counted_attempts >= 0 AND counted_attempts <= attempts AND counted_attempts <= attempt_budget",
            name="attempt_counts_valid",
        ),
        sa.CheckConstraint("unfinished_deps >= 0", name="unfinished_deps_non_negative"),
        sa.CheckConstraint(
            "status IN ('failed', 'cancelled') OR (status = 'blocked') = (unfinished_deps > 0)",
            name="blocked_iff_unfinished_deps",
        ),
        sa.CheckConstraint(
            "status <> 'ready' OR (ready_at IS NOT NULL AND sort_key IS NOT NULL)", name="ready_is_queued"
        ),
        sa.CheckConstraint("status <> 'retrying' OR next_attempt_at IS NOT NULL", name="retrying_has_due_time"),
        sa.CheckConstraint(
            "(status = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)",
            name="lease_held_iff_running",
        ),
    )
    op.create_index("ix_jobs_ready_queue", "jobs", ["sort_key", "job_id"], postgresql_where=sa.text("status = 'ready'"))
    op.create_index("ix_jobs_retry_due", "jobs", ["next_attempt_at"], postgresql_where=sa.text("status = 'retrying'"))
    op.create_index(
        "ix_jobs_lease_expiry", "jobs", ["lease_expires_at"], postgresql_where=sa.text("status = 'running'")
    )
    op.create_index("ix_jobs_running_node", "jobs", ["worker_id"], postgresql_where=sa.text("status = 'running'"))
    op.create_index("ix_jobs_created", "jobs", [sa.text("created_at DESC"), sa.text("job_id DESC")])
    op.create_index("ix_jobs_status_created", "jobs", ["status", sa.text("created_at DESC"), sa.text("job_id DESC")])
    op.create_index("ix_jobs_type_created", "jobs", ["type", sa.text("created_at DESC"), sa.text("job_id DESC")])
    op.create_index(
        "ix_jobs_dead_letter",
        "jobs",
        [sa.text("finished_at DESC"), sa.text("job_id DESC")],
        postgresql_where=sa.text("status = 'failed'"),
    )
    op.create_index(
        "ix_jobs_retention",
        "jobs",
        ["finished_at"],
        postgresql_where=sa.text("status IN ('completed', 'cancelled')"),
    )

    op.create_table(
        "job_dependencies",
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("depends_on_job_id", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "depends_on_job_id", name="pk_job_dependencies"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.job_id"], name="fk_job_dependencies_job_id_jobs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["depends_on_job_id"], ["jobs.job_id"], name="fk_job_dependencies_depends_on_job_id_jobs"
        ),
        sa.CheckConstraint("job_id <> depends_on_job_id", name="dependency_not_self"),
    )
    op.create_index("ix_job_dependencies_depends_on_job_id", "job_dependencies", ["depends_on_job_id"])

    op.create_table(
        "job_attempts",
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        _ts("started_at", nullable=False),
        _ts("ended_at"),
        sa.Column("outcome", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("lease_token", UUID(as_uuid=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "attempt", name="pk_job_attempts"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.job_id"], name="fk_job_attempts_job_id_jobs", ondelete="CASCADE"),
        sa.CheckConstraint("attempt >= 1", name="attempt_number_positive"),
        sa.CheckConstraint(
            "outcome IS NULL OR outcome IN ('succeeded', 'failed', 'timed_out', 'permanent_failure', 'worker_lost',"
            " 'cancelled', 'interrupted')",
            name="attempt_outcome_valid",
        ),
        sa.CheckConstraint("(ended_at IS NULL) = (outcome IS NULL)", name="attempt_ended_iff_outcome"),
    )
    op.create_index(
        "ux_job_attempts_one_running",
        "job_attempts",
        ["job_id"],
        unique=True,
        postgresql_where=sa.text("outcome IS NULL"),
    )

    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger, nullable=False, autoincrement=True),
        sa.Column("job_id", sa.Text, nullable=False),
        _ts("at", nullable=False, now_default=True),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("level", sa.Text, nullable=False, server_default="info"),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("data", JSONB, nullable=False, server_default=EMPTY_OBJECT),
        sa.PrimaryKeyConstraint("id", name="pk_job_events"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.job_id"], name="fk_job_events_job_id_jobs", ondelete="CASCADE"),
        sa.CheckConstraint("level IN ('debug', 'info', 'warning', 'error')", name="event_level_valid"),
    )
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"])

    op.create_table(
        "nodes",
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("cpu_capacity", sa.Integer, nullable=False),
        sa.Column("memory_capacity", sa.Integer, nullable=False),
        sa.Column("cpu_used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("memory_used", sa.Integer, nullable=False, server_default="0"),
        _ts("started_at", nullable=False, now_default=True),
        _ts("heartbeat_at", nullable=False, now_default=True),
        sa.Column("status", sa.Text, nullable=False, server_default="active"),
        sa.PrimaryKeyConstraint("node_id", name="pk_nodes"),
        sa.CheckConstraint("cpu_capacity >= 1 AND memory_capacity >= 1", name="node_capacity_positive"),
        sa.CheckConstraint("cpu_used BETWEEN 0 AND cpu_capacity", name="node_cpu_within_capacity"),
        sa.CheckConstraint("memory_used BETWEEN 0 AND memory_capacity", name="node_memory_within_capacity"),
        sa.CheckConstraint("status IN ('active', 'draining', 'stopped', 'lost')", name="node_status_valid"),
    )

    op.create_table(
        "schedules",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("cron", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False, server_default="UTC"),
        sa.Column("job_template", JSONB, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("misfire", sa.Text, nullable=False, server_default="skip"),
        _ts("next_fire_at"),
        _ts("last_fired_at"),
        _ts("created_at", nullable=False, now_default=True),
        _ts("updated_at", nullable=False, now_default=True),
        sa.PrimaryKeyConstraint("name", name="pk_schedules"),
        sa.CheckConstraint("misfire IN ('skip', 'run_once')", name="schedule_misfire_valid"),
    )
    op.create_index("ix_schedules_due", "schedules", ["next_fire_at"], postgresql_where=sa.text("enabled"))

    op.create_table(
        "queue_counters",
        sa.Column("id", sa.BigInteger, nullable=False, autoincrement=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("priority", sa.Text, nullable=False),
        sa.Column("delta", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_queue_counters"),
    )
    for statement in (*COUNTER_FUNCTIONS, *COUNTER_TRIGGERS):
        op.execute(statement)

    op.create_table(
        "dispatch_control",
        sa.Column("singleton", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("singleton", name="pk_dispatch_control"),
        sa.CheckConstraint("singleton", name="dispatch_control_single_row"),
    )
    op.execute("INSERT INTO dispatch_control (singleton, paused) VALUES (true, false)")


def downgrade() -> None:
    for trigger in ("jobs_count_insert", "jobs_count_update", "jobs_count_delete", "jobs_count_truncate"):
        op.execute(f"DROP TRIGGER {trigger} ON jobs")
    op.execute("DROP FUNCTION queue_counters_compact()")
    op.execute("DROP FUNCTION queue_counters_apply()")
    op.drop_table("dispatch_control")
    op.drop_table("queue_counters")
    op.drop_table("schedules")
    op.drop_table("nodes")
    op.drop_table("job_events")
    op.drop_table("job_attempts")
    op.drop_table("job_dependencies")
    op.drop_table("jobs")
