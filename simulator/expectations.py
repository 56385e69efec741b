"""The `expect` vocabulary of scenario files: declarative assertions over a run.

start_order: [a, b, c]            first starts happen in this order
starts_before: [[a, b], ...]      a first starts strictly earlier than b
status: {a: completed, ...}       final status per job
all_status: completed             every accepted job ends so
failure_reason: {a: permanent_error}
cancel_reason: {a: user}
never_started: [a, ...]           no attempt ever started
attempts: {a: 3}                  attempts started
retry_delays: {a: [1.0, 2.0]}     seconds from each failure to ready again
backfilled: [a, ...]              first start jumped a reserved head
blocked_then_ready: [a, ...]      waited blocked, then became ready
rejected: {code: dependency_cycle, cycle: [a, c, b, a]}
max_makespan: 12.0                makespan at most this many seconds
makespan_within_lower_bound: 0.05 makespan ≤ (1 + x) × lower bound
min_backfills: 1                  at least this many backfill starts
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from queue_service.core.model import JobStatus
from simulator.invariants import TIME_TOLERANCE, Check, DispatchMonitor
from simulator.metrics import Metrics
from simulator.records import JobRecord, SimulationResult


class ExpectationError(Exception):
    """An `expect` entry the vocabulary does not know or cannot read."""


Context = tuple[SimulationResult, Metrics, DispatchMonitor]


def _job(result: SimulationResult, job_id: object) -> JobRecord:
    if not isinstance(job_id, str) or job_id not in result.jobs:
        raise ExpectationError(f"expect names an unknown job {job_id!r}")
    return result.jobs[job_id]


def _per_job(
    ctx: Context, spec: Any, name: str, actual_of: Callable[[JobRecord], object], normalise: Callable[[Any], object]
) -> Check:
    if not isinstance(spec, Mapping):
        raise ExpectationError(f"{name}: must map job ids to values")
    wrong = []
    for job_id, wanted in spec.items():
        actual = actual_of(_job(ctx[0], job_id))
        if actual != normalise(wanted):
            wrong.append(f"{job_id}: {actual} (wanted {wanted})")
    return Check(f"expect {name}", not wrong, "; ".join(wrong) or f"{len(spec)} jobs as expected")


def _job_ids(spec: Any, name: str) -> list[str]:
    if not isinstance(spec, list) or not all(isinstance(j, str) for j in spec):
        raise ExpectationError(f"{name}: must be a list of job ids")
    return spec


def _start_order(ctx: Context, spec: Any) -> Check:
    ids = _job_ids(spec, "start_order")
    firsts = [next(iter(_job(ctx[0], j).attempts), None) for j in ids]
    missing = [j for j, a in zip(ids, firsts, strict=True) if a is None]
    if missing:
        return Check("expect start_order", False, f"never started: {', '.join(missing)}")
    actual = [j for _, j in sorted((a.sequence, j) for j, a in zip(ids, firsts, strict=True) if a is not None)]
    timeline = ", ".join(f"{j}@{_job(ctx[0], j).first_started_at:g}" for j in actual)
    return Check("expect start_order", actual == ids, f"started {timeline}")


def _starts_before(ctx: Context, spec: Any) -> Check:
    if not isinstance(spec, list) or not all(isinstance(p, list) and len(p) == 2 for p in spec):
        raise ExpectationError("starts_before: must be a list of [earlier, later] pairs")
    wrong = []
    for earlier, later in spec:
        a, b = _job(ctx[0], earlier).first_started_at, _job(ctx[0], later).first_started_at
        if a is None or (b is not None and not a < b - TIME_TOLERANCE):
            wrong.append(f"{earlier}@{a} not before {later}@{b}")
    return Check("expect starts_before", not wrong, "; ".join(wrong) or f"{len(spec)} pairs in order")


def _all_status(ctx: Context, spec: Any) -> Check:
    wanted = JobStatus(spec)
    wrong = [f"{job.job_id} {job.status}" for job in ctx[0].accepted if job.status is not wanted]
    return Check("expect all_status", not wrong, "; ".join(wrong[:5]) or f"all {len(ctx[0].accepted)} {wanted}")


def _never_started(ctx: Context, spec: Any) -> Check:
    ran = [j for j in _job_ids(spec, "never_started") if _job(ctx[0], j).attempts]
    return Check("expect never_started", not ran, f"started: {', '.join(ran)}" if ran else f"{len(spec)} never ran")


def _retry_delays(ctx: Context, spec: Any) -> Check:
    def gaps(job: JobRecord) -> list[float]:
        return [round(r.ready_at - r.failed_at, 6) for r in job.retries]

    return _per_job(ctx, spec, "retry_delays", gaps, lambda wanted: [round(float(x), 6) for x in wanted])


def _backfilled(ctx: Context, spec: Any) -> Check:
    ids = _job_ids(spec, "backfilled")
    wrong = [j for j in ids if not (_job(ctx[0], j).attempts and _job(ctx[0], j).attempts[0].backfilled)]
    return Check("expect backfilled", not wrong, f"not backfilled: {', '.join(wrong)}" if wrong else ", ".join(ids))


def _blocked_then_ready(ctx: Context, spec: Any) -> Check:
    wrong = []
    for job_id in _job_ids(spec, "blocked_then_ready"):
        statuses = [status for _, status in _job(ctx[0], job_id).history]
        if statuses[:2] != [JobStatus.BLOCKED, JobStatus.READY]:
            wrong.append(f"{job_id}: {' → '.join(statuses)}")
    return Check("expect blocked_then_ready", not wrong, "; ".join(wrong) or f"{len(spec)} jobs blocked → ready")


def _rejected(ctx: Context, spec: Any) -> Check:
    if not isinstance(spec, Mapping) or "code" not in spec:
        raise ExpectationError("rejected: must be {code, cycle?}")
    rejections = ctx[0].rejections
    for rejection in rejections:
        cycle_ok = "cycle" not in spec or list(rejection.cycle or ()) == list(spec["cycle"])
        if rejection.code == spec["code"] and cycle_ok:
            return Check("expect rejected", True, f"{rejection.code}: {rejection.detail}")
    seen = "; ".join(f"{r.code}: {r.detail}" for r in rejections) or "no batch was rejected"
    return Check("expect rejected", False, seen)


def _max_makespan(ctx: Context, spec: Any) -> Check:
    makespan = ctx[1].makespan
    return Check("expect max_makespan", makespan <= float(spec) + TIME_TOLERANCE, f"makespan {makespan:g}s ≤ {spec}s?")


def _within_lower_bound(ctx: Context, spec: Any) -> Check:
    metrics = ctx[1]
    ok = metrics.makespan <= metrics.lower_bound * (1 + float(spec)) + TIME_TOLERANCE
    evidence = f"makespan {metrics.makespan:g}s, lower bound {metrics.lower_bound:g}s ({metrics.lower_bound_reason}), "
    return Check("expect makespan_within_lower_bound", ok, evidence + f"ratio {metrics.makespan_ratio:.3f}")


def _min_backfills(ctx: Context, spec: Any) -> Check:
    count = ctx[2].backfills
    return Check("expect min_backfills", count >= int(spec), f"{count} backfill starts")


def _reason(attr: str) -> Callable[[Context, Any], Check]:
    def check(ctx: Context, spec: Any) -> Check:
        return _per_job(ctx, spec, attr, lambda job: getattr(job, attr), lambda wanted: wanted)

    return check


EXPECTATIONS: Mapping[str, Callable[[Context, Any], Check]] = {
    "start_order": _start_order,
    "starts_before": _starts_before,
    "status": lambda ctx, spec: _per_job(ctx, spec, "status", lambda job: job.status, JobStatus),
    "all_status": _all_status,
    "failure_reason": _reason("failure_reason"),
    "cancel_reason": _reason("cancel_reason"),
    "never_started": _never_started,
    "attempts": lambda ctx, spec: _per_job(ctx, spec, "attempts", lambda job: len(job.attempts), int),
    "retry_delays": _retry_delays,
    "backfilled": _backfilled,
    "blocked_then_ready": _blocked_then_ready,
    "rejected": _rejected,
    "max_makespan": _max_makespan,
    "makespan_within_lower_bound": _within_lower_bound,
    "min_backfills": _min_backfills,
}


def check_expectations(
    expect: Mapping[str, Any], result: SimulationResult, metrics: Metrics, monitor: DispatchMonitor
) -> list[Check]:
    unknown = sorted(set(expect) - set(EXPECTATIONS))
    if unknown:
        raise ExpectationError(f"unknown expect keys: {', '.join(unknown)} (known: {', '.join(EXPECTATIONS)})")
    ctx = (result, metrics, monitor)
    return [EXPECTATIONS[name](ctx, spec) for name, spec in expect.items()]
