"""The scheduling policy (SPEC §5): one pure function decides what starts now.

`plan()` is called by the live worker with wall-clock time and its node's free
capacity, and by the simulator with simulated time. Neither re-implements any
part of it: queue order, fit, EASY backfill and tie-breaks all live here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from queue_service.core import constants as c
from queue_service.core.model import ZERO, Priority, Resources


def _default_headstarts() -> dict[Priority, float]:
    return {Priority(name): seconds for name, seconds in c.DEFAULT_HEADSTART_SECONDS.items()}


@dataclass(frozen=True)
class PolicyConfig:
    """Tunable knobs of the policy; the defaults are the SPEC's."""

    headstart_seconds: Mapping[Priority, float] = field(default_factory=_default_headstarts)
    candidate_window: int = c.DEFAULT_CANDIDATE_WINDOW
    backfill: bool = True  # False gives strict priority: nothing passes a head that does not fit

    def __post_init__(self) -> None:
        if self.candidate_window < 1:
            raise ValueError("candidate_window must be at least 1")
        missing = set(Priority) - set(self.headstart_seconds)
        if missing:
            raise ValueError(f"headstart_seconds lacks {sorted(missing)}")


def sort_key(ready_at: float, priority: Priority, policy: PolicyConfig) -> float:
    """Static queue position: earlier is served first.

    Static so that a B-tree index serves it; a job that waited longer than the gap
    between two levels' head starts overtakes newer jobs of the higher level (aging).
    """
    return ready_at - policy.headstart_seconds[priority]


@dataclass(frozen=True)
class Candidate:
    """A ready job as the policy sees it."""

    job_id: str
    sort_key: float
    resources: Resources
    timeout_seconds: float

    @property
    def queue_order(self) -> tuple[float, str]:
        return (self.sort_key, self.job_id)


@dataclass(frozen=True)
class RunningJob:
    """What occupies the node, and when it must end at the latest (start + timeout)."""

    job_id: str
    resources: Resources
    latest_end: float


@dataclass(frozen=True)
class Reservation:
    """EASY backfill: the head job's promised start and what it leaves spare then."""

    job_id: str
    start_at: float
    spare: Resources


@dataclass(frozen=True)
class Start:
    """A decision to start `job_id` now.

    `passed` names the reserved head job when this start is a backfill (it jumps
    that job in queue order), with the reservation it must not delay.
    """

    job_id: str
    resources: Resources
    latest_end: float
    passed: Reservation | None = None

    @property
    def backfilled(self) -> bool:
        return self.passed is not None


_QUEUE_ORDER = attrgetter("sort_key", "job_id")


def queue_window(candidates: Iterable[Candidate], window: int) -> list[Candidate]:
    """The first `window` candidates in queue order, ties broken by job id."""
    return sorted(candidates, key=_QUEUE_ORDER)[:window]


def used_resources(running: Iterable[RunningJob]) -> Resources:
    total = ZERO
    for job in running:
        total = total + job.resources
    return total


def reserve(head: Candidate, now: float, free: Resources, running: Sequence[RunningJob]) -> Reservation:
    """The earliest instant `head` is certain to fit, counting each running job as
    lasting until its latest end, and what would still be spare at that instant."""
    available = free
    start_at = now
    ending = sorted(running, key=lambda job: (job.latest_end, job.job_id))
    index = 0
    while not head.resources.fits_in(available) and index < len(ending):
        start_at = max(now, ending[index].latest_end)
        # Everything ending at that same instant is free then too.
        while index < len(ending) and ending[index].latest_end <= start_at:
            available = available + ending[index].resources
            index += 1
    return Reservation(head.job_id, start_at, available - head.resources)


def plan(
    now: float,
    candidates: Iterable[Candidate],
    running: Sequence[RunningJob],
    capacity: Resources,
    policy: PolicyConfig,
) -> list[Start]:
    """Decide which candidates start at `now` on a node of `capacity`.

    Candidates are taken in queue order. Each that fits what is free starts. The
    first that does not fit becomes the head and gets a reservation; after it, a
    job starts only if it fits now and either ends (at the latest) by the
    reservation or uses only resources the head will not need then. A candidate
    larger than the node's whole capacity is skipped: it belongs to another node.
    """
    free = capacity - used_resources(running)
    occupying = list(running)
    starts: list[Start] = []
    reservation: Reservation | None = None

    for cand in queue_window(candidates, policy.candidate_window):
        if free.cpu_units < 1 or free.memory_mb < 1:
            break  # every job needs at least one of each (SPEC §3): nothing more can start
        if not cand.resources.fits_in(capacity) or not cand.resources.fits_in(free):
            if reservation is None and cand.resources.fits_in(capacity):
                if not policy.backfill:
                    break
                reservation = reserve(cand, now, free, occupying)
            continue
        latest_end = now + cand.timeout_seconds
        if reservation is not None:
            ends_in_time = latest_end <= reservation.start_at
            if not ends_in_time:
                if not cand.resources.fits_in(reservation.spare):
                    continue
                reservation = Reservation(reservation.job_id, reservation.start_at, reservation.spare - cand.resources)
        start = Start(cand.job_id, cand.resources, latest_end, passed=reservation)
        starts.append(start)
        free = free - cand.resources
        occupying.append(RunningJob(cand.job_id, cand.resources, latest_end))
    return starts


def first_read(capacity: Resources, running: Sequence[RunningJob], policy: PolicyConfig) -> int:
    """How many candidates to read first. A start takes at least one CPU unit, so a
    node with few units free usually fills from the first few; a claim that reads
    the whole window each time pays for rows it will not start (see `is_complete`)."""
    free_units = max(0, capacity.cpu_units - used_resources(running).cpu_units)
    return min(policy.candidate_window, max(c.MIN_FIRST_READ, 2 * free_units))


def is_complete(
    starts: Sequence[Start],
    running: Sequence[RunningJob],
    capacity: Resources,
    read: int,
    asked: int,
    policy: PolicyConfig,
) -> bool:
    """Whether `plan()` over the first `read` candidates of the queue (having asked for
    `asked`) decided exactly what it would over the whole window.

    plan() walks the queue in order and stops once nothing more fits, so a longer
    window changes nothing when the read reached the end of the queue (fewer rows
    than asked) or when the starts leave less than one CPU unit or one MB free.
    """
    if read < asked or asked >= policy.candidate_window:
        return True
    free = (
        capacity
        - used_resources(running)
        - used_resources(RunningJob(s.job_id, s.resources, s.latest_end) for s in starts)
    )
    return free.cpu_units < 1 or free.memory_mb < 1
