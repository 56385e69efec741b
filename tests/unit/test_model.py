"""The job model's values (SPEC §3): priorities, statuses, attempt outcomes, resources, defaults."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from queue_service.core.model import (
    DEFAULT_JOB_RESOURCES,
    DEFAULT_NODE_CAPACITY,
    AttemptOutcome,
    JobSpec,
    JobStatus,
    Priority,
    Resources,
    RetryConfig,
    SimulatedWork,
)


def test_priorities_rank_critical_first_and_low_last() -> None:
    ranked = sorted(Priority, key=lambda p: p.rank)
    assert [p.value for p in ranked] == ["critical", "high", "normal", "low"]


@pytest.mark.parametrize("value", ["critical", "high", "normal", "low"])
def test_priority_parses_from_its_wire_value(value: str) -> None:
    assert Priority(value).value == value
    assert Priority(value) == value  # a StrEnum: compares and serializes as its string


@pytest.mark.parametrize(
    ("status", "terminal", "waiting"),
    [
        (JobStatus.BLOCKED, False, True),
        (JobStatus.READY, False, True),
        (JobStatus.RUNNING, False, False),
        (JobStatus.RETRYING, False, True),
        (JobStatus.COMPLETED, True, False),
        (JobStatus.FAILED, True, False),
        (JobStatus.CANCELLED, True, False),
    ],
)
def test_status_is_terminal_or_waiting(status: JobStatus, terminal: bool, waiting: bool) -> None:
    assert status.is_terminal is terminal
    assert status.is_waiting is waiting


def test_statuses_are_exactly_those_of_the_spec() -> None:
    assert {s.value for s in JobStatus} == {
        "blocked",
        "ready",
        "running",
        "retrying",
        "completed",
        "failed",
        "cancelled",
    }


@pytest.mark.parametrize(
    ("outcome", "counts"),
    [
        (AttemptOutcome.SUCCEEDED, False),
        (AttemptOutcome.FAILED, True),
        (AttemptOutcome.TIMED_OUT, True),
        (AttemptOutcome.PERMANENT_FAILURE, True),
        (AttemptOutcome.WORKER_LOST, True),  # SPEC §6: a lost lease counts as a failed attempt
        (AttemptOutcome.CANCELLED, False),
        (AttemptOutcome.INTERRUPTED, False),  # SPEC §6: graceful shutdown does not count
    ],
)
def test_which_attempt_outcomes_count_against_max_attempts(outcome: AttemptOutcome, counts: bool) -> None:
    assert outcome.counts_against_budget is counts


def test_resources_add_and_subtract_per_dimension() -> None:
    assert Resources(2, 256) + Resources(3, 512) == Resources(5, 768)
    assert Resources(5, 768) - Resources(3, 512) == Resources(2, 256)


@pytest.mark.parametrize(
    ("need", "available", "fits"),
    [
        (Resources(2, 256), Resources(2, 256), True),  # exactly full is fine
        (Resources(1, 1), Resources(8, 4096), True),
        (Resources(3, 256), Resources(2, 4096), False),  # CPU short
        (Resources(1, 4097), Resources(8, 4096), False),  # memory short
        (Resources(9, 5000), Resources(8, 4096), False),
    ],
)
def test_fits_in_needs_both_cpu_and_memory(need: Resources, available: Resources, fits: bool) -> None:
    assert need.fits_in(available) is fits


@pytest.mark.parametrize(
    ("resources", "non_negative"),
    [(Resources(0, 0), True), (Resources(1, 0), True), (Resources(-1, 5), False), (Resources(5, -1), False)],
)
def test_is_non_negative(resources: Resources, non_negative: bool) -> None:
    assert resources.is_non_negative() is non_negative


def test_default_node_capacity_and_job_resources_are_the_specs() -> None:
    assert Resources(8, 4096) == DEFAULT_NODE_CAPACITY
    assert Resources(1, 128) == DEFAULT_JOB_RESOURCES


def test_job_spec_defaults_are_the_specs() -> None:
    spec = JobSpec(job_id="job_1", type="send_email")
    assert spec.priority is Priority.NORMAL
    assert spec.payload == {}
    assert spec.resources == Resources(1, 128)
    assert spec.depends_on == ()
    assert spec.retry == RetryConfig(
        max_attempts=3,
        backoff_multiplier=2.0,
        initial_delay_seconds=1.0,
        max_delay_seconds=300.0,
        jitter=0.0,
    )
    assert spec.timeout_seconds == 300.0
    assert spec.idempotency_key is None


def test_job_specs_do_not_share_a_payload_dict() -> None:
    first, second = JobSpec("a", "t"), JobSpec("b", "t")
    first.payload["k"] = 1
    assert second.payload == {}


def test_simulated_work_defaults_to_plain_successful_work() -> None:
    assert SimulatedWork() == SimulatedWork(
        duration_seconds=None, fail_attempts=0, timeout_attempts=0, permanent_failure=False
    )


@pytest.mark.parametrize(
    "value",
    [Resources(1, 1), RetryConfig(), SimulatedWork(), JobSpec("a", "t")],
    ids=["Resources", "RetryConfig", "SimulatedWork", "JobSpec"],
)
def test_model_values_are_immutable(value: Any) -> None:
    field_name = dataclasses.fields(value)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field_name, None)
