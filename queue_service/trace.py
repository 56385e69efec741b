"""Trace export (issue #8): the real job and attempt history of a time window as a
scenario, so yesterday's traffic can be replayed in the simulator.

Each job keeps its type, priority, resources, retry settings, timeout and the
edges to other jobs of the window; it arrives at its `created_at` (jobs created
in one transaction arrive together, as one batch); its `simulate` block is what
was measured: the mean run time of its ended attempts, and its outcomes —
timeouts first, then failures, then a permanent failure, as `payload.simulate`
can say them. A job a user cancelled is cancelled at the time it was.

Limits, stated: an edge to a job outside the window is dropped (the parent's
effect is lost); an attempt cancelled while running ran for an unknown time,
taken as halfway between its run so far and its timeout; a worker_lost or
interrupted attempt counts as a failed one; the nodes that ran attempts are
simulated when they were alike, else one node of the capacity that ran the most.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from queue_service.core.model import Resources
from queue_service.db.engine import create_engine
from queue_service.db.trace import TraceJob, TraceNode, read_trace
from queue_service.settings import Settings
from simulator import cli as simulator_cli
from simulator.agreement import ObservedJob

MILLISECOND: Final = 3  # decimals kept of measured seconds
FAILING: Final = frozenset({"failed", "timed_out", "worker_lost", "interrupted"})
EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Trace:
    """A window of history as scenario data, and what really happened, in seconds from its time 0."""

    scenario: dict[str, Any]
    recorded: dict[str, ObservedJob]
    origin: datetime | None


def _seconds(at: datetime | None, origin: datetime) -> float | None:
    return None if at is None else round((at - origin).total_seconds(), MILLISECOND)


def _simulate_block(job: TraceJob) -> dict[str, Any]:
    ended = [a for a in job.attempts if a.ended_at is not None and a.outcome not in (None, "cancelled")]
    runs = [(a.ended_at - a.started_at).total_seconds() for a in ended if a.ended_at and a.outcome != "timed_out"]
    given = job.payload.get("simulate") if isinstance(job.payload.get("simulate"), dict) else None
    block: dict[str, Any] = {}
    if runs:
        block["duration_seconds"] = round(statistics.fmean(runs), MILLISECOND)
    elif (cut := next((a for a in job.attempts if a.outcome == "cancelled" and a.ended_at), None)) is not None:
        assert cut.ended_at is not None
        so_far = (cut.ended_at - cut.started_at).total_seconds()
        block["duration_seconds"] = round(so_far + max(0.0, job.timeout_seconds - so_far) / 2, MILLISECOND)
    elif given is not None and given.get("duration_seconds") is not None:
        block["duration_seconds"] = given["duration_seconds"]
    outcomes = [a.outcome for a in job.attempts if a.outcome is not None]
    timeouts = outcomes.count("timed_out")
    failures = sum(outcome in FAILING for outcome in outcomes)
    if timeouts:
        block["timeout_attempts"] = timeouts
    if failures > timeouts:
        block["fail_attempts"] = failures
    if outcomes and outcomes[-1] == "permanent_failure":
        block["permanent_failure"] = True
    return block


def _job_entry(job: TraceJob, origin: datetime, in_window: set[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "job_id": job.job_id,
        "type": job.type,
        "priority": job.priority,
        "resource_requirements": {"cpu_units": job.cpu_units, "memory_mb": job.memory_mb},
        "retry_config": {
            "max_attempts": job.max_attempts,
            "backoff_multiplier": job.backoff_multiplier,
            "initial_delay_seconds": job.initial_delay_seconds,
            "max_delay_seconds": job.max_delay_seconds,
            "jitter": job.jitter,
        },
        "timeout_seconds": job.timeout_seconds,
        "submit_at": _seconds(job.created_at, origin),
        "simulate": _simulate_block(job),
    }
    depends_on = [parent for parent in job.depends_on if parent in in_window]
    if depends_on:
        entry["depends_on"] = depends_on
    if job.status == "cancelled" and job.cancel_reason == "user":
        entry["cancel_at"] = _seconds(job.finished_at, origin)
    return entry


def _recorded(job: TraceJob, origin: datetime) -> ObservedJob:
    return ObservedJob(
        job_id=job.job_id,
        status=job.status,
        attempts=len(job.attempts),
        first_ready=_seconds(job.first_ready_at, origin),
        first_start=_seconds(job.attempts[0].started_at, origin) if job.attempts else None,
        finished=_seconds(job.finished_at, origin),
        reason=job.failure_reason or job.cancel_reason,
    )


def _capacity(jobs: list[TraceJob], nodes: list[TraceNode]) -> tuple[Resources, int, str]:
    """The node capacity to simulate and how many such nodes: all the nodes that ran
    attempts when they were alike, else the one that ran the most."""
    if not nodes:
        return Resources(8, 4096), 1, "no attempt ran: the default node"
    runs = Counter(a.node_id for job in jobs for a in job.attempts)
    busiest = max(nodes, key=lambda n: (runs[n.node_id], n.node_id))
    names = ", ".join(f"{n.node_id} ({n.cpu_capacity} CPU / {n.memory_capacity} MB)" for n in nodes)
    alike = all((n.cpu_capacity, n.memory_capacity) == (busiest.cpu_capacity, busiest.memory_capacity) for n in nodes)
    return Resources(busiest.cpu_capacity, busiest.memory_capacity), len(nodes) if alike else 1, f"ran on {names}"


def build_trace(jobs: list[TraceJob], nodes: list[TraceNode], *, name: str, capacity: Resources | None = None) -> Trace:
    """Scenario data (loads with `parse_scenario`) and the recorded outcome of each job."""
    if not jobs:
        return Trace({"name": name, "jobs": []}, {}, None)
    origin = min(job.created_at for job in jobs)
    found, count, where = _capacity(jobs, nodes)
    capacity, count = (found, count) if capacity is None else (capacity, 1)
    in_window = {job.job_id for job in jobs}
    unfinished = sum(job.status not in ("completed", "failed", "cancelled") for job in jobs)
    description = f"Trace of {len(jobs)} jobs created from {origin.isoformat()}; {where}." + (
        f" {unfinished} had not finished when exported." if unfinished else ""
    )
    scenario = {
        "name": name,
        "description": description,
        "capacity": {"cpu_units": capacity.cpu_units, "memory_mb": capacity.memory_mb},
        "nodes": count,
        "jobs": [_job_entry(job, origin, in_window) for job in jobs],
    }
    return Trace(scenario, {job.job_id: _recorded(job, origin) for job in jobs}, origin)


async def export_trace(
    database_url: str,
    since: datetime | None,
    until: datetime | None,
    *,
    name: str = "trace",
    capacity: Resources | None = None,
) -> Trace:
    """Read the window [since, until) from the database at `database_url` and build its trace."""
    engine = create_engine(Settings(database_url=database_url, db_pool_size=1, db_max_overflow=0))
    try:
        async with engine.connect() as conn:
            jobs, nodes = await read_trace(conn, since or EARLIEST, until or LATEST)
    finally:
        await engine.dispose()
    return build_trace(jobs, nodes, name=name, capacity=capacity)


def _utc(at: datetime | None) -> datetime | None:
    """A time given without a zone (as on the command line) is UTC."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def load_trace_scenario(database_url: str, since: datetime | None, until: datetime | None) -> dict[str, Any]:
    """For `simulate --from-db`: the window's scenario data (synchronous, its own event loop)."""
    return asyncio.run(export_trace(database_url, _utc(since), _utc(until))).scenario


def main() -> None:
    """The `simulate` command, able to read a trace from the service's database."""
    simulator_cli.main(trace_loader=load_trace_scenario)
