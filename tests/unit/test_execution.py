"""What an attempt does and what follows a failed one (SPEC §6)."""

from __future__ import annotations

import pytest

from queue_service.core import constants as c
from queue_service.core.backoff import backoff_delay
from queue_service.core.execution import GiveUp, RetryAt, SimulatedAttempt, after_failed_attempt, simulated_attempt
from queue_service.core.model import AttemptOutcome as O
from queue_service.core.model import FailureReason, RetryConfig, SimulatedWork

TIMEOUT = 10.0


@pytest.mark.parametrize(
    ("work", "attempt", "expected"),
    [
        # plain work succeeds after its duration
        (SimulatedWork(duration_seconds=2.0), 1, SimulatedAttempt(O.SUCCEEDED, 2.0)),
        (SimulatedWork(duration_seconds=0.0), 1, SimulatedAttempt(O.SUCCEEDED, 0.0)),
        # fail_attempts: N fails attempts 1..N, then succeeds
        (SimulatedWork(duration_seconds=2.0, fail_attempts=2), 1, SimulatedAttempt(O.FAILED, 2.0)),
        (SimulatedWork(duration_seconds=2.0, fail_attempts=2), 2, SimulatedAttempt(O.FAILED, 2.0)),
        (SimulatedWork(duration_seconds=2.0, fail_attempts=2), 3, SimulatedAttempt(O.SUCCEEDED, 2.0)),
        # timeout_attempts: the first N run until the timeout stops them
        (SimulatedWork(duration_seconds=2.0, timeout_attempts=2), 1, SimulatedAttempt(O.TIMED_OUT, TIMEOUT)),
        (SimulatedWork(duration_seconds=2.0, timeout_attempts=2), 2, SimulatedAttempt(O.TIMED_OUT, TIMEOUT)),
        (SimulatedWork(duration_seconds=2.0, timeout_attempts=2), 3, SimulatedAttempt(O.SUCCEEDED, 2.0)),
        # both: timeouts first, then failures, both counted from attempt 1
        (
            SimulatedWork(duration_seconds=2.0, timeout_attempts=1, fail_attempts=2),
            1,
            SimulatedAttempt(O.TIMED_OUT, TIMEOUT),
        ),
        (SimulatedWork(duration_seconds=2.0, timeout_attempts=1, fail_attempts=2), 2, SimulatedAttempt(O.FAILED, 2.0)),
        (
            SimulatedWork(duration_seconds=2.0, timeout_attempts=1, fail_attempts=2),
            3,
            SimulatedAttempt(O.SUCCEEDED, 2.0),
        ),
        # permanent_failure fails every attempt after the scripted ones
        (SimulatedWork(duration_seconds=2.0, permanent_failure=True), 1, SimulatedAttempt(O.PERMANENT_FAILURE, 2.0)),
        (
            SimulatedWork(duration_seconds=2.0, fail_attempts=1, permanent_failure=True),
            1,
            SimulatedAttempt(O.FAILED, 2.0),
        ),
        (
            SimulatedWork(duration_seconds=2.0, fail_attempts=1, permanent_failure=True),
            2,
            SimulatedAttempt(O.PERMANENT_FAILURE, 2.0),
        ),
        # a duration at or beyond the timeout times out, as it would live
        (SimulatedWork(duration_seconds=TIMEOUT), 1, SimulatedAttempt(O.TIMED_OUT, TIMEOUT)),
        (SimulatedWork(duration_seconds=TIMEOUT + 5), 4, SimulatedAttempt(O.TIMED_OUT, TIMEOUT)),
        (SimulatedWork(duration_seconds=TIMEOUT - 0.001), 1, SimulatedAttempt(O.SUCCEEDED, TIMEOUT - 0.001)),
        (SimulatedWork(duration_seconds=TIMEOUT, permanent_failure=True), 1, SimulatedAttempt(O.TIMED_OUT, TIMEOUT)),
    ],
)
def test_simulated_attempt(work: SimulatedWork, attempt: int, expected: SimulatedAttempt) -> None:
    assert simulated_attempt("generate_report", work, attempt, TIMEOUT) == expected


@pytest.mark.parametrize(("job_type", "duration"), sorted(c.SIMULATED_DURATION_BY_TYPE.items()))
def test_known_types_take_their_default_duration(job_type: str, duration: float) -> None:
    assert simulated_attempt(job_type, SimulatedWork(), 1, TIMEOUT) == SimulatedAttempt(O.SUCCEEDED, duration)


def test_the_demo_types_have_distinct_durations() -> None:
    assert c.SIMULATED_DURATION_BY_TYPE["data_export"] > c.SIMULATED_DURATION_BY_TYPE["send_email"]


def test_an_unknown_type_takes_the_general_default_duration() -> None:
    result = simulated_attempt("my_custom_type", SimulatedWork(), 1, TIMEOUT)
    assert result == SimulatedAttempt(O.SUCCEEDED, c.DEFAULT_SIMULATED_DURATION_SECONDS)


def test_an_explicit_duration_overrides_the_type_default() -> None:
    assert simulated_attempt("data_export", SimulatedWork(duration_seconds=0.25), 1, TIMEOUT).run_seconds == 0.25


def test_a_type_default_at_or_over_the_timeout_times_out() -> None:
    duration = c.SIMULATED_DURATION_BY_TYPE["data_export"]
    assert simulated_attempt("data_export", SimulatedWork(), 1, duration) == SimulatedAttempt(O.TIMED_OUT, duration)


# --- after a failed attempt --------------------------------------------------------------


def test_a_failure_with_attempts_left_retries_after_the_backoff() -> None:
    decision = after_failed_attempt(
        job_id="job_a", retry=RetryConfig(), attempt=2, counted_attempts=2, permanent=False, failed_at=100.0
    )
    assert decision == RetryAt(next_attempt_at=102.0, delay_seconds=2.0)


def test_the_retry_time_is_exactly_failed_at_plus_the_jittered_backoff() -> None:
    retry = RetryConfig(max_attempts=5, jitter=0.8)
    decision = after_failed_attempt(
        job_id="job_j", retry=retry, attempt=3, counted_attempts=3, permanent=False, failed_at=1_000.0
    )
    delay = backoff_delay(retry, "job_j", 3)
    assert delay < 4.0  # the jitter did shorten it
    assert decision == RetryAt(next_attempt_at=1_000.0 + delay, delay_seconds=delay)


def test_the_backoff_follows_the_attempt_number_not_the_counted_attempts() -> None:
    # After a dead-letter re-drive, attempts are numbered on (SPEC §6) while the budget restarts.
    decision = after_failed_attempt(
        job_id="job_a", retry=RetryConfig(), attempt=5, counted_attempts=1, permanent=False, failed_at=0.0
    )
    assert decision == RetryAt(next_attempt_at=16.0, delay_seconds=16.0)


@pytest.mark.parametrize(("max_attempts", "counted"), [(1, 1), (3, 3), (3, 4)])
def test_gives_up_when_the_budget_is_spent(max_attempts: int, counted: int) -> None:
    decision = after_failed_attempt(
        job_id="job_a",
        retry=RetryConfig(max_attempts=max_attempts),
        attempt=counted,
        counted_attempts=counted,
        permanent=False,
        failed_at=50.0,
    )
    assert decision == GiveUp(FailureReason.MAX_ATTEMPTS_EXHAUSTED)


def test_the_last_allowed_retry_is_still_granted() -> None:
    decision = after_failed_attempt(
        job_id="job_a", retry=RetryConfig(max_attempts=3), attempt=2, counted_attempts=2, permanent=False, failed_at=0.0
    )
    assert isinstance(decision, RetryAt)


def test_a_permanent_error_gives_up_at_once() -> None:
    decision = after_failed_attempt(
        job_id="job_a", retry=RetryConfig(max_attempts=10), attempt=1, counted_attempts=1, permanent=True, failed_at=0.0
    )
    assert decision == GiveUp(FailureReason.PERMANENT_ERROR)
