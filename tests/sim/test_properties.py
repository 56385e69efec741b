"""Property tests: random workloads through the simulator keep every invariant.

Random DAGs, resources, priorities, durations, failures, timeouts and cancels; the
checks are the simulator's independent invariants (capacity sweep, dependency
order, backfill reservations, backoff formula, propagation, terminal states).
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queue_service.core.model import AttemptOutcome, JobStatus
from simulator.runner import ScenarioRun, run_scenario
from simulator.scenario import parse_scenario

PRIORITIES = ["critical", "high", "normal", "low"]


@st.composite
def workloads(draw: st.DrawFn) -> dict[str, Any]:
    cpu = draw(st.integers(1, 8))
    memory = draw(st.sampled_from([256, 1024, 4096]))
    size = draw(st.integers(1, 25))
    jobs = []
    for index in range(size):
        job: dict[str, Any] = {
            "job_id": f"j{index:02d}",
            "type": draw(st.sampled_from(["send_email", "data_export", "generate_report"])),
            "priority": draw(st.sampled_from(PRIORITIES)),
            "resource_requirements": {
                "cpu_units": draw(st.integers(1, cpu)),
                "memory_mb": draw(st.integers(1, memory)),
            },
            "submit_at": draw(st.sampled_from([0, 0, 0.5, 1, 2.5, 4])),
            "timeout_seconds": draw(st.sampled_from([0.5, 1, 2, 5])),
            "retry_config": {
                "max_attempts": draw(st.integers(1, 4)),
                "initial_delay_seconds": draw(st.sampled_from([0, 0.25, 1])),
                "backoff_multiplier": draw(st.sampled_from([1, 2, 3])),
                "jitter": draw(st.sampled_from([0, 0.3, 1])),
            },
            "simulate": {
                "duration_seconds": draw(st.sampled_from([0, 0.1, 0.5, 1, 3])),
                "fail_attempts": draw(st.integers(0, 3)),
                "timeout_attempts": draw(st.integers(0, 1)),
                "permanent_failure": draw(st.booleans()),
            },
        }
        earlier = [f"j{i:02d}" for i in range(index)]
        if earlier:
            job["depends_on"] = draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True))
        if draw(st.integers(0, 9)) == 0:
            job["cancel_at"] = draw(st.sampled_from([0, 0.3, 1, 3]))
        jobs.append(job)
    return {
        "name": "random",
        "capacity": {"cpu_units": cpu, "memory_mb": memory},
        "policy": {"backfill": draw(st.booleans()), "candidate_window": draw(st.sampled_from([1, 3, 256]))},
        "jobs": jobs,
    }


def _run(data: dict[str, Any]) -> ScenarioRun:
    return run_scenario(parse_scenario(data, "random"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_every_invariant_holds_on_random_workloads(data: dict[str, Any]) -> None:
    run = _run(data)
    failed = [f"{check.name}: {check.evidence}" for check in run.invariants if not check.passed]
    assert not failed
    for job in run.result.accepted:
        assert job.status is not None
        assert job.status.is_terminal
        if job.status is JobStatus.COMPLETED:
            assert [a.outcome for a in job.attempts][-1:] == [AttemptOutcome.SUCCEEDED]


@settings(max_examples=40, deadline=None)
@given(workloads())
def test_equal_input_gives_equal_output(data: dict[str, Any]) -> None:
    first, second = _run(data).result, _run(data).result
    assert first.jobs == second.jobs
    assert first.usage == second.usage
    assert first.rejections == second.rejections
