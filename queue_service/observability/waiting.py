"""Why a job is where it is: one sentence an operator can act on (admin job page).

A pure function of the job document, the dependencies' statuses, the live nodes
and the pause flag, so it is tested without a database. It mirrors the policy's
rules (SPEC §5) without re-deciding them: the dispatcher is the authority, this
only says which rule currently holds the job back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from queue_service.db.insight import NodeUsage


@dataclass(frozen=True)
class Waiting:
    """`kind` is a stable key for styling and tests; `text` is for people."""

    kind: str
    text: str


def explain(
    job: Mapping[str, Any], dependency_statuses: Mapping[str, str], nodes: Sequence[NodeUsage], paused: bool
) -> Waiting:
    """Why `job` (a public job document) has not finished yet, or how it ended."""
    status = job["status"]
    if status == "blocked":
        waiting = [f"{d} ({dependency_statuses.get(d, 'unknown')})" for d in job["blocked_by"]]
        return Waiting("blocked", "blocked by " + ", ".join(waiting) if waiting else "blocked by its dependencies")
    if status == "retrying":
        return Waiting("backoff", f"backoff until {job['next_attempt_at']} after attempt {job['attempts']} failed")
    if status == "running":
        return Waiting("running", f"running attempt {job['attempts']} on {job['worker_id']} since {job['started_at']}")
    if status == "ready":
        return _ready(job, nodes, paused)
    reason = job.get("failure_reason") or job.get("cancel_reason")
    return Waiting("finished", f"{status}" + (f" ({reason})" if reason else ""))


def _ready(job: Mapping[str, Any], nodes: Sequence[NodeUsage], paused: bool) -> Waiting:
    if paused:
        return Waiting("paused", "dispatch is paused: nothing new starts until it is resumed")
    active = [n for n in nodes if n.status == "active"]
    if not active:
        return Waiting("no_nodes", "no worker node is running")
    needs = job["resource_requirements"]
    cpu, memory = needs["cpu_units"], needs["memory_mb"]
    fits_now = any(n.cpu_capacity - n.cpu_used >= cpu and n.memory_capacity - n.memory_used >= memory for n in active)
    position = job.get("position_in_queue")
    need = f"{cpu} CPU / {memory} MB"
    if not fits_now and position == 0:
        return Waiting(
            "reserved",
            f"head of the queue, waiting for {need} to free up; it holds the backfill reservation, "
            "so smaller jobs start only if they end before it can",
        )
    if not fits_now:
        best = max(active, key=lambda n: (n.cpu_capacity - n.cpu_used, n.memory_capacity - n.memory_used))
        free = f"{best.cpu_capacity - best.cpu_used} CPU / {best.memory_capacity - best.memory_used} MB"
        return Waiting("resources", f"waiting for resources: needs {need}, the most free on a node is {free}")
    if position:
        return Waiting("queued", f"queued behind {position} job{'s' if position != 1 else ''} in priority order")
    return Waiting("next", "next in line: the next dispatch starts it")
