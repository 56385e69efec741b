"""Schedule metrics (SPEC §9): makespan, utilization per resource, wait by priority,
and a lower bound on the makespan that no schedule of the same work can beat."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from graphlib import TopologicalSorter
from itertools import pairwise

from queue_service.core.model import Priority
from simulator.records import JobRecord, SimulationResult

EXACT_PACKING_LIMIT = {1: 10_000, 2: 14, 3: 10}  # items for which the k-slot bound is solved exactly


@dataclass(frozen=True)
class WaitStats:
    priority: Priority
    jobs: int
    mean: float
    p50: float
    maximum: float


@dataclass(frozen=True)
class Metrics:
    makespan: float
    lower_bound: float
    lower_bound_reason: str
    cpu_utilization: float
    memory_utilization: float
    waits: tuple[WaitStats, ...]
    attempts: int
    plan_calls: int

    @property
    def makespan_ratio(self) -> float:
        return self.makespan / self.lower_bound if self.lower_bound > 0 else 1.0


def _run_times(job: JobRecord) -> list[float]:
    return [a.ended_at - a.started_at for a in job.attempts if a.ended_at is not None]


def utilization(result: SimulationResult) -> tuple[float, float]:
    """Time-weighted share of capacity in use between the first submit and the last finish."""
    start, span = result.first_submit, result.makespan
    if span <= 0:
        return 0.0, 0.0
    cpu_area = memory_area = 0.0
    samples = result.usage
    for current, following in pairwise(samples):
        width = max(0.0, min(following.at, start + span) - max(current.at, start))
        cpu_area += current.used.cpu_units * width
        memory_area += current.used.memory_mb * width
    cap = result.capacity
    return cpu_area / (cap.cpu_units * span), memory_area / (cap.memory_mb * span)


def _best_packing(durations: Sequence[float], slots: int) -> float:
    """Smallest makespan of `durations` on `slots` identical lanes (branch and bound)."""
    items = sorted(durations, reverse=True)
    best = [sum(items)]

    def place(index: int, loads: list[float]) -> None:
        if index == len(items):
            best[0] = min(best[0], max(loads))
            return
        tried: set[float] = set()
        for lane in range(slots):
            if loads[lane] in tried or loads[lane] + items[index] >= best[0]:
                continue
            tried.add(loads[lane])
            loads[lane] += items[index]
            place(index + 1, loads)
            loads[lane] -= items[index]

    place(0, [0.0] * slots)
    return best[0]


def _exclusion_bound(result: SimulationResult) -> tuple[float, str]:
    """Jobs needing more than 1/(k+1) of a resource can run at most k at a time,
    so their attempts alone need at least their best k-lane packing."""
    best, reason = 0.0, ""
    cap = result.capacity
    for name, capacity, dimension in (("CPU", cap.cpu_units, "cpu_units"), ("memory", cap.memory_mb, "memory_mb")):
        for slots in (1, 2, 3):
            pieces = [
                t
                for job in result.accepted
                if getattr(job.spec.resources, dimension) * (slots + 1) > capacity
                for t in _run_times(job)
            ]
            if not pieces:
                continue
            if len(pieces) <= EXACT_PACKING_LIMIT[slots]:
                bound = _best_packing(pieces, slots) if slots > 1 else sum(pieces)
            else:
                bound = max(sum(pieces) / slots, max(pieces))
            if bound > best:
                best, reason = bound, f"{len(pieces)} attempts needing >1/{slots + 1} of {name} run ≤{slots} at once"
    return best, reason


def _chain_bound(result: SimulationResult) -> tuple[float, str]:
    """No job finishes before its submit time, its dependencies' finishes, its own
    attempts and the backoff waits between them."""
    accepted = {job.job_id: job for job in result.accepted}
    order = TopologicalSorter({job_id: job.spec.depends_on for job_id, job in accepted.items()}).static_order()
    finish: dict[str, float] = {}
    for job in (accepted[job_id] for job_id in order if job_id in accepted):
        earliest = max([job.submit_at, *(finish.get(dep, 0.0) for dep in job.spec.depends_on)])
        waits = sum(r.ready_at - r.failed_at for r in job.retries)
        finish[job.job_id] = earliest + sum(_run_times(job)) + waits
    if not finish:
        return 0.0, ""
    last = max(finish, key=lambda job_id: (finish[job_id], job_id))
    return finish[last] - result.first_submit, f"submit + dependency chain + attempts ending at {last}"


def lower_bound(result: SimulationResult) -> tuple[float, str]:
    cap = result.capacity
    candidates = [_chain_bound(result), _exclusion_bound(result)]
    cpu_area = sum(job.spec.resources.cpu_units * sum(_run_times(job)) for job in result.accepted)
    memory_area = sum(job.spec.resources.memory_mb * sum(_run_times(job)) for job in result.accepted)
    candidates.append((cpu_area / cap.cpu_units, "CPU-seconds / CPU capacity"))
    candidates.append((memory_area / cap.memory_mb, "MB-seconds / memory capacity"))
    return max(candidates, key=lambda pair: pair[0])


def waits_by_priority(result: SimulationResult) -> tuple[WaitStats, ...]:
    """Wait from first becoming ready to first start, for jobs that started."""
    by_priority: dict[Priority, list[float]] = defaultdict(list)
    for job in result.accepted:
        started = job.first_started_at
        if started is not None and job.first_ready_at is not None:
            by_priority[job.spec.priority].append(started - job.first_ready_at)
    return tuple(
        WaitStats(p, len(w), statistics.fmean(w), statistics.median(w), max(w))
        for p in Priority
        if (w := by_priority.get(p))
    )


def compute(result: SimulationResult) -> Metrics:
    bound, reason = lower_bound(result)
    cpu, memory = utilization(result)
    return Metrics(
        makespan=result.makespan,
        lower_bound=bound,
        lower_bound_reason=reason,
        cpu_utilization=cpu,
        memory_utilization=memory,
        waits=waits_by_priority(result),
        attempts=sum(len(job.attempts) for job in result.accepted),
        plan_calls=result.plan_calls,
    )
