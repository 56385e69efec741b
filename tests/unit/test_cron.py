"""Cron fire times as pure functions of the time passed in (arq's table-driven style)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from queue_service import cron
from queue_service.core.aging import aging
from queue_service.core.model import FailureReason, JobStatus, Priority
from queue_service.core.policy import PolicyConfig
from queue_service.core.redrive import Restore, Stored, restored_descendants


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text else datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("expression", "zone", "after", "expected"),
    [
        ("*/5 * * * *", "UTC", "2026-01-01T10:02:00", "2026-01-01T10:05:00"),
        ("*/5 * * * *", "UTC", "2026-01-01T10:05:00", "2026-01-01T10:10:00"),  # strictly after
        ("0 2 * * *", "UTC", "2026-01-01T02:00:00.000001", "2026-01-02T02:00:00"),
        ("0 9 * * 1", "UTC", "2026-01-01T00:00:00", "2026-01-05T09:00:00"),  # 2026-01-01 is a Thursday
        ("0 9 * * *", "Europe/Paris", "2026-01-01T00:00:00", "2026-01-01T08:00:00"),  # CET = UTC+1
        ("0 9 * * *", "Europe/Paris", "2026-07-01T00:00:00", "2026-07-01T07:00:00"),  # CEST = UTC+2
        ("30 2 * * *", "Europe/Paris", "2026-03-29T00:00:00", "2026-03-29T01:00:00"),  # 02:30 does not exist: 03:00
        ("* * * * * */10", "UTC", "2026-01-01T00:00:01", "2026-01-01T00:00:10"),  # six fields: seconds last
        ("0 0 1 1 *", "America/New_York", "2026-06-01T00:00:00", "2027-01-01T05:00:00"),
    ],
)
def test_next_fire(expression: str, zone: str, after: str, expected: str) -> None:
    assert cron.next_fire(expression, zone, utc(after)) == utc(expected)


def test_upcoming_lists_consecutive_fires() -> None:
    times = cron.upcoming("0 * * * *", "UTC", utc("2026-01-01T10:30:00"), 3)
    assert times == [utc("2026-01-01T11:00:00"), utc("2026-01-01T12:00:00"), utc("2026-01-01T13:00:00")]


MINUTELY = "* * * * *"


@pytest.mark.parametrize(
    ("misfire", "next_fire_at", "now", "fires", "following", "missed"),
    [
        # Not due yet: nothing, same next fire.
        ("skip", "10:05:00", "10:04:59", [], "10:05:00", False),
        # Due on time (within the 60 s grace): fired.
        ("skip", "10:05:00", "10:05:00", ["10:05:00"], "10:06:00", False),
        ("skip", "10:05:00", "10:05:59", ["10:05:00"], "10:06:00", False),
        # A late tick: both on-time fires get their job.
        ("skip", "10:05:00", "10:06:00", ["10:05:00", "10:06:00"], "10:07:00", False),
        # 90 s late is past the grace: missed.
        ("skip", "10:05:00", "10:06:30", ["10:06:00"], "10:07:00", True),
        ("run_once", "10:05:00", "10:06:30", ["10:05:00", "10:06:00"], "10:07:00", True),
        # Down for an hour: skip drops the missed fires, keeps the on-time one.
        ("skip", "10:05:00", "11:05:30", ["11:05:00"], "11:06:00", True),
        # run_once runs the missed ones once, for the latest missed fire time, then the on-time one.
        ("run_once", "10:05:00", "11:05:30", ["11:04:00", "11:05:00"], "11:06:00", True),
        ("run_once", "10:05:00", "10:05:30", ["10:05:00"], "10:06:00", False),
    ],
)
def test_due_fires(
    misfire: cron.Misfire, next_fire_at: str, now: str, fires: list[str], following: str, missed: bool
) -> None:
    def at(clock: str) -> datetime:
        return utc(f"2026-01-01T{clock}")

    due = cron.due_fires(MINUTELY, "UTC", at(next_fire_at), at(now), misfire)
    assert due == cron.Due(tuple(at(f) for f in fires), at(following), missed)


def test_due_fires_hourly_after_downtime_with_run_once() -> None:
    due = cron.due_fires("0 * * * *", "UTC", utc("2026-01-01T01:00:00"), utc("2026-01-01T05:30:00"), "run_once")
    assert due.fire_times == (utc("2026-01-01T05:00:00"),)
    assert due.next_fire_at == utc("2026-01-01T06:00:00")
    skipped = cron.due_fires("0 * * * *", "UTC", utc("2026-01-01T01:00:00"), utc("2026-01-01T05:30:00"), "skip")
    assert skipped.fire_times == ()


@pytest.mark.parametrize(
    ("name", "expression", "zone", "bad"),
    [
        ("ok", "*/5 * * * *", "UTC", []),
        ("ok", "0 0 * * * *", "Europe/Paris", []),
        ("ok", "every minute", "UTC", ["cron"]),
        ("ok", "61 * * * *", "UTC", ["cron"]),
        ("ok", "* * * *", "UTC", ["cron"]),
        ("ok", "* * * * *", "Mars/Olympus", ["timezone"]),
        ("has space", "* * * * *", "UTC", ["name"]),
        ("x" * 65, "nope", "Nowhere", ["name", "cron", "timezone"]),
    ],
)
def test_schedule_problems_name_every_bad_field(name: str, expression: str, zone: str, bad: list[str]) -> None:
    assert [p.loc[0] for p in cron.schedule_problems(name, expression, zone)] == bad


def test_cron_job_id_is_deterministic_and_a_valid_job_id() -> None:
    job_id = cron.cron_job_id("nightly-report", utc("2026-01-01T02:00:00"))
    assert job_id == "cron:nightly-report:20260101T020000Z"
    spec = cron.template_spec({"type": "generate_report"}, "nightly-report", utc("2026-01-01T02:00:00"))
    assert spec.job_id == job_id


def test_template_is_validated_like_a_submission() -> None:
    with pytest.raises(cron.InvalidSchedule) as raised:
        cron.template_spec({"type": "", "job_id": "x", "priority": "urgent"}, "s", utc("2026-01-01T00:00:00"))
    locs = {p.loc for p in raised.value.problems}
    assert {("job_template", "job_id"), ("job_template", "type"), ("job_template", "priority")} <= locs
    with pytest.raises(cron.InvalidSchedule):
        cron.template_spec(["not", "an", "object"], "s", utc("2026-01-01T00:00:00"))


def test_template_hash_is_stable() -> None:
    a = cron.template_hash({"type": "t", "payload": {"a": 1, "b": 2}}, "cron:s:1")
    b = cron.template_hash({"payload": {"b": 2, "a": 1}, "type": "t"}, "cron:s:1")
    assert a == b != cron.template_hash({"type": "t"}, "cron:s:1")


# ------------------------------------------------------------------ aging (core)
def test_aging_names_when_a_low_job_overtakes_each_higher_level() -> None:
    policy = PolicyConfig()  # head starts: critical 3 h, high 2 h, normal 1 h, low 0
    state = aging(Priority.LOW, ready_at=1000.0, now=1000.0 + 1800, policy=policy)
    assert state.sort_key == 1000.0
    assert state.waited_seconds == 1800
    assert [(o.priority, o.at, o.in_seconds) for o in state.overtakes] == [
        (Priority.CRITICAL, 1000.0 + 3 * 3600, 3 * 3600 - 1800),
        (Priority.HIGH, 1000.0 + 2 * 3600, 2 * 3600 - 1800),
        (Priority.NORMAL, 1000.0 + 3600, 1800),
    ]
    assert aging(Priority.CRITICAL, 0.0, 10.0, policy).overtakes == ()
    assert aging(Priority.NORMAL, 0.0, 4000.0, policy).overtakes[-1].in_seconds == 0.0  # already overtakes high


# ------------------------------------------------------------------ re-drive (core)
def _failed(reason: FailureReason = FailureReason.DEPENDENCY_FAILED) -> Stored:
    return Stored(JobStatus.FAILED, reason)


def test_redrive_restores_a_chain_and_counts_unfinished_dependencies() -> None:
    stored = {"a": Stored(JobStatus.READY), "b": _failed(), "c": _failed(), "done": Stored(JobStatus.COMPLETED)}
    parents = {"b": ["a", "done"], "c": ["a", "b"]}
    assert restored_descendants("a", ["b", "c"], parents, stored) == [Restore("b", 1), Restore("c", 2)]


def test_redrive_leaves_a_descendant_of_another_dead_parent_and_its_own_descendants() -> None:
    stored = {
        "a": Stored(JobStatus.READY),
        "dead": _failed(FailureReason.PERMANENT_ERROR),
        "both": _failed(),
        "below_both": _failed(),
        "only_a": _failed(),
        "cancelled_child": Stored(JobStatus.CANCELLED),
    }
    parents = {"both": ["a", "dead"], "below_both": ["both"], "only_a": ["a"], "cancelled_child": ["a"]}
    order = ["both", "cancelled_child", "only_a", "below_both"]
    assert restored_descendants("a", order, parents, stored) == [Restore("only_a", 1)]
