"""Job log entries and change announcements (SPEC §8), written in the same
transaction as the change they describe.

Announcements go out with `pg_notify`, which PostgreSQL delivers only when the
transaction commits, so a listener never hears of a change that rolled back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final

import orjson
import sqlalchemy as sa

from queue_service.db import driver
from queue_service.db.tables import grouped_notify_sql

CHANNEL: Final = "taskqueue_events"
# Messages go out in groups (tables.grouped_notify_sql), one notification a group,
# where each cost its own (the server queues, and every listener receives and wakes
# for, each one).
WAKE_DISPATCH: Final = "dispatch.wake"
DISPATCH_PAUSED: Final = "dispatch.paused"  # nodes stop waking for new work until resumed
DISPATCH_RESUMED: Final = "dispatch.resumed"  # a node that found dispatch paused claims again at once
CANCEL_ATTEMPT: Final = "attempt.cancel"
JOB_UPDATED: Final = "job.updated"
# On a job.updated to ready, where the writer has them at hand: what a node plans and
# starts the job with (Queued's fields but those the event carries), so an idle node
# that knows the whole ready queue can start it without reading it first. Internal:
# the WebSocket stream leaves it out (SPEC §8 fixes the event's fields).
QUEUE_ENTRY: Final = "queue"


def compact_json(document: Mapping[str, Any]) -> str:
    """One of our own documents (an announcement, a log entry's data) as compact JSON:
    orjson, a tenth of the standard encoder's time on every job's every change. Never
    for client documents (core.validation.standard_json is): orjson refuses integers past
    64 bits, which JSON allows."""
    return orjson.dumps(document if isinstance(document, dict) else dict(document)).decode()


@dataclass(frozen=True)
class LogEntry:
    job_id: str
    event: str
    message: str
    at: datetime
    attempt: int | None = None
    level: str = "info"
    data: Mapping[str, Any] = field(default_factory=dict)


# Insert the entries `log_arrays` gives, all at the instant `:now`, in the order given
# (their ids in that order), alone or as the body of a CTE.
LOG_INSERT_SQL: Final = """INSERT INTO job_events (job_id, at, attempt, level, event, message, data)
        SELECT l.job_id, :now, l.attempt, l.level, l.event, l.message, CAST(l.data AS jsonb)
        FROM unnest(
            CAST(:log_jobs AS text[]), CAST(:log_attempts AS integer[]), CAST(:log_levels AS text[]),
            CAST(:log_events AS text[]), CAST(:log_messages AS text[]), CAST(:log_data AS text[])
        ) WITH ORDINALITY AS l(job_id, attempt, level, event, message, data, place)
        ORDER BY l.place"""


def log_arrays(entries: Sequence[LogEntry]) -> dict[str, list[Any]]:
    """Log entries as the parallel arrays a statement unnests into job_events (`log_*`)."""
    return {
        "log_jobs": [e.job_id for e in entries],
        "log_attempts": [e.attempt for e in entries],
        "log_levels": [e.level for e in entries],
        "log_events": [e.event for e in entries],
        "log_messages": [e.message for e in entries],
        "log_data": [compact_json(e.data) for e in entries],
    }


_WRITE_LOG_SQL: Final = driver.Statement(sa.text(LOG_INSERT_SQL))


async def write_log(conn: driver.Executor, entries: Sequence[LogEntry]) -> None:
    """Write `entries`, which share one instant (each change's entries are stamped
    with the time of the change), in the order given."""
    if not entries:
        return
    instants = {entry.at for entry in entries}
    if len(instants) > 1:
        raise ValueError(f"log entries written together share one instant, not {len(instants)}")
    await driver.execute(conn, _WRITE_LOG_SQL, {**log_arrays(entries), "now": entries[0].at})


@lru_cache(maxsize=256)
def iso_z(at: datetime) -> str:
    """ISO 8601 UTC with `Z`, as every timestamp the API returns (SPEC §3). Cached:
    a batch stamps its thousand answers and announcements with one instant."""
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class StatusChange:
    """One job's status change, as the WebSocket stream carries it."""

    job_id: str
    type: str
    priority: str
    status: str
    previous_status: str | None
    attempt: int
    at: datetime
    queued: Mapping[str, Any] | None = None  # QUEUE_ENTRY, for a job now ready

    def payload(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "event": JOB_UPDATED,
            "job_id": self.job_id,
            "type": self.type,
            "priority": self.priority,
            "status": self.status,
            "previous_status": self.previous_status,
            "attempt": self.attempt,
            "at": iso_z(self.at),
        }
        if self.queued is not None:
            message[QUEUE_ENTRY] = self.queued
        return message


def queue_entry(
    sort_key: float, cpu_units: int, memory_mb: int, timeout_seconds: float, attempts: int
) -> dict[str, Any]:
    """The QUEUE_ENTRY of a job that is now ready."""
    return {
        "sort_key": sort_key,
        "cpu_units": cpu_units,
        "memory_mb": memory_mb,
        "timeout_seconds": timeout_seconds,
        "attempts": attempts,
    }


def notified_messages(payload: str) -> list[Any]:
    """The messages of one notification: an object alone, or a group of them (see
    tables.grouped_notify_sql), in order. Raises orjson.JSONDecodeError when it is not JSON."""
    decoded = orjson.loads(payload)
    return decoded if isinstance(decoded, list) else [decoded]


_ANNOUNCE_SQL: Final = driver.Statement(
    sa.text(
        grouped_notify_sql(
            "SELECT p.payload, p.place FROM unnest(CAST(:payloads AS text[])) WITH ORDINALITY AS p(payload, place)"
        )
    )
)


async def announce(conn: driver.Executor, messages: Sequence[Mapping[str, Any]]) -> None:
    """Queue NOTIFYs on the events channel; delivered at commit, in order."""
    if not messages:
        return
    await driver.execute(conn, _ANNOUNCE_SQL, {"channel": CHANNEL, "payloads": [compact_json(m) for m in messages]})


async def announce_changes(conn: driver.Executor, changes: Sequence[StatusChange], *, wake: bool = False) -> None:
    messages: list[Mapping[str, Any]] = [change.payload() for change in changes]
    if wake:
        messages.append({"event": WAKE_DISPATCH})
    await announce(conn, messages)
