"""What a simulation run leaves behind: one record per job, per attempt, per retry,
and the resource-use timeline. Plain data, read by the checks, report and charts."""

from __future__ import annotations

from dataclasses import dataclass, field

from queue_service.core.model import (
    AttemptOutcome,
    CancelReason,
    FailureReason,
    JobSpec,
    JobStatus,
    Resources,
    SimulatedWork,
)


@dataclass
class AttemptRecord:
    attempt: int
    sequence: int  # order of this start among all starts of the run
    started_at: float
    latest_end: float
    backfilled: bool
    ended_at: float | None = None
    outcome: AttemptOutcome | None = None


@dataclass(frozen=True)
class RetryRecord:
    attempt: int
    failed_at: float
    ready_at: float


@dataclass
class JobRecord:
    spec: JobSpec
    work: SimulatedWork
    submit_at: float
    cancel_at: float | None
    status: JobStatus | None = None  # None until submitted, and for a rejected job
    rejected: str | None = None  # the problem code when its batch was refused
    unfinished_deps: int = 0
    counted_attempts: int = 0
    ready_at: float | None = None
    first_ready_at: float | None = None
    finished_at: float | None = None
    next_attempt_at: float | None = None
    failure_reason: FailureReason | None = None
    cancel_reason: CancelReason | None = None
    last_error: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    retries: list[RetryRecord] = field(default_factory=list)
    history: list[tuple[float, JobStatus]] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def first_started_at(self) -> float | None:
        return self.attempts[0].started_at if self.attempts else None


@dataclass(frozen=True)
class Rejection:
    """A batch refused at submission, as the API would refuse it (422)."""

    at: float
    job_ids: tuple[str, ...]
    code: str
    detail: str
    cycle: tuple[str, ...] | None = None


@dataclass(frozen=True)
class UsageSample:
    at: float
    used: Resources


@dataclass
class SimulationResult:
    scenario_name: str
    capacity: Resources
    jobs: dict[str, JobRecord]
    rejections: list[Rejection]
    usage: list[UsageSample]
    plan_calls: int
    container_violations: list[str]

    @property
    def accepted(self) -> list[JobRecord]:
        return [job for job in self.jobs.values() if job.rejected is None]

    @property
    def first_submit(self) -> float:
        return min((job.submit_at for job in self.accepted), default=0.0)

    @property
    def makespan(self) -> float:
        ends = [job.finished_at for job in self.accepted if job.finished_at is not None]
        return max(ends, default=self.first_submit) - self.first_submit
