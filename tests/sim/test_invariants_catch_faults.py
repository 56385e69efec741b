"""The invariant checks are not vacuous: a policy or engine that breaks a rule is caught."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pytest

from queue_service.core import execution
from queue_service.core.model import Resources
from queue_service.core.policy import Candidate, PolicyConfig, RunningJob, Start, plan
from simulator.runner import run_scenario
from simulator.scenario import parse_scenario

CONTENTION: dict[str, Any] = {
    "capacity": {"cpu_units": 4, "memory_mb": 1024},
    "jobs": [
        {
            "job_id": f"job_{i}",
            "type": "t",
            "priority": ["low", "critical"][i % 2],
            "submit_at": i * 0.1,
            "resource_requirements": {"cpu_units": 2, "memory_mb": 512},
            "simulate": {"duration_seconds": 1},
        }
        for i in range(6)
    ],
}


def _verdicts(data: Mapping[str, Any]) -> dict[str, bool]:
    run = run_scenario(parse_scenario(data, "faulty"))
    return {check.name: check.passed for check in run.invariants}


def test_an_overcommitting_policy_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def start_everything(
        now: float,
        candidates: Iterable[Candidate],
        running: Sequence[RunningJob],
        capacity: Resources,
        policy: PolicyConfig,
    ) -> list[Start]:
        return [Start(c.job_id, c.resources, now + c.timeout_seconds) for c in candidates]

    monkeypatch.setattr("simulator.engine.plan", start_everything)
    assert _verdicts(CONTENTION)["capacity never exceeded"] is False


def test_a_policy_ignoring_priority_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real_plan = plan

    def newest_first(
        now: float,
        candidates: Iterable[Candidate],
        running: Sequence[RunningJob],
        capacity: Resources,
        policy: PolicyConfig,
    ) -> list[Start]:
        flipped = [Candidate(c.job_id, -c.sort_key, c.resources, c.timeout_seconds) for c in candidates]
        return real_plan(now, flipped, running, capacity, policy)

    monkeypatch.setattr("simulator.engine.plan", newest_first)
    assert _verdicts(CONTENTION)["priority order respected except by backfill"] is False


def test_a_wrong_backoff_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real = execution.after_failed_attempt

    def off_by_one(**kwargs: object) -> execution.RetryAt | execution.GiveUp:
        decision = real(**kwargs)  # type: ignore[arg-type]
        if isinstance(decision, execution.RetryAt):
            return execution.RetryAt(decision.next_attempt_at + 1, decision.delay_seconds + 1)
        return decision

    monkeypatch.setattr(execution, "after_failed_attempt", off_by_one)
    flaky_job = {"job_id": "flaky", "type": "t", "simulate": {"duration_seconds": 1, "fail_attempts": 1}}
    flaky: dict[str, Any] = {"jobs": [flaky_job]}
    assert _verdicts(flaky)["backoff delays equal the formula"] is False
