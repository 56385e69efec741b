"""Every scenario file holds to its invariants and its `expect` block, and the
reports say what the case study expects."""

from __future__ import annotations

from pathlib import Path

import pytest

from queue_service.core.model import JobStatus
from simulator.runner import ScenarioRun, run_scenario
from simulator.scenario import load_scenario

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"
SCENARIO_FILES = sorted(SCENARIO_DIR.glob("*.yaml"))


def _run(name: str) -> ScenarioRun:
    return run_scenario(load_scenario(SCENARIO_DIR / name))


def test_the_case_study_scenarios_are_all_there() -> None:
    names = {load_scenario(path).name for path in SCENARIO_FILES}
    assert {
        "basic_flow",
        "simple_dependencies",
        "complex_dag",
        "resource_contention",
        "failure_recovery",
        "circular_dependency",
        "load_1000",
    } <= names


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda path: path.stem)
def test_scenario_passes_every_check(path: Path) -> None:
    run = run_scenario(load_scenario(path))
    failed = [f"{check.name}: {check.evidence}" for check in (*run.invariants, *run.expectations) if not check.passed]
    assert not failed
    assert run.expectations or path.stem.startswith("load"), "a scenario without expectations asserts nothing"


def test_contention_never_oversubscribes_and_backfills_light_jobs() -> None:
    run = _run("04_resource_contention.yaml")
    peak_cpu = max(sample.used.cpu_units for sample in run.result.usage)
    peak_memory = max(sample.used.memory_mb for sample in run.result.usage)
    assert (peak_cpu, peak_memory) == (8, 4096)  # full, never more
    backfilled = {job.job_id for job in run.result.jobs.values() if job.attempts[0].backfilled}
    assert backfilled == {"light_3", "light_4"}
    assert run.metrics.makespan <= 1.05 * run.metrics.lower_bound


def test_failure_recovery_retries_at_the_backoff_times() -> None:
    jobs = _run("05_failure_recovery.yaml").result.jobs
    flaky = jobs["flaky_payment"]
    # Attempt 1 fails at 1 s, ready again 1 s later; attempt 2 fails at 3 s, ready 2 s later.
    assert [(a.started_at, a.ended_at) for a in flaky.attempts] == [(0, 1), (2, 3), (5, 6)]
    slow = jobs["slow_export"]
    assert [a.outcome.value if a.outcome else None for a in slow.attempts] == ["timed_out", "succeeded"]
    assert slow.attempts[0].ended_at == slow.spec.timeout_seconds
    assert jobs["invalid_account"].status is JobStatus.FAILED
    assert len(jobs["invalid_account"].attempts) == 1
    assert jobs["notify_finance"].last_error == "dependency doomed_reconciliation failed"  # the root cause


def test_cycle_is_rejected_with_its_path_and_nothing_of_it_runs() -> None:
    result = _run("06_circular_dependency.yaml").result
    (rejection,) = result.rejections
    assert rejection.code == "dependency_cycle"
    assert rejection.cycle == ("job_a", "job_c", "job_b", "job_a")
    assert all(not result.jobs[j].attempts for j in ("job_a", "job_b", "job_c", "job_d"))


def test_backfill_beats_strict_priority_on_contention() -> None:
    """The same workload under strict priority: light jobs wait behind a heavy head
    that does not fit; with backfill they fill the gap and nothing finishes later."""
    scenario = load_scenario(SCENARIO_DIR / "04_resource_contention.yaml")
    backfill = run_scenario(scenario)
    strict_policy = type(scenario.policy)(
        headstart_seconds=scenario.policy.headstart_seconds,
        candidate_window=scenario.policy.candidate_window,
        backfill=False,
    )
    strict = run_scenario(type(scenario)(**{**scenario.__dict__, "policy": strict_policy, "expect": {}}))
    assert all(check.passed for check in strict.invariants)

    def light_wait(run: ScenarioRun) -> float:
        lights = [job for job in run.result.jobs.values() if job.job_id.startswith("light")]
        return sum((job.first_started_at or 0) - (job.first_ready_at or 0) for job in lights) / len(lights)

    assert light_wait(backfill) < light_wait(strict)
    assert backfill.metrics.makespan <= strict.metrics.makespan
    assert backfill.metrics.cpu_utilization >= strict.metrics.cpu_utilization
