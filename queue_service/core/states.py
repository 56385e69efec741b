"""The job state machine as data (SPEC §3): which status may follow which."""

from __future__ import annotations

from collections.abc import Mapping

from queue_service.core.errors import IllegalTransition
from queue_service.core.model import JobStatus as S

ALLOWED_TRANSITIONS: Mapping[S, frozenset[S]] = {
    S.BLOCKED: frozenset({S.READY, S.FAILED, S.CANCELLED}),
    S.READY: frozenset({S.RUNNING, S.FAILED, S.CANCELLED}),
    # running -> ready is the graceful-shutdown requeue of an interrupted attempt.
    S.RUNNING: frozenset({S.COMPLETED, S.RETRYING, S.FAILED, S.CANCELLED, S.READY}),
    S.RETRYING: frozenset({S.READY, S.FAILED, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    # failed -> ready/blocked is the dead-letter re-drive.
    S.FAILED: frozenset({S.READY, S.BLOCKED}),
    S.CANCELLED: frozenset(),
}


def can_transition(current: S, target: S) -> bool:
    return target in ALLOWED_TRANSITIONS[current]


def transition(job_id: str, current: S, target: S) -> S:
    """Return `target` if the move is legal, else raise IllegalTransition."""
    if not can_transition(current, target):
        raise IllegalTransition(job_id, current.value, target.value)
    return target


def initial_status(unfinished_dependencies: int) -> S:
    """A new job waits blocked while any dependency is unfinished, else it is ready."""
    return S.BLOCKED if unfinished_dependencies > 0 else S.READY
