"""Properties of plan() over random nodes, running sets and candidates (SPEC §5).

Whole-number times and sizes keep the comparisons exact. The generator leans towards
what makes the policy work hard: few distinct keys and durations (ties, jobs ending
together, backfills ending exactly at a reservation), overdue running jobs, candidates
larger than the node, and often a job that the running set blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from queue_service.core.model import ZERO, Resources
from queue_service.core.policy import Candidate, PolicyConfig, RunningJob, Start, first_read, is_complete, plan

MEMORY_STEP = 128


@dataclass(frozen=True)
class Situation:
    now: float
    capacity: Resources
    running: list[RunningJob]
    candidates: list[Candidate]
    policy: PolicyConfig

    def plan(self) -> list[Start]:
        return plan(self.now, self.candidates, self.running, self.capacity, self.policy)

    def queue(self) -> list[Candidate]:
        """The window in queue order, computed here independently of the policy module."""
        ordered = sorted(self.candidates, key=lambda c: (c.sort_key, c.job_id))
        return ordered[: self.policy.candidate_window]

    def fitting(self) -> list[Candidate]:
        """Window candidates this node could ever run."""
        return [c for c in self.queue() if c.resources.fits_in(self.capacity)]


def total(resources: list[Resources]) -> Resources:
    result = ZERO
    for r in resources:
        result = result + r
    return result


# Few distinct durations, so jobs end together and backfills end exactly at reservations.
DURATIONS = st.sampled_from([1.0, 5.0, 10.0, 20.0, 40.0, 80.0])
DURATIONS_OR_OVERDUE = st.sampled_from([-5.0, 0.0, 1.0, 5.0, 10.0, 20.0, 40.0])  # a lease not yet expired runs late


def draw_size(draw: st.DrawFn, capacity: Resources) -> Resources:
    """Tiny, small or large jobs (sometimes larger than the node), so heads block and gaps fill."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return Resources(1, MEMORY_STEP)
    cpu_max, mem_max = capacity.cpu_units, capacity.memory_mb // MEMORY_STEP
    if kind == 1:
        cpu_max, mem_max = max(1, cpu_max // 3), max(1, mem_max // 3)
    else:
        cpu_max, mem_max = cpu_max + 1, mem_max + 1
    return Resources(draw(st.integers(1, cpu_max)), draw(st.integers(1, mem_max)) * MEMORY_STEP)


def draw_blocked_size(draw: st.DrawFn, capacity: Resources, free: Resources) -> Resources:
    """A job the node could run, but not while the running jobs hold what they hold."""
    capacity_steps, free_steps = capacity.memory_mb // MEMORY_STEP, free.memory_mb // MEMORY_STEP
    if free.cpu_units < capacity.cpu_units and (free_steps == capacity_steps or draw(st.booleans())):
        return Resources(draw(st.integers(free.cpu_units + 1, capacity.cpu_units)), MEMORY_STEP)
    return Resources(1, draw(st.integers(free_steps + 1, capacity_steps)) * MEMORY_STEP)


@st.composite
def situations(draw: st.DrawFn, backfill: bool | None = None) -> Situation:
    capacity = Resources(draw(st.integers(2, 16)), draw(st.integers(2, 32)) * MEMORY_STEP)
    now = float(draw(st.integers(0, 1000)))

    running: list[RunningJob] = []
    used = ZERO
    for index in range(draw(st.integers(0, 4))):
        need = draw_size(draw, capacity)
        if (used + need).fits_in(capacity):  # the running set always fits the node
            running.append(RunningJob(f"run_{index}", need, now + draw(DURATIONS_OR_OVERDUE)))
            used = used + need

    count = draw(st.integers(0, 12))
    ids = draw(st.permutations([f"job_{i:02d}" for i in range(count)]))  # id order differs from key order
    candidates = []
    for job_id in ids:
        size = draw_size(draw, capacity)
        # Few distinct keys make ties common; large jobs lean to the front, where they block.
        large = 3 * size.cpu_units > capacity.cpu_units or 3 * size.memory_mb > capacity.memory_mb
        key = float(draw(st.integers(0, 2 if large else 6)))
        candidates.append(Candidate(job_id, key, size, draw(DURATIONS)))
    free = capacity - used
    if draw(st.booleans()) and free != capacity:
        key = float(draw(st.integers(-1, 2)))
        candidates.append(Candidate("blocked", key, draw_blocked_size(draw, capacity, free), draw(DURATIONS)))
    policy = PolicyConfig(
        candidate_window=draw(st.sampled_from([1, 4, 256, 256, 256])),
        backfill=draw(st.booleans()) if backfill is None else backfill,
    )
    return Situation(now, capacity, running, candidates, policy)


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


@PROPERTY_SETTINGS
@given(situations())
def test_capacity_is_never_exceeded(s: Situation) -> None:
    starts = s.plan()
    occupied = total([r.resources for r in s.running] + [start.resources for start in starts])
    assert occupied.fits_in(s.capacity)
    # and each start is a distinct window candidate, with its own resources and timeout
    by_id = {c.job_id: c for c in s.queue()}
    assert len({start.job_id for start in starts}) == len(starts)
    for start in starts:
        assert start.resources == by_id[start.job_id].resources
        assert start.latest_end == s.now + by_id[start.job_id].timeout_seconds


@PROPERTY_SETTINGS
@given(situations(), st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_ignores_input_order(s: Situation, rnd: random.Random) -> None:
    first = s.plan()
    assert s.plan() == first
    candidates, running = list(s.candidates), list(s.running)
    rnd.shuffle(candidates)
    rnd.shuffle(running)
    assert plan(s.now, candidates, running, s.capacity, s.policy) == first


@PROPERTY_SETTINGS
@given(situations())
def test_starts_in_queue_order_are_a_maximal_prefix_then_backfills(s: Situation) -> None:
    starts = s.plan()
    fitting = s.fitting()
    in_order = [start.job_id for start in starts if not start.backfilled]
    assert in_order == [c.job_id for c in fitting[: len(in_order)]]
    # Every non-backfilled start precedes every backfilled one in the returned list.
    flags = [start.backfilled for start in starts]
    assert flags == sorted(flags)
    if len(in_order) < len(fitting):
        # The prefix stops only at a job that really does not fit what is left now.
        head = fitting[len(in_order)]
        left = (
            s.capacity
            - total([r.resources for r in s.running])
            - total([start.resources for start in starts[: len(in_order)]])
        )
        assert not head.resources.fits_in(left)
        assert head.job_id not in {start.job_id for start in starts}
        queue_ids = [c.job_id for c in fitting]
        for backfill in starts[len(in_order) :]:
            assert backfill.passed is not None
            assert backfill.passed.job_id == head.job_id
            assert queue_ids.index(backfill.job_id) > queue_ids.index(head.job_id)
    else:
        assert not any(flags)


@PROPERTY_SETTINGS
@given(situations(backfill=True))
def test_backfill_never_delays_the_head(s: Situation) -> None:
    starts = s.plan()
    backfills = [start for start in starts if start.passed is not None]
    if not backfills:
        return
    reservations = {(start.passed.job_id, start.passed.start_at) for start in backfills if start.passed is not None}
    assert len(reservations) == 1  # one head, one reserved instant
    ((head_id, start_at),) = reservations
    head = next(c for c in s.queue() if c.job_id == head_id)
    occupying = [(r.resources, r.latest_end) for r in s.running] + [(x.resources, x.latest_end) for x in starts]
    # Everything that may still run at the reserved instant, plus the head, fits the node.
    still_there = total([res for res, end in occupying if end > start_at])
    assert (still_there + head.resources).fits_in(s.capacity)
    assert all(start.passed is not None and start.passed.spare.is_non_negative() for start in backfills)
    # And the instant is the earliest the head was sure to fit, given what ran before it:
    # just before it, every such job ending at or after it still holds its resources.
    assert start_at >= s.now
    if start_at > s.now:
        before_head = [(r.resources, r.latest_end) for r in s.running] + [
            (x.resources, x.latest_end) for x in starts if not x.backfilled
        ]
        busy_just_before = total([res for res, end in before_head if end >= start_at])
        assert not head.resources.fits_in(s.capacity - busy_just_before)


@PROPERTY_SETTINGS
@given(situations(backfill=False))
def test_without_backfill_starts_are_exactly_a_queue_order_prefix(s: Situation) -> None:
    starts = s.plan()
    assert not any(start.backfilled for start in starts)
    assert [start.job_id for start in starts] == [c.job_id for c in s.fitting()[: len(starts)]]


@PROPERTY_SETTINGS
@given(situations(), st.integers(1, 300))
def test_a_complete_plan_over_the_first_candidates_is_the_plan_over_the_window(s: Situation, asked: int) -> None:
    """What a claim relies on when it reads only the first few ready jobs: whenever
    is_complete says so, the short read started exactly what the whole window would."""
    asked = min(asked, s.policy.candidate_window)
    read = sorted(s.candidates, key=lambda c: (c.sort_key, c.job_id))[:asked]
    starts = plan(s.now, read, s.running, s.capacity, s.policy)
    if is_complete(starts, s.running, s.capacity, len(read), asked, s.policy):
        assert starts == s.plan()
    # the window itself is always complete
    assert is_complete(s.plan(), s.running, s.capacity, len(s.queue()), s.policy.candidate_window, s.policy)
    assert 1 <= first_read(s.capacity, s.running, s.policy) <= s.policy.candidate_window


def test_a_node_filled_by_the_first_candidates_needs_no_more() -> None:
    """Eight free units and a long queue of one-unit jobs: the first read fills the node."""
    capacity = Resources(8, 4096)
    policy = PolicyConfig()
    queue = [Candidate(f"job_{i:04d}", float(i), Resources(1, 128), 60.0) for i in range(1000)]
    asked = first_read(capacity, [], policy)
    assert asked < policy.candidate_window
    starts = plan(0.0, queue[:asked], [], capacity, policy)
    assert [s.job_id for s in starts] == [f"job_{i:04d}" for i in range(8)]
    assert is_complete(starts, [], capacity, asked, asked, policy)
    # A seven-unit head, then big jobs that must wait: one unit stays free, so the claim
    # reads on and finds the one-unit job past the first read.
    queue = [Candidate("job_0000", 0.0, Resources(7, 128), 60.0)]
    queue += [Candidate(f"job_{i:04d}", float(i), Resources(8, 128), 60.0) for i in range(1, 40)]
    queue.append(Candidate("job_0040", 40.0, Resources(1, 128), 30.0))
    starts = plan(0.0, queue[:asked], [], capacity, policy)
    assert [s.job_id for s in starts] == ["job_0000"]
    assert not is_complete(starts, [], capacity, asked, asked, policy)
    assert [s.job_id for s in plan(0.0, queue, [], capacity, policy)] == ["job_0000", "job_0040"]
