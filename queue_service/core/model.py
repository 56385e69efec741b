"""The job model: priorities, statuses, resources and retry settings as plain values (SPEC §3)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from queue_service.core import constants as c


class Priority(enum.StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for critical … 3 for low: smaller runs first among equals."""
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {p: i for i, p in enumerate(Priority)}


class JobStatus(enum.StrEnum):
    BLOCKED = "blocked"
    READY = "ready"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def is_waiting(self) -> bool:
        """Not started and not finished: what a parent's failure or cancel also ends."""
        return self in (JobStatus.BLOCKED, JobStatus.READY, JobStatus.RETRYING)


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class FailureReason(enum.StrEnum):
    MAX_ATTEMPTS_EXHAUSTED = "max_attempts_exhausted"
    PERMANENT_ERROR = "permanent_error"
    DEPENDENCY_FAILED = "dependency_failed"


class CancelReason(enum.StrEnum):
    USER = "user"
    DEPENDENCY_CANCELLED = "dependency_cancelled"


class AttemptOutcome(enum.StrEnum):
    """How one attempt ended (one row per attempt in the execution history)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    PERMANENT_FAILURE = "permanent_failure"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # graceful shutdown; does not count against max_attempts

    @property
    def counts_against_budget(self) -> bool:
        return self not in (AttemptOutcome.INTERRUPTED, AttemptOutcome.CANCELLED, AttemptOutcome.SUCCEEDED)


@dataclass(frozen=True, order=True)
class Resources:
    """What a job needs or a node has: whole CPU units and megabytes of memory."""

    cpu_units: int
    memory_mb: int

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu_units + other.cpu_units, self.memory_mb + other.memory_mb)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu_units - other.cpu_units, self.memory_mb - other.memory_mb)

    def fits_in(self, available: Resources) -> bool:
        """True when both dimensions fit: a job starts only if CPU *and* memory are free."""
        return self.cpu_units <= available.cpu_units and self.memory_mb <= available.memory_mb

    def is_non_negative(self) -> bool:
        return self.cpu_units >= 0 and self.memory_mb >= 0


ZERO = Resources(0, 0)
DEFAULT_JOB_RESOURCES = Resources(c.DEFAULT_CPU_UNITS, c.DEFAULT_MEMORY_MB)
DEFAULT_NODE_CAPACITY = Resources(c.DEFAULT_NODE_CPU_UNITS, c.DEFAULT_NODE_MEMORY_MB)


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = c.DEFAULT_MAX_ATTEMPTS
    backoff_multiplier: float = c.DEFAULT_BACKOFF_MULTIPLIER
    initial_delay_seconds: float = c.DEFAULT_INITIAL_DELAY_SECONDS
    max_delay_seconds: float = c.DEFAULT_MAX_DELAY_SECONDS
    jitter: float = c.DEFAULT_JITTER

    def as_json(self) -> dict[str, int | float]:
        """The `retry_config` object of the API (SPEC §3)."""
        return {
            "max_attempts": self.max_attempts,
            "backoff_multiplier": self.backoff_multiplier,
            "initial_delay_seconds": self.initial_delay_seconds,
            "max_delay_seconds": self.max_delay_seconds,
            "jitter": self.jitter,
        }


@dataclass(frozen=True)
class SimulatedWork:
    """The optional `payload.simulate` block read by built-in handlers and the simulator."""

    duration_seconds: float | None = None
    fail_attempts: int = 0
    timeout_attempts: int = 0
    permanent_failure: bool = False


@dataclass(frozen=True)
class JobSpec:
    """A validated submission: what a client asked for, before the system adds state."""

    job_id: str
    type: str
    priority: Priority = Priority.NORMAL
    payload: dict[str, Any] = field(default_factory=dict)
    resources: Resources = DEFAULT_JOB_RESOURCES
    depends_on: tuple[str, ...] = ()
    retry: RetryConfig = RetryConfig()
    timeout_seconds: float = c.DEFAULT_TIMEOUT_SECONDS
    idempotency_key: str | None = None
    # The id was drawn for the client, not chosen by it: a stored job with the same id is
    # a coincidence of draws (the id is drawn again), never the request repeated.
    job_id_generated: bool = False
