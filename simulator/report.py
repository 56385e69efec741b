"""The plain-text report of a scenario run. Plain text rather than a terminal table,
so that identical input gives byte-identical output whatever the terminal."""

from __future__ import annotations

from collections.abc import Iterable

from simulator.records import JobRecord
from simulator.runner import ScenarioRun

TIMELINE_ROWS_SHOWN = 60  # longer timelines go to the report file only


def _t(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")


def _timeline_rows(jobs: Iterable[JobRecord]) -> list[str]:
    header = (
        f"{'job':<24} {'type':<18} {'priority':<8} {'cpu':>3} {'mem':>5} {'submit':>8} {'ready':>8} "
        f"{'start':>8} {'finish':>8} {'att':>3}  status"
    )
    rows = [header, "-" * len(header)]
    for job in jobs:
        end = job.status.value if job.status else f"rejected ({job.rejected})"
        why = job.failure_reason or job.cancel_reason
        if why:
            end += f" ({why})"
        if any(a.backfilled for a in job.attempts):
            end += " [backfill]"
        res = job.spec.resources
        rows.append(
            f"{job.job_id:<24} {job.spec.type[:18]:<18} {job.spec.priority.value:<8} {res.cpu_units:>3} "
            f"{res.memory_mb:>5} {_t(job.submit_at):>8} {_t(job.first_ready_at):>8} {_t(job.first_started_at):>8} "
            f"{_t(job.finished_at):>8} {len(job.attempts):>3}  {end}"
        )
    return rows


def _ordered(run: ScenarioRun) -> list[JobRecord]:
    def key(job: JobRecord) -> tuple[float, int, str]:
        first = job.attempts[0] if job.attempts else None
        return (first.started_at if first else float("inf"), first.sequence if first else 0, job.job_id)

    return sorted(run.result.jobs.values(), key=key)


def render(run: ScenarioRun, *, full_timeline: bool) -> str:
    scenario, result, m = run.scenario, run.result, run.metrics
    policy = scenario.policy
    lines = [f"== Scenario: {scenario.name} =="]
    if scenario.description:
        lines.append(scenario.description)
    per_node = f"{scenario.capacity.cpu_units} CPU / {scenario.capacity.memory_mb} MB"
    capacity_text = (
        f"capacity {per_node}; " if scenario.nodes == 1 else f"capacity {scenario.nodes} nodes of {per_node}; "
    )
    headstarts = ", ".join(f"{p.value} {_t(s)}s" for p, s in policy.headstart_seconds.items())
    lines += [
        capacity_text
        + f"backfill {'on' if policy.backfill else 'off'}; window {policy.candidate_window}; head starts {headstarts}",
        "",
        "Timeline (seconds; start = first attempt)",
    ]
    rows = _timeline_rows(_ordered(run))
    if full_timeline or len(rows) - 2 <= TIMELINE_ROWS_SHOWN:
        lines += rows
    else:
        lines += [
            *rows[: TIMELINE_ROWS_SHOWN + 2],
            f"… {len(rows) - 2 - TIMELINE_ROWS_SHOWN} more jobs in the report file",
        ]
    if result.rejections:
        lines += ["", "Rejected at submission"]
        lines += [f"t={_t(r.at)}: {', '.join(r.job_ids)} → {r.code}: {r.detail}" for r in result.rejections]
    lines += [
        "",
        "Schedule",
        f"makespan {_t(m.makespan)}s; lower bound {_t(m.lower_bound)}s ({m.lower_bound_reason}); "
        f"ratio {m.makespan_ratio:.3f}",
        f"utilization CPU {m.cpu_utilization:.1%}, memory {m.memory_utilization:.1%}",
        f"attempts {m.attempts}; plan() calls {m.plan_calls}",
        "wait from ready to first start, by priority:",
    ]
    lines += [
        f"  {w.priority.value:<8} n={w.jobs:<6} mean {w.mean:.3f}s  p50 {w.p50:.3f}s  max {w.maximum:.3f}s"
        for w in m.waits
    ]
    lines += ["", "Invariants"]
    lines += [f"{c.verdict}  {c.name}: {c.evidence}" for c in run.invariants]
    if run.expectations:
        lines += ["", "Expectations"]
        lines += [f"{c.verdict}  {c.name}: {c.evidence}" for c in run.expectations]
    checks = len(run.invariants) + len(run.expectations)
    failed = sum(not c.passed for c in (*run.invariants, *run.expectations))
    lines += ["", f"Result: {'PASS' if run.passed else 'FAIL'} ({checks} checks, {failed} failed)", ""]
    return "\n".join(lines)
