"""Pydantic schemas of the HTTP API (SPEC §3, §4): a family per resource.

`JobCreate` documents the request body in OpenAPI only. The body is validated by
`core.validation.parse_job_spec`, the same rules the simulator applies, so they
are written once; keep the two in step (the API tests submit what this declares).
Responses are validated against the `*Public` models before they leave.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from queue_service.core import constants as c
from queue_service.core.model import CancelReason, FailureReason, JobStatus, Priority

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"}, examples=["2026-01-01T12:00:00.000000Z"])]
JobId = Annotated[str, Field(pattern=c.JOB_ID_PATTERN, examples=["job_3f9a1c2b7d4e"])]


class ResourceRequirementsCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_units: int = Field(default=c.DEFAULT_CPU_UNITS, ge=1)
    memory_mb: int = Field(default=c.DEFAULT_MEMORY_MB, ge=1)


class RetryConfigCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(default=c.DEFAULT_MAX_ATTEMPTS, ge=1, description="counts the first run")
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


class DispatchState(BaseModel):
    paused: bool


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
