"""Pydantic schemas of the HTTP API (SPEC §3, §4): a family per resource.

`JobCreate` documents the request body in OpenAPI only. The body is validated by
`core.validation.parse_job_spec`, the same rules the simulator applies, so they
are written once; keep the two in step (the API tests submit what this declares).
Responses are validated against the `*Public` models before they leave.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from queue_service.core import constants as c
from queue_service.core.model import CancelReason, FailureReason, JobStatus, Priority

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"}, examples=["2026-01-01T12:00:00.000000Z"])]
JobId = Annotated[str, Field(pattern=c.JOB_ID_PATTERN, examples=["job_3f9a1c2b7d4e"])]


class ResourceRequirementsCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_units: int = Field(default=c.DEFAULT_CPU_UNITS, ge=1, le=c.MAX_WHOLE_NUMBER)
    memory_mb: int = Field(default=c.DEFAULT_MEMORY_MB, ge=1, le=c.MAX_WHOLE_NUMBER)


class RetryConfigCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(
        default=c.DEFAULT_MAX_ATTEMPTS, ge=1, le=c.MAX_WHOLE_NUMBER, description="counts the first run"
    )
    backoff_multiplier: float = Field(default=c.DEFAULT_BACKOFF_MULTIPLIER, ge=1)
    initial_delay_seconds: float = Field(default=c.DEFAULT_INITIAL_DELAY_SECONDS, ge=0)
    max_delay_seconds: float = Field(default=c.DEFAULT_MAX_DELAY_SECONDS, ge=0, description="≥ initial_delay_seconds")
    jitter: float = Field(default=c.DEFAULT_JITTER, ge=0, le=1)


class JobCreate(BaseModel):
    """A job to run. Only `type` is required."""

    model_config = ConfigDict(extra="forbid")

    job_id: JobId | None = Field(default=None, description="your own id; generated (`job_` + 12 hex) if omitted")
    type: str = Field(min_length=1, max_length=c.JOB_TYPE_MAX_LENGTH, description="selects the handler")
    priority: Priority = Priority.NORMAL
    payload: dict[str, Any] = Field(default_factory=dict, description=f"at most {c.MAX_PAYLOAD_BYTES} bytes as JSON")
    resource_requirements: ResourceRequirementsCreate = Field(default_factory=ResourceRequirementsCreate)
    depends_on: list[JobId] = Field(default_factory=list, description="existing jobs, or members of the same batch")
    retry_config: RetryConfigCreate = Field(default_factory=RetryConfigCreate)
    timeout_seconds: float = Field(default=c.DEFAULT_TIMEOUT_SECONDS, gt=0, description="per attempt")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=c.IDEMPOTENCY_KEY_MAX_LENGTH, description="or the Idempotency-Key header"
    )


class JobAccepted(BaseModel):
    """The answer to a submission (and to its idempotent replay)."""

    job_id: str
    status: JobStatus
    created_at: Timestamp
    priority: Priority
    position_in_queue: int | None = Field(description="ready jobs the scheduler considers first; null unless ready")


class BatchAccepted(BaseModel):
    jobs: list[JobAccepted] = Field(description="in input order")


class ResourceRequirements(BaseModel):
    cpu_units: int
    memory_mb: int


class RetryConfig(BaseModel):
    max_attempts: int
    backoff_multiplier: float
    initial_delay_seconds: float
    max_delay_seconds: float
    jitter: float


class OvertakePublic(BaseModel):
    priority: Priority
    at: Timestamp = Field(description="from this instant on, the job comes before newly ready jobs of `priority`")
    in_seconds: float = Field(description="0 once it has happened")


class AgingPublic(BaseModel):
    """Aging (SPEC §5) for a ready job: its static queue key, and when it overtakes higher levels."""

    sort_key: float = Field(description="epoch seconds of ready_at minus the priority's head start; smaller is first")
    headstart_seconds: float
    waited_seconds: float
    overtakes: list[OvertakePublic] = Field(description="higher levels only, highest first")


class JobPublic(BaseModel):
    """A job: what was submitted, and its state now."""

    job_id: str
    type: str
    priority: Priority
    status: JobStatus
    payload: dict[str, Any]
    resource_requirements: ResourceRequirements
    depends_on: list[str]
    blocked_by: list[str] = Field(description="dependencies not completed yet (while blocked)")
    retry_config: RetryConfig
    timeout_seconds: float
    idempotency_key: str | None
    attempts: int = Field(description="attempts started so far, numbered 1, 2, … for the life of the job")
    position_in_queue: int | None
    worker_id: str | None = Field(description="the node of the latest attempt")
    created_at: Timestamp
    updated_at: Timestamp
    ready_at: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None
    next_attempt_at: Timestamp | None
    last_error: str | None
    failure_reason: FailureReason | None
    cancel_reason: CancelReason | None
    result: Any


class JobDetail(JobPublic):
    """One job as GET /jobs/{id} returns it: with its aging while it is ready."""

    aging: AgingPublic | None = Field(default=None, description="while ready: when it overtakes higher levels")


class JobPage(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class LogEntryPublic(BaseModel):
    at: Timestamp
    attempt: int | None
    level: str
    event: str
    message: str
    data: dict[str, Any]


class JobLog(BaseModel):
    job_id: str
    entries: list[LogEntryPublic] = Field(description="oldest first")


class BulkRedrive(BaseModel):
    """Which failed jobs `POST /dead-letter/retry` re-drives."""

    model_config = ConfigDict(extra="forbid")

    # No NUL: PostgreSQL text cannot hold one (the same rule as GET /jobs?type=).
    type: str | None = Field(default=None, min_length=1, max_length=c.JOB_TYPE_MAX_LENGTH, pattern=r"^[^\x00]+$")
    failure_reasons: list[FailureReason] | None = Field(
        default=None,
        description="default: max_attempts_exhausted and permanent_error (dependency_failed jobs come back "
        "with the ancestor that ended them)",
    )
    limit: int = Field(default=100, ge=1, le=1000, description="most recently failed first")


class RedrivenJob(BaseModel):
    job_id: str
    status: JobStatus = Field(description="ready, or blocked while a dependency is not completed")
    descendants: list[str] = Field(description="dependency_failed descendants back in blocked")


class SkippedJob(BaseModel):
    job_id: str
    reason: str


class BulkRedriveResult(BaseModel):
    redriven: list[RedrivenJob]
    skipped: list[SkippedJob]


class PolicyPublic(BaseModel):
    """The scheduling policy's knobs (SPEC §5), as this process is configured."""

    headstart_seconds: dict[Priority, float] = Field(
        description="queue order is ready_at minus this; a job overtakes newer jobs of a level whose head start "
        "exceeds its own by less than it has waited"
    )
    candidate_window: int = Field(description="ready jobs considered per dispatch (K)")
    backfill: bool = Field(description="EASY backfill past a reserved head job")


class DispatchState(BaseModel):
    paused: bool
    policy: PolicyPublic | None = None


Misfire = Literal["skip", "run_once"]


class ScheduleCreate(BaseModel):
    """A cron schedule. The expression is read in `timezone`; each fire creates the
    job `job_template` describes, with id `cron:<name>:<fire time, UTC>`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, examples=["nightly-report"])
    cron: str = Field(min_length=1, max_length=200, examples=["0 2 * * *"], description="5 fields, or 6 (seconds last)")
    job_template: dict[str, Any] = Field(description="a job as POST /jobs takes it, without job_id or depends_on")
    timezone: str = Field(default="UTC", min_length=1, max_length=64, examples=["Europe/Paris"])
    enabled: bool = True
    misfire: Misfire = Field(
        default="skip", description="fires missed while the service was down: skip them, or run once for them all"
    )


class ScheduleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field(default=None, min_length=1, max_length=200)
    job_template: dict[str, Any] | None = None
    timezone: str | None = Field(default=None, min_length=1, max_length=64)
    enabled: bool | None = None
    misfire: Misfire | None = None


class SchedulePublic(BaseModel):
    name: str
    cron: str
    timezone: str
    job_template: dict[str, Any]
    enabled: bool
    misfire: Misfire
    next_fire_at: Timestamp | None = Field(description="the earliest fire not yet made")
    last_fired_at: Timestamp | None
    next_fire_times: list[Timestamp] = Field(description="the next few fire times; empty while disabled")
    created_at: Timestamp
    updated_at: Timestamp


class SchedulePage(BaseModel):
    items: list[SchedulePublic]


class Health(BaseModel):
    status: str


class Problem(BaseModel):
    """RFC 9457 problem details; `code` is the stable machine key."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


REQUEST_BODY_MODELS: tuple[type[BaseModel], ...] = (JobCreate,)
