"""The schedules aggregate in SQL (SPEC §10): cron schedules and their firing.

Firing is what the leader runs each tick: due schedules are locked
(`FOR UPDATE SKIP LOCKED`), the fires `queue_service.cron` says are due become
jobs through the ordinary submission (`jobs.submit`), and `next_fire_at` moves
on, all in one transaction. One job per fire time holds three ways over: one
leader fires; a schedule row is fired by one transaction at a time and its
`next_fire_at` never goes back; and the job id `cron:<name>:<fire time>` is the
jobs table's primary key, so even two firings of the same time would meet at
the key and the second would be answered as a replay, creating nothing.
Callers own the transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from queue_service import cron
from queue_service.core.errors import QueueError
from queue_service.core.model import Resources
from queue_service.core.policy import PolicyConfig
from queue_service.db import jobs, tables
from queue_service.db.events import iso_z

FIRE_BATCH: Final = 100  # due schedules fired per transaction
EDITABLE: Final = frozenset({"cron", "timezone", "job_template", "enabled", "misfire"})

_schedules = tables.schedules


class ScheduleNotFound(QueueError):
    code = "schedule_not_found"


class ScheduleExists(QueueError):
    code = "schedule_exists"


@dataclass(frozen=True)
class Fired:
    """One firing tick: the jobs created, and the schedules whose fire failed (name, why)."""

    created: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


async def create_schedule(conn: AsyncConnection, values: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """Store a validated schedule; ScheduleExists if the name is taken."""
    row = {**values, "created_at": now, "updated_at": now, "next_fire_at": _next(values, now)}
    statement = pg_insert(_schedules).values(row).on_conflict_do_nothing().returning(_schedules.c.name)
    if (await conn.execute(statement)).first() is None:
        raise ScheduleExists(f"a schedule named {values['name']!r} already exists")
    return await get_schedule(conn, values["name"], now)


async def get_schedule(conn: AsyncConnection, name: str, now: datetime) -> dict[str, Any]:
    row = (await conn.execute(sa.select(_schedules).where(_schedules.c.name == name))).one_or_none()
    if row is None:
        raise ScheduleNotFound(f"no schedule {name!r}")
    return public(row, now)


async def list_schedules(conn: AsyncConnection, now: datetime) -> list[dict[str, Any]]:
    rows = await conn.execute(sa.select(_schedules).order_by(_schedules.c.name))
    return [public(row, now) for row in rows]


async def update_schedule(
    conn: AsyncConnection, name: str, changes: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """Apply validated changes. A new expression or zone, or re-enabling, sets the next
    fire from now on: fires that fell while a schedule was off are not owed."""
    unknown = set(changes) - EDITABLE
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    current = (
        await conn.execute(sa.select(_schedules).where(_schedules.c.name == name).with_for_update())
    ).one_or_none()
    if current is None:
        raise ScheduleNotFound(f"no schedule {name!r}")
    merged = {**current._mapping, **changes}
    values = dict(changes)
    retimed = "cron" in changes or "timezone" in changes or (changes.get("enabled") and not current.enabled)
    if retimed:
        values["next_fire_at"] = _next(merged, now)
    await conn.execute(sa.update(_schedules).where(_schedules.c.name == name).values(**values, updated_at=now))
    return await get_schedule(conn, name, now)


async def delete_schedule(conn: AsyncConnection, name: str) -> None:
    """Remove a schedule; the jobs it already created stay."""
    result = await conn.execute(sa.delete(_schedules).where(_schedules.c.name == name).returning(_schedules.c.name))
    if result.first() is None:
        raise ScheduleNotFound(f"no schedule {name!r}")


def _next(values: Mapping[str, Any], now: datetime) -> datetime:
    return cron.next_fire(values["cron"], values["timezone"], now)


def public(row: Any, now: datetime) -> dict[str, Any]:
    """The schedule document the API returns, with its next fire times (none while disabled)."""
    upcoming: list[datetime] = []
    if row.enabled:
        first = row.next_fire_at if row.next_fire_at is not None and row.next_fire_at > now else None
        start = first or cron.next_fire(row.cron, row.timezone, now)
        upcoming = [start, *cron.upcoming(row.cron, row.timezone, start, cron.UPCOMING_SHOWN - 1)]
    return {
        "name": row.name,
        "cron": row.cron,
        "timezone": row.timezone,
        "job_template": row.job_template,
        "enabled": row.enabled,
        "misfire": row.misfire,
        "next_fire_at": iso_z(row.next_fire_at) if row.next_fire_at is not None else None,
        "last_fired_at": iso_z(row.last_fired_at) if row.last_fired_at is not None else None,
        "next_fire_times": [iso_z(at) for at in upcoming],
        "created_at": iso_z(row.created_at),
        "updated_at": iso_z(row.updated_at),
    }


async def fire_due(
    conn: AsyncConnection, now: datetime, policy: PolicyConfig, capacities: Sequence[Resources]
) -> Fired:
    """Create the jobs of every fire due at `now` and move each schedule on.

    A fire that cannot become a job (a template no live node can run, say) is
    reported and its schedule still moves on, so one bad schedule never stalls
    the others or fires in a loop.
    """
    rows = (
        await conn.execute(
            sa.text(
                "SELECT name, cron, timezone, job_template, misfire, next_fire_at FROM schedules "
                "WHERE enabled AND next_fire_at <= :now ORDER BY next_fire_at, name LIMIT :batch "
                "FOR UPDATE SKIP LOCKED"
            ),
            {"now": now, "batch": FIRE_BATCH},
        )
    ).all()
    fired = Fired()
    for row in rows:
        due = cron.due_fires(row.cron, row.timezone, row.next_fire_at, now, row.misfire)
        if due.fire_times:
            try:
                # A savepoint: a failed fire undoes its own jobs, not the other schedules'.
                async with conn.begin_nested():
                    specs = [cron.template_spec(row.job_template, row.name, at) for at in due.fire_times]
                    hashes = [cron.template_hash(row.job_template, spec.job_id) for spec in specs]
                    results = await jobs.submit(conn, specs, hashes, now, policy, capacities)
                fired.created.extend(r.job["job_id"] for r in results if r.created)
            except QueueError as error:
                fired.failed.append((row.name, error.detail))
        await conn.execute(
            sa.text(
                "UPDATE schedules SET next_fire_at = :next,"
                " last_fired_at = coalesce(CAST(:last AS timestamptz), last_fired_at) WHERE name = :name"
            ),
            {"next": due.next_fire_at, "last": max(due.fire_times, default=None), "name": row.name},
        )
    return fired
