"""The invariants a run must hold (SPEC §9), each checked from what happened, not
from what the policy intended: PASS or FAIL with the evidence."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from queue_service.core.backoff import jitter_fraction
from queue_service.core.model import ZERO, JobStatus, Resources
from queue_service.core.policy import Candidate, RunningJob, Start
from simulator.records import JobRecord, SimulationResult

TIME_TOLERANCE = 1e-9  # float sums of simulated seconds


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    evidence: str

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


@dataclass
class DispatchMonitor:
    """Watches every plan() decision as it is carried out: a start that jumps an
    earlier ready job must be a backfill, and a backfill must leave room for the
    reserved head at its reservation time."""

    capacity: Resources
    starts: int = 0
    backfills: int = 0
    order_violations: list[str] = field(default_factory=list)
    delay_violations: list[str] = field(default_factory=list)
    first_backfill: str | None = None

    def observe(
        self, now: float, window: Sequence[Candidate], starts: Sequence[Start], running_after: Sequence[RunningJob]
    ) -> None:
        if not starts:
            return
        started = {start.job_id for start in starts}
        position = {cand.job_id: i for i, cand in enumerate(window)}
        by_id = {cand.job_id: cand for cand in window}
        for start in starts:
            self.starts += 1
            jumped = [cand.job_id for cand in window[: position[start.job_id]] if cand.job_id not in started]
            if jumped and not start.backfilled:
                self.order_violations.append(f"t={now:g}: {start.job_id} started ahead of {jumped[0]}")
            if start.passed is None:
                continue
            self.backfills += 1
            reservation = start.passed
            if self.first_backfill is None:
                self.first_backfill = (
                    f"t={now:g}: {start.job_id} passed {reservation.job_id} (reserved for t={reservation.start_at:g})"
                )
            still_running = ZERO
            for job in running_after:
                if job.latest_end > reservation.start_at + TIME_TOLERANCE:
                    still_running = still_running + job.resources
            head = by_id[reservation.job_id].resources
            if not (still_running + head).fits_in(self.capacity):
                self.delay_violations.append(
                    f"t={now:g}: backfilling {start.job_id} leaves no room for {reservation.job_id} "
                    f"at t={reservation.start_at:g}"
                )


def _first(items: Sequence[str], more: int = 3) -> str:
    shown = "; ".join(items[:more])
    return shown + (f" (+{len(items) - more} more)" if len(items) > more else "")


def check_capacity(result: SimulationResult) -> Check:
    """Sweep over attempt intervals: ends at an instant free resources before starts at it."""
    events: list[tuple[float, int, Resources]] = []
    for job in result.accepted:
        for attempt in job.attempts:
            end = attempt.ended_at if attempt.ended_at is not None else float("inf")
            events.append((attempt.started_at, 1, job.spec.resources))
            events.append((end, 0, job.spec.resources))
    events.sort(key=lambda e: (e[0], e[1]))
    used, peak_cpu, peak_memory, over = ZERO, 0, 0, []
    for at, is_start, need in events:
        used = used + need if is_start else used - need
        peak_cpu, peak_memory = max(peak_cpu, used.cpu_units), max(peak_memory, used.memory_mb)
        if not used.fits_in(result.capacity):
            over.append(f"t={at:g}: {used.cpu_units} CPU / {used.memory_mb} MB in use")
    over.extend(result.container_violations)
    cap = result.capacity
    return Check(
        "capacity never exceeded",
        not over,
        _first(over)
        or f"peak {peak_cpu}/{cap.cpu_units} CPU, {peak_memory}/{cap.memory_mb} MB over {len(events) // 2} attempts",
    )


def check_dependencies(result: SimulationResult) -> Check:
    bad, checked = [], 0
    for job in result.accepted:
        for attempt in job.attempts:
            for dep_id in job.spec.depends_on:
                checked += 1
                dep = result.jobs[dep_id]
                done_at = dep.finished_at if dep.status is JobStatus.COMPLETED else None
                if done_at is None or done_at > attempt.started_at + TIME_TOLERANCE:
                    bad.append(f"{job.job_id} attempt {attempt.attempt} started before {dep_id} completed")
    return Check("dependencies respected", not bad, _first(bad) or f"{checked} dependency edges checked at start")


def check_priority_order(monitor: DispatchMonitor) -> Check:
    return Check(
        "priority order respected except by backfill",
        not monitor.order_violations,
        _first(monitor.order_violations) or f"{monitor.starts} starts, {monitor.backfills} by backfill",
    )


def check_backfill(monitor: DispatchMonitor) -> Check:
    evidence = f"{monitor.backfills} backfills" + (
        f", first {monitor.first_backfill}" if monitor.first_backfill else ""
    )
    return Check(
        "backfill never delays the reserved head",
        not monitor.delay_violations,
        _first(monitor.delay_violations) or evidence,
    )


def expected_backoff(job: JobRecord, attempt: int) -> float:
    """The SPEC §6 formula, written out here on purpose rather than calling core's."""
    retry = job.spec.retry
    base = min(retry.max_delay_seconds, retry.initial_delay_seconds * retry.backoff_multiplier ** (attempt - 1))
    return base * (1 - retry.jitter * jitter_fraction(job.job_id, attempt))


def check_backoff(result: SimulationResult) -> Check:
    bad, gaps = [], []
    for job in result.accepted:
        for retry in job.retries:
            gap = retry.ready_at - retry.failed_at
            want = expected_backoff(job, retry.attempt)
            gaps.append(f"{job.job_id}#{retry.attempt} {gap:g}s")
            if abs(gap - want) > TIME_TOLERANCE * max(1.0, want):
                bad.append(f"{job.job_id} after attempt {retry.attempt}: waited {gap:g}s, formula {want:g}s")
    evidence = f"{len(gaps)} retry gaps equal the formula" + (f": {_first(gaps, 6)}" if gaps else "")
    return Check("backoff delays equal the formula", not bad, _first(bad) or evidence)


def _descendants(result: SimulationResult) -> dict[str, set[str]]:
    children: dict[str, list[str]] = defaultdict(list)
    for job in result.accepted:
        for dep in job.spec.depends_on:
            children[dep].append(job.job_id)
    memo: dict[str, set[str]] = {}

    def walk(job_id: str) -> set[str]:
        if job_id not in memo:
            found: set[str] = set()
            stack = list(children.get(job_id, ()))
            while stack:
                child = stack.pop()
                if child not in found:
                    found.add(child)
                    stack.extend(children.get(child, ()))
            memo[job_id] = found
        return memo[job_id]

    return {job.job_id: walk(job.job_id) for job in result.accepted}


def check_failed_dependants(result: SimulationResult) -> Check:
    descendants = _descendants(result)
    bad, roots, checked = [], 0, 0
    for job in result.accepted:
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            roots += 1
            for child_id in sorted(descendants[job.job_id]):
                checked += 1
                child = result.jobs[child_id]
                if child.attempts:
                    bad.append(f"{child_id} ran though its ancestor {job.job_id} ended {job.status}")
                if child.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
                    bad.append(f"{child_id} ended {child.status} though {job.job_id} ended {job.status}")
    return Check(
        "dependants of failed or cancelled jobs never run",
        not bad,
        _first(bad) or f"{roots} failed/cancelled jobs, {checked} descendants, none started",
    )


def check_terminal(result: SimulationResult) -> Check:
    open_jobs = [
        f"{job.job_id} is {job.status}" for job in result.accepted if not (job.status and job.status.is_terminal)
    ]
    counts: dict[str, int] = defaultdict(int)
    for job in result.accepted:
        counts[str(job.status)] += 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return Check("every accepted job ends terminal", not open_jobs, _first(open_jobs) or summary or "no jobs")


def check_attempts(result: SimulationResult) -> Check:
    bad = []
    for job in result.accepted:
        numbers = [a.attempt for a in job.attempts]
        if numbers != list(range(1, len(numbers) + 1)):
            bad.append(f"{job.job_id} attempts numbered {numbers}")
        for before, after in pairwise(job.attempts):
            if before.ended_at is None or before.ended_at > after.started_at + TIME_TOLERANCE:
                bad.append(f"{job.job_id} attempts {before.attempt} and {after.attempt} overlap")
        if job.counted_attempts > job.spec.retry.max_attempts:
            bad.append(f"{job.job_id} ran {job.counted_attempts} attempts, max {job.spec.retry.max_attempts}")
    total = sum(len(job.attempts) for job in result.accepted)
    return Check(
        "one attempt at a time, within max_attempts", not bad, _first(bad) or f"{total} attempts, none overlapping"
    )


def check_all(result: SimulationResult, monitor: DispatchMonitor) -> list[Check]:
    return [
        check_capacity(result),
        check_dependencies(result),
        check_priority_order(monitor),
        check_backfill(monitor),
        check_backoff(result),
        check_failed_dependants(result),
        check_terminal(result),
        check_attempts(result),
    ]
