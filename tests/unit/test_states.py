"""The status state machine (SPEC §3): every pair of statuses, allowed or refused."""

from __future__ import annotations

import itertools

import pytest

from queue_service.core.errors import IllegalTransition
from queue_service.core.model import JobStatus as S
from queue_service.core.states import can_transition, initial_status, transition

# Written out from the SPEC's diagram, independently of states.ALLOWED_TRANSITIONS.
EXPECTED_ALLOWED = {
    (S.BLOCKED, S.READY),  # all dependencies completed
    (S.READY, S.RUNNING),  # dispatched
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.RETRYING),  # error or timeout, attempts left
    (S.RETRYING, S.READY),  # backoff elapsed
    (S.RUNNING, S.FAILED),  # no attempts left, or a permanent error
    (S.RUNNING, S.READY),  # graceful shutdown puts an interrupted attempt back
    # any non-terminal -> cancelled
    (S.BLOCKED, S.CANCELLED),
    (S.READY, S.CANCELLED),
    (S.RUNNING, S.CANCELLED),
    (S.RETRYING, S.CANCELLED),
    # a waiting descendant of a failed job ends failed (dependency_failed)
    (S.BLOCKED, S.FAILED),
    (S.READY, S.FAILED),
    (S.RETRYING, S.FAILED),
    # dead-letter re-drive: back to ready, or blocked for dependency_failed descendants
    (S.FAILED, S.READY),
    (S.FAILED, S.BLOCKED),
}

ALL_PAIRS = list(itertools.product(S, S))
ALLOWED_PAIRS = [pair for pair in ALL_PAIRS if pair in EXPECTED_ALLOWED]
REFUSED_PAIRS = [pair for pair in ALL_PAIRS if pair not in EXPECTED_ALLOWED]


def _pair_id(pair: tuple[S, S]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def test_the_table_covers_every_pair() -> None:
    assert len(ALLOWED_PAIRS) + len(REFUSED_PAIRS) == len(S) ** 2 == 49
    assert len(ALLOWED_PAIRS) == len(EXPECTED_ALLOWED)


@pytest.mark.parametrize("pair", ALLOWED_PAIRS, ids=_pair_id)
def test_allowed_transition_returns_the_target(pair: tuple[S, S]) -> None:
    current, target = pair
    assert can_transition(current, target)
    assert transition("job_1", current, target) is target


@pytest.mark.parametrize("pair", REFUSED_PAIRS, ids=_pair_id)
def test_disallowed_transition_raises(pair: tuple[S, S]) -> None:
    current, target = pair
    assert not can_transition(current, target)
    with pytest.raises(IllegalTransition) as raised:
        transition("job_1", current, target)
    error = raised.value
    assert (error.job_id, error.current, error.target) == ("job_1", current.value, target.value)
    assert error.code == "illegal_transition"
    assert "job_1" in error.detail


@pytest.mark.parametrize("status", [S.COMPLETED, S.CANCELLED])
def test_completed_and_cancelled_are_final(status: S) -> None:
    assert not any(can_transition(status, target) for target in S)


@pytest.mark.parametrize(("unfinished", "expected"), [(0, S.READY), (1, S.BLOCKED), (5, S.BLOCKED)])
def test_initial_status_waits_for_unfinished_dependencies(unfinished: int, expected: S) -> None:
    assert initial_status(unfinished) is expected
