"""Errors the database raises on purpose, as project errors (Procrastinate's edge translation).

`db.engine.translate_errors` maps a refused statement to one of these by the name
of the constraint that refused it, so callers above the repositories never import
the driver. Each carries a stable `code` like the core's errors, for the API.
"""

from __future__ import annotations

from queue_service.core.errors import QueueError


class JobIdConflict(QueueError):
    """A job with this id already exists (a replay with the same body is handled before this)."""

    code = "job_id_conflict"

    def __init__(self, job_id: str | None) -> None:
        super().__init__(f"a job with id {job_id!r} already exists" if job_id else "a job with this id already exists")
        self.job_id = job_id


class IdempotencyKeyConflict(QueueError):
    """Another job already holds this idempotency key."""

    code = "idempotency_key_reused"

    def __init__(self, key: str | None) -> None:
        super().__init__(f"idempotency key {key!r} is already used" if key else "idempotency key is already used")
        self.key = key


class CapacityExceeded(QueueError):
    """An allocation would take a node's CPU or memory use outside 0..capacity.

    Past capacity is the case that matters (a claim lost a race); below zero would
    mean resources freed twice, which the same CHECK refuses.
    """

    code = "capacity_exceeded"

    def __init__(self, resource: str) -> None:
        super().__init__(f"node {resource} use would leave the range 0..capacity")
        self.resource = resource


class AttemptConflict(QueueError):
    """A second attempt of a job would run at once, or an attempt number would be reused."""

    code = "attempt_conflict"

    def __init__(self, job_id: str | None) -> None:
        super().__init__(f"job {job_id!r} already has a running attempt or that attempt number")
        self.job_id = job_id


class ConstraintViolated(QueueError):
    """Any other named constraint refused a write: a bug in the caller, not a client error."""

    code = "constraint_violated"

    def __init__(self, constraint: str | None, detail: str) -> None:
        super().__init__(f"constraint {constraint or '(unnamed)'} refused the write: {detail}")
        self.constraint = constraint
