"""What happens after an attempt (SPEC §6): the simulated work of built-in handlers
and the retry-or-fail decision. Shared by the live worker and the simulator."""

from __future__ import annotations

from dataclasses import dataclass

from queue_service.core import constants as c
from queue_service.core.backoff import backoff_delay
from queue_service.core.model import AttemptOutcome, FailureReason, RetryConfig, SimulatedWork


@dataclass(frozen=True)
class SimulatedAttempt:
    """How a simulated attempt behaves: its outcome and how long it runs before it.

    A timed-out attempt "runs" until its timeout stops it.
    """

    outcome: AttemptOutcome
    run_seconds: float


def simulated_duration(job_type: str, work: SimulatedWork) -> float:
    if work.duration_seconds is not None:
        return work.duration_seconds
    return c.SIMULATED_DURATION_BY_TYPE.get(job_type, c.DEFAULT_SIMULATED_DURATION_SECONDS)


def simulated_attempt(job_type: str, work: SimulatedWork, attempt: int, timeout_seconds: float) -> SimulatedAttempt:
    """Attempts 1..timeout_attempts overrun the timeout; then 1..fail_attempts fail;
    then a permanent_failure job fails for good; otherwise the attempt succeeds.
    A duration at or beyond the timeout also times out, as it would live."""
    duration = simulated_duration(job_type, work)
    if attempt <= work.timeout_attempts or duration >= timeout_seconds:
        return SimulatedAttempt(AttemptOutcome.TIMED_OUT, timeout_seconds)
    if attempt <= work.fail_attempts:
        return SimulatedAttempt(AttemptOutcome.FAILED, duration)
    if work.permanent_failure:
        return SimulatedAttempt(AttemptOutcome.PERMANENT_FAILURE, duration)
    return SimulatedAttempt(AttemptOutcome.SUCCEEDED, duration)


@dataclass(frozen=True)
class RetryAt:
    next_attempt_at: float
    delay_seconds: float


@dataclass(frozen=True)
class GiveUp:
    reason: FailureReason


def after_failed_attempt(
    *,
    job_id: str,
    retry: RetryConfig,
    attempt: int,
    counted_attempts: int,
    permanent: bool,
    failed_at: float,
) -> RetryAt | GiveUp:
    """Retry with backoff while the budget lasts, else give up.

    `attempt` is the failed attempt's number (never reused over the job's life);
    `counted_attempts` is how many attempts count against `max_attempts` so far,
    this one included (interrupted attempts and those before a re-drive do not).
    """
    if permanent:
        return GiveUp(FailureReason.PERMANENT_ERROR)
    if counted_attempts >= retry.max_attempts:
        return GiveUp(FailureReason.MAX_ATTEMPTS_EXHAUSTED)
    delay = backoff_delay(retry, job_id, attempt)
    return RetryAt(failed_at + delay, delay)
