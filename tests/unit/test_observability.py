"""The pure parts of observability: stream filters, the per-client buffer, and why a job waits."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from queue_service.db.insight import NodeUsage
from queue_service.observability.fanout import InvalidFilter, StreamClient, StreamFilter
from queue_service.observability.waiting import explain

EVENT = {"event": "job.updated", "job_id": "j1", "type": "email", "status": "ready"}


def test_filters_match_on_every_given_field() -> None:
    assert StreamFilter.parse([], [], []).matches(EVENT)
    assert StreamFilter.parse(["j2", "j1"], ["email"], ["ready", "running"]).matches(EVENT)
    assert not StreamFilter.parse(["j2"], [], []).matches(EVENT)
    assert not StreamFilter.parse([], ["sms"], []).matches(EVENT)
    assert not StreamFilter.parse([], [], ["completed"]).matches(EVENT)


@pytest.mark.parametrize(
    ("job_ids", "types", "statuses"),
    [(["bad id"], [], []), ([], ["a", "b"], []), ([], [""], []), ([], [], ["done"])],
)
def test_bad_filters_are_refused(job_ids: list[str], types: list[str], statuses: list[str]) -> None:
    with pytest.raises(InvalidFilter):
        StreamFilter.parse(job_ids, types, statuses)


async def test_a_full_buffer_marks_the_client_overrun_and_keeps_what_it_had() -> None:
    client = StreamClient(StreamFilter(), capacity=2)
    assert client.offer("a")
    assert client.offer("b")
    assert not client.offer("c")
    assert client.overrun
    assert [client.queue.get_nowait(), client.queue.get_nowait()] == ["a", "b"]


NODE = NodeUsage("n1", "active", 8, 6, 4096, 1024, datetime(2026, 1, 1, tzinfo=UTC))


def ready_job(position: int, cpu: int = 1) -> dict[str, Any]:
    return {
        "status": "ready",
        "position_in_queue": position,
        "resource_requirements": {"cpu_units": cpu, "memory_mb": 128},
    }


@pytest.mark.parametrize(
    ("job", "paused", "nodes", "kind"),
    [
        (ready_job(0), True, [NODE], "paused"),
        (ready_job(0), False, [], "no_nodes"),
        (ready_job(0, cpu=4), False, [NODE], "reserved"),
        (ready_job(3, cpu=4), False, [NODE], "resources"),
        (ready_job(3), False, [NODE], "queued"),
        (ready_job(0), False, [NODE], "next"),
    ],
)
def test_why_a_ready_job_waits(job: dict[str, Any], paused: bool, nodes: list[NodeUsage], kind: str) -> None:
    assert explain(job, {}, nodes, paused).kind == kind


def test_blocked_and_backoff_name_the_cause() -> None:
    blocked = explain({"status": "blocked", "blocked_by": ["p1"]}, {"p1": "running"}, [NODE], False)
    assert blocked.text == "blocked by p1 (running)"
    retrying = {"status": "retrying", "next_attempt_at": "2026-01-01T00:00:05.000000Z", "attempts": 2}
    assert explain(retrying, {}, [NODE], False).text.startswith("backoff until 2026-01-01T00:00:05")
