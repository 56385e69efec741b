"""Cron fire times (SPEC §10), as pure functions of the time passed in (arq's `next_cron`).

croniter computes the times; this module adds what a queue needs around it:
validation with every problem named, fire times in the schedule's time zone,
which fires are due at `now` under the misfire policy, and the deterministic id
of the job a fire creates. Nothing here reads a clock, so the whole behaviour is
tested with a table of (cron, zone, now) rows and no database.

It lives beside `core` rather than in it because core keeps even the `datetime`
type out (its times are epoch floats); the functions are just as pure.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from queue_service.core.errors import FieldProblem, InvalidJob
from queue_service.core.model import JobSpec
from queue_service.core.validation import parse_job_spec

Misfire = Literal["skip", "run_once"]
MISFIRE_POLICIES: Final = ("skip", "run_once")
SCHEDULE_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # keeps cron:<name>:<time> a valid job id
CRON_JOB_PREFIX: Final = "cron:"
FIRE_TIME_FORMAT: Final = "%Y%m%dT%H%M%SZ"
# A fire at most this late is on time: covers leader ticks, fail-over and a short
# restart. Older fires were missed, and the schedule's misfire policy decides.
MISFIRE_GRACE_SECONDS: Final = 60.0
MAX_FIRES_PER_CALL: Final = 1000  # on-time fires enumerated at once: a per-second cron has 60 in the grace window
UPCOMING_SHOWN: Final = 5  # next fire times an API answer lists
_ONE_MICROSECOND: Final = timedelta(microseconds=1)

_NAME_RE = re.compile(SCHEDULE_NAME_PATTERN)


class InvalidSchedule(InvalidJob):
    """A schedule's name, cron expression, time zone or job template is not acceptable."""

    code = "invalid_schedule"


def schedule_problems(name: str | None, cron: str | None, timezone: str | None) -> list[FieldProblem]:
    """Every problem with the given fields (None: not being set)."""
    problems: list[FieldProblem] = []
    if name is not None and not _NAME_RE.fullmatch(name):
        problems.append(FieldProblem(("name",), "must match " + SCHEDULE_NAME_PATTERN))
    if cron is not None and not _valid_cron(cron):
        problems.append(
            FieldProblem(("cron",), f"{cron!r} is not a cron expression (5 fields, or 6 with seconds last)")
        )
    if timezone is not None and _zone(timezone) is None:
        problems.append(
            FieldProblem(("timezone",), f"{timezone!r} is not an IANA time zone such as UTC or Europe/Paris")
        )
    return problems


def _valid_cron(cron: str) -> bool:
    return len(cron.split()) in (5, 6) and bool(croniter.is_valid(cron))


def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def next_fire(cron: str, timezone: str, after: datetime) -> datetime:
    """The first fire time strictly after `after`, in UTC; the expression is read in `timezone`."""
    zone = ZoneInfo(timezone)
    fire: datetime = croniter(cron, after.astimezone(zone)).get_next(datetime)
    return fire.astimezone(UTC)


def upcoming(cron: str, timezone: str, after: datetime, count: int = UPCOMING_SHOWN) -> list[datetime]:
    """The next `count` fire times strictly after `after`, in UTC."""
    times: list[datetime] = []
    at = after
    for _ in range(count):
        at = next_fire(cron, timezone, at)
        times.append(at)
    return times


def last_fire_at_or_before(cron: str, timezone: str, at: datetime) -> datetime:
    zone = ZoneInfo(timezone)
    fire: datetime = croniter(cron, (at + _ONE_MICROSECOND).astimezone(zone)).get_prev(datetime)
    return fire.astimezone(UTC)


@dataclass(frozen=True)
class Due:
    """What a schedule does at `now`: the fire times to create jobs for, oldest
    first, the next fire time to wait for, and how many missed fires were dropped."""

    fire_times: tuple[datetime, ...]
    next_fire_at: datetime
    missed: bool


def due_fires(
    cron: str,
    timezone: str,
    next_fire_at: datetime,
    now: datetime,
    misfire: Misfire,
    grace_seconds: float = MISFIRE_GRACE_SECONDS,
) -> Due:
    """The fires due at `now` for a schedule waiting for `next_fire_at`.

    Fires no older than the grace period are on time and each gets its job.
    Older ones were missed (the service was down): `skip` drops them, `run_once`
    collapses them into one job, for the latest missed fire time.
    """
    if next_fire_at > now:
        return Due((), next_fire_at, missed=False)
    window_start = max(next_fire_at, now - timedelta(seconds=grace_seconds))
    on_time: list[datetime] = []
    at = next_fire_at if next_fire_at >= window_start else next_fire(cron, timezone, window_start - _ONE_MICROSECOND)
    while at <= now and len(on_time) < MAX_FIRES_PER_CALL:
        on_time.append(at)
        at = next_fire(cron, timezone, at)
    missed = next_fire_at < window_start
    fires = on_time
    if missed and misfire == "run_once":
        latest_missed = last_fire_at_or_before(cron, timezone, window_start - _ONE_MICROSECOND)
        fires = [max(latest_missed, next_fire_at), *on_time]
    following = at if at > now else next_fire(cron, timezone, now)
    return Due(tuple(fires), following, missed)


def cron_job_id(schedule: str, fire_time: datetime) -> str:
    """`cron:<schedule>:<UTC fire time>`: the same on every replica, so the jobs
    table's primary key lets one job exist per fire time, whoever creates it."""
    return f"{CRON_JOB_PREFIX}{schedule}:{fire_time.astimezone(UTC).strftime(FIRE_TIME_FORMAT)}"


_TEMPLATE_FORBIDDEN: Final = {
    "job_id": "set by the schedule: cron:<name>:<fire time>",
    "idempotency_key": "the job id already makes each fire unique",
    "depends_on": "a recurring job cannot wait on fixed jobs",
}


def template_spec(template: object, schedule: str, fire_time: datetime) -> JobSpec:
    """The job a fire creates: the template, validated by the same rules as a
    submission (`parse_job_spec`), with the fire's deterministic id. Raises
    InvalidSchedule with the template's problems located under `job_template`."""
    if not isinstance(template, dict):
        raise InvalidSchedule([FieldProblem(("job_template",), "must be a JSON object (a job without job_id)")])
    problems = [
        FieldProblem(("job_template", key), f"not allowed in a template: {why}")
        for key, why in _TEMPLATE_FORBIDDEN.items()
        if key in template
    ]
    job_id = cron_job_id(schedule, fire_time)
    try:
        spec = parse_job_spec({**template, "job_id": job_id}, default_job_id=job_id)
    except InvalidJob as invalid:
        problems += [FieldProblem(("job_template", *p.loc), p.message) for p in invalid.problems]
    if problems:
        raise InvalidSchedule(problems)
    return spec


def template_hash(template: Mapping[str, Any], job_id: str) -> str:
    """The request hash of a fire's job: the same on every replica for the same template."""
    text = json.dumps({"job_id": job_id, "template": template}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
