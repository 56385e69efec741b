"""Sim-to-real agreement: what a live run of a scenario did, set beside what the
simulator predicts for the same scenario.

The live side arrives as plain data (`ObservedJob`, times in seconds from the
scenario's time 0), collected by `queue_service.replay` from the API or by a
trace export from the database, so this module never touches the live service.

Measures:
- final statuses, job by job (a batch refused at submission is `rejected`);
- start order: Kendall's tau-b between simulated and live first-start times of
  the jobs that started in both, and the pairs the live run put the other way
  round although the simulator started them further apart than the dispatch latency;
- per-job start-time error (live − simulated) and the makespan error;
- the dispatch latency itself, measured from the live run: how long jobs the
  simulator started the instant they became ready waited live (p95);
- the service's time per attempt beyond the handler's (`attempt_overhead`): claiming,
  starting and recording hold a job's resources a few milliseconds longer than its
  handler runs. The simulator is told it (`Scenario.attempt_overhead_seconds`), since
  under contention every such millisecond delays whoever waits for the resources.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from simulator.records import JobRecord, SimulationResult

REJECTED = "rejected"
# Done when (issue #8): statuses equal, tau ≥ 0.95, makespan within 5% + 0.5 s.
MIN_TAU = 0.95
MAKESPAN_RELATIVE = 0.05
MAKESPAN_ABSOLUTE = 0.5
LATENCY_QUANTILE = 0.95
INSTANT = 1e-9  # simulated seconds: a wait this short is no wait


@dataclass(frozen=True)
class ObservedJob:
    """One job of a live run, as the API or the database reports it."""

    job_id: str
    status: str  # completed / failed / cancelled, or rejected
    attempts: int = 0
    first_ready: float | None = None
    first_start: float | None = None
    finished: float | None = None
    reason: str | None = None  # failure_reason or cancel_reason
    # Each attempt as (became ready, started, ended), when the source records them.
    attempt_spans: tuple[tuple[float, float, float], ...] = ()


@dataclass(frozen=True)
class Agreement:
    scenario: str
    jobs: int
    status_mismatches: tuple[tuple[str, str, str], ...]  # (job, simulated, live)
    attempt_mismatches: tuple[tuple[str, int, int], ...]
    tau: float
    compared: int  # jobs that started in both
    dispatch_latency: float
    order_violations: tuple[tuple[str, str, float], ...]  # (first in the simulator, second, simulated gap)
    start_error_mean: float
    start_error_p95: float
    start_error_max: float
    worst_start: str | None
    makespan_sim: float
    makespan_live: float
    attempt_overhead: float = 0.0  # seconds the simulation added to every attempt

    @property
    def statuses_equal(self) -> bool:
        return not self.status_mismatches

    @property
    def makespan_error(self) -> float:
        return self.makespan_live - self.makespan_sim

    @property
    def makespan_allowed(self) -> float:
        return MAKESPAN_RELATIVE * self.makespan_sim + MAKESPAN_ABSOLUTE

    @property
    def makespan_ok(self) -> bool:
        return abs(self.makespan_error) <= self.makespan_allowed

    @property
    def passed(self) -> bool:
        return self.statuses_equal and self.tau >= MIN_TAU and self.makespan_ok


def simulated_status(job: JobRecord) -> str:
    return REJECTED if job.status is None else job.status.value


def kendall_tau_b(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either ranking allowed); 1.0 for fewer than two
    items or when either side is all ties (nothing to disagree about)."""
    n = len(xs)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return 1.0 if denominator == 0 else (concordant - discordant) / denominator


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (as numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def dispatch_latency(sim: SimulationResult, live: Mapping[str, ObservedJob]) -> float:
    """p95 of the live wait (ready → first start) of jobs the simulator started at once."""
    lags = []
    for job in sim.accepted:
        observed = live.get(job.job_id)
        started, ready = job.first_started_at, job.first_ready_at
        if observed is None or started is None or ready is None or started - ready > INSTANT:
            continue
        if observed.first_start is not None and observed.first_ready is not None:
            lags.append(max(0.0, observed.first_start - observed.first_ready))
    return quantile(lags, LATENCY_QUANTILE)


def _order_violations(
    ids: Sequence[str], sim_starts: Sequence[float], live_starts: Sequence[float], latency: float
) -> list[tuple[str, str, float]]:
    order = sorted(range(len(ids)), key=lambda i: sim_starts[i])
    found = []
    for a_pos, a in enumerate(order):
        for b in order[a_pos + 1 :]:
            gap = sim_starts[b] - sim_starts[a]
            if gap > latency and live_starts[a] > live_starts[b]:
                found.append((ids[a], ids[b], gap))
    return sorted(found, key=lambda v: -v[2])


def attempt_overhead(sim: SimulationResult, live: Mapping[str, ObservedJob]) -> float:
    """What the live service adds to every attempt, measured: the median extra time an
    attempt holds its resources (live minus simulated run time, over jobs both ran once
    and completed) plus the median gap from an attempt's end to the next start of a job
    that was already waiting for those resources. 0.0 where nothing qualifies."""
    holds = []
    for job in sim.accepted:
        observed = live.get(job.job_id)
        if observed is None or observed.status != "completed" or len(job.attempts) != 1:
            continue
        ran = job.attempts[0]
        if len(observed.attempt_spans) != 1 or ran.ended_at is None:
            continue
        _, started, ended = observed.attempt_spans[0]
        holds.append((ended - started) - (ran.ended_at - ran.started_at))
    spans = [span for observed in live.values() for span in observed.attempt_spans]
    ends = sorted(ended for _, _, ended in spans)
    gaps = []
    for ready, started, _ in spans:
        before = bisect.bisect_right(ends, started) - 1
        if before >= 0 and ready < ends[before]:  # it waited, and this end was the last it saw
            gaps.append(started - ends[before])
    return max(0.0, quantile(holds, 0.5) + quantile(gaps, 0.5))


def live_makespan(sim: SimulationResult, live: Mapping[str, ObservedJob]) -> float:
    """From the first submission the simulator accepted to the last live finish, as `SimulationResult.makespan`."""
    ends = [job.finished for job in live.values() if job.finished is not None and job.status != REJECTED]
    return max(ends, default=sim.first_submit) - sim.first_submit


def compare(sim: SimulationResult, live: Mapping[str, ObservedJob], overhead: float = 0.0) -> Agreement:
    """Set a live run beside the simulation of the same scenario (same ids, same times),
    simulated with `overhead` seconds added to every attempt."""
    mismatches, attempts = [], []
    for job_id, job in sim.jobs.items():
        observed = live.get(job_id)
        live_status = observed.status if observed is not None else "missing"
        if simulated_status(job) != live_status:
            mismatches.append((job_id, simulated_status(job), live_status))
        if observed is not None and len(job.attempts) != observed.attempts:
            attempts.append((job_id, len(job.attempts), observed.attempts))
    both = [
        (job_id, job.first_started_at, observed.first_start)
        for job_id, job in sorted(sim.jobs.items())
        if job.first_started_at is not None
        and (observed := live.get(job_id)) is not None
        and observed.first_start is not None
    ]
    ids = [job_id for job_id, _, _ in both]
    sim_starts = [float(s) for _, s, _ in both]
    live_starts = [float(s) for _, _, s in both]
    errors = [abs(l_start - s_start) for s_start, l_start in zip(sim_starts, live_starts, strict=True)]
    latency = dispatch_latency(sim, live)
    worst = max(range(len(errors)), key=lambda i: errors[i], default=None)
    return Agreement(
        scenario=sim.scenario_name,
        jobs=len(sim.jobs),
        status_mismatches=tuple(mismatches),
        attempt_mismatches=tuple(attempts),
        tau=kendall_tau_b(sim_starts, live_starts),
        compared=len(both),
        dispatch_latency=latency,
        order_violations=tuple(_order_violations(ids, sim_starts, live_starts, latency)),
        start_error_mean=sum(errors) / len(errors) if errors else 0.0,
        start_error_p95=quantile(errors, 0.95),
        start_error_max=max(errors, default=0.0),
        worst_start=None if worst is None else ids[worst],
        makespan_sim=sim.makespan,
        makespan_live=live_makespan(sim, live),
        attempt_overhead=overhead,
    )


def render(agreement: Agreement) -> str:
    """The replay report: one verdict line per measure, PASS/FAIL like `simulate`'s."""
    a = agreement
    verdict = {True: "PASS", False: "FAIL"}
    lines = [f"== Replay agreement: {a.scenario} ({a.jobs} jobs) =="]
    statuses = (
        "all equal"
        if a.statuses_equal
        else "; ".join(f"{job}: simulated {s}, live {live}" for job, s, live in a.status_mismatches[:5])
        + (f" (+{len(a.status_mismatches) - 5} more)" if len(a.status_mismatches) > 5 else "")
    )
    lines.append(f"{verdict[a.statuses_equal]}  final statuses: {statuses}")
    lines.append(
        f"{verdict[a.tau >= MIN_TAU]}  start order: Kendall tau-b {a.tau:.3f} over {a.compared} started jobs "
        f"(need ≥ {MIN_TAU})"
    )
    lines.append(
        f"{verdict[a.makespan_ok]}  makespan: simulated {a.makespan_sim:.3f}s, live {a.makespan_live:.3f}s, "
        f"error {a.makespan_error:+.3f}s (allowed ±{a.makespan_allowed:.3f}s = 5% + 0.5s)"
    )
    lines.append(
        f"info  service time per attempt beyond the handler (median, measured live; simulated with it): "
        f"{a.attempt_overhead * 1000:.1f} ms"
    )
    lines.append(
        f"info  dispatch latency (p95 live wait of jobs simulated to start at once): {a.dispatch_latency:.3f}s"
    )
    lines.append(
        f"info  start-time error |live − simulated|: mean {a.start_error_mean:.3f}s, p95 {a.start_error_p95:.3f}s, "
        f"max {a.start_error_max:.3f}s" + (f" ({a.worst_start})" if a.worst_start else "")
    )
    violations = a.order_violations
    shown = "; ".join(f"{first} before {second} (simulated {gap:.3f}s apart)" for first, second, gap in violations[:3])
    lines.append(
        f"info  pairs started the other way round live, beyond the dispatch latency: {len(violations)}"
        + (f": {shown}" if shown else "")
    )
    if a.attempt_mismatches:
        shown = "; ".join(f"{job}: simulated {s}, live {live}" for job, s, live in a.attempt_mismatches[:5])
        lines.append(f"info  attempt counts differ for {len(a.attempt_mismatches)} jobs: {shown}")
    lines += [f"Result: {verdict[a.passed]}", ""]
    return "\n".join(lines)
