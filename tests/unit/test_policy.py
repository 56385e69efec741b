"""The scheduling policy (SPEC §5): queue order, aging, window, fit and EASY backfill."""

from __future__ import annotations

import pytest

from queue_service.core.model import Priority, Resources
from queue_service.core.policy import (
    Candidate,
    PolicyConfig,
    Reservation,
    RunningJob,
    Start,
    plan,
    queue_window,
    reserve,
    sort_key,
)

HOUR = 3600.0
NOW = 100.0
CAP = Resources(8, 4096)
POLICY = PolicyConfig()
STRICT = PolicyConfig(backfill=False)


def cand(job_id: str, key: float = 0.0, cpu: int = 1, mem: int = 128, timeout: float = 10.0) -> Candidate:
    return Candidate(job_id, key, Resources(cpu, mem), timeout)


def job(job_id: str, priority: Priority, ready_at: float, cpu: int = 1, policy: PolicyConfig = POLICY) -> Candidate:
    return cand(job_id, sort_key(ready_at, priority, policy), cpu=cpu)


def running(job_id: str, cpu: int, mem: int, latest_end: float) -> RunningJob:
    return RunningJob(job_id, Resources(cpu, mem), latest_end)


def started(starts: list[Start]) -> list[str]:
    return [s.job_id for s in starts]


# --- queue order ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "headstart"),
    [(Priority.CRITICAL, 3 * HOUR), (Priority.HIGH, 2 * HOUR), (Priority.NORMAL, HOUR), (Priority.LOW, 0.0)],
)
def test_sort_key_is_ready_at_minus_the_default_headstart(priority: Priority, headstart: float) -> None:
    assert sort_key(10_000.0, priority, POLICY) == 10_000.0 - headstart


def test_within_a_burst_priority_is_strict_then_fifo() -> None:
    burst = [
        job("low", Priority.LOW, 0.0),
        job("normal", Priority.NORMAL, 1.0),
        job("high_late", Priority.HIGH, 4.0),
        job("high_early", Priority.HIGH, 2.0),
        job("critical", Priority.CRITICAL, 3.0),
    ]
    assert [c.job_id for c in queue_window(burst, 256)] == ["critical", "high_early", "high_late", "normal", "low"]
    # with room for one, the critical job is the one that starts
    assert started(plan(NOW, burst, [], Resources(1, 4096), POLICY)) == ["critical"]


def test_a_low_job_that_waited_longer_than_the_gap_overtakes_a_newer_high_job() -> None:
    old_low = job("old_low", Priority.LOW, 0.0)
    new_high = job("new_high", Priority.HIGH, 2 * HOUR + 1)
    assert started(plan(3 * HOUR, [new_high, old_low], [], Resources(1, 4096), POLICY)) == ["old_low"]


def test_a_low_job_that_waited_less_than_the_gap_stays_behind_the_high_job() -> None:
    old_low = job("old_low", Priority.LOW, 0.0)
    new_high = job("new_high", Priority.HIGH, 2 * HOUR - 1)
    assert started(plan(3 * HOUR, [old_low, new_high], [], Resources(1, 4096), POLICY)) == ["new_high"]


def test_headstarts_are_configurable() -> None:
    fifo = PolicyConfig(headstart_seconds=dict.fromkeys(Priority, 0.0))
    first_low = job("first_low", Priority.LOW, 0.0, policy=fifo)
    later_critical = job("later_critical", Priority.CRITICAL, 1.0, policy=fifo)
    assert started(plan(NOW, [later_critical, first_low], [], Resources(1, 4096), fifo)) == ["first_low"]


def test_equal_keys_are_broken_by_job_id_whatever_the_input_order() -> None:
    tied = [cand("job_c"), cand("job_a"), cand("job_b")]
    assert [c.job_id for c in queue_window(tied, 256)] == ["job_a", "job_b", "job_c"]
    assert started(plan(NOW, tied, [], Resources(1, 4096), POLICY)) == ["job_a"]
    assert started(plan(NOW, tied[::-1], [], Resources(1, 4096), POLICY)) == ["job_a"]


def test_starts_are_listed_in_queue_order() -> None:
    starts = plan(NOW, [cand("c", 3.0), cand("a", 1.0), cand("b", 2.0)], [], CAP, POLICY)
    assert started(starts) == ["a", "b", "c"]


def test_a_start_carries_its_resources_and_latest_end() -> None:
    assert plan(NOW, [cand("a", cpu=3, mem=700, timeout=42.0)], [], CAP, POLICY) == [
        Start("a", Resources(3, 700), NOW + 42.0, passed=None)
    ]


def test_no_candidates_means_no_starts() -> None:
    assert plan(NOW, [], [running("r", 8, 4096, 200.0)], CAP, POLICY) == []


# --- the candidate window ------------------------------------------------------------------


def test_only_the_first_k_candidates_in_queue_order_are_considered() -> None:
    candidates = [cand("c", 3.0), cand("d", 4.0), cand("a", 1.0), cand("b", 2.0)]
    assert started(plan(NOW, candidates, [], CAP, PolicyConfig(candidate_window=2))) == ["a", "b"]


def test_the_window_counts_candidates_that_cannot_start() -> None:
    candidates = [cand("huge", 0.0, cpu=99), cand("a", 1.0), cand("b", 2.0)]
    assert started(plan(NOW, candidates, [], CAP, PolicyConfig(candidate_window=2))) == ["a"]


def test_the_default_window_is_256() -> None:
    candidates = [cand(f"job_{i:04d}", float(i), cpu=1, mem=1) for i in range(300)]
    starts = plan(NOW, candidates, [], Resources(1000, 1000), POLICY)
    assert len(starts) == 256
    assert starts[-1].job_id == "job_0255"


# --- fit -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [POLICY, STRICT], ids=["backfill", "strict"])
@pytest.mark.parametrize("size", [Resources(9, 128), Resources(1, 4097)], ids=["cpu", "memory"])
def test_a_candidate_larger_than_the_node_is_skipped_and_blocks_nothing(policy: PolicyConfig, size: Resources) -> None:
    huge = Candidate("huge", 0.0, size, 10.0)
    starts = plan(NOW, [huge, cand("small", 1.0)], [], CAP, policy)
    assert starts == [Start("small", Resources(1, 128), NOW + 10.0, passed=None)]


def test_cpu_alone_is_not_enough() -> None:
    busy = [running("r", 1, 4000, 200.0)]  # 7 CPU but only 96 MB free
    assert plan(NOW, [cand("a", mem=128)], busy, CAP, STRICT) == []
    assert started(plan(NOW, [cand("a", mem=96)], busy, CAP, STRICT)) == ["a"]


def test_memory_alone_is_not_enough() -> None:
    busy = [running("r", 7, 100, 200.0)]  # 3996 MB but only 1 CPU free
    assert plan(NOW, [cand("a", cpu=2)], busy, CAP, STRICT) == []
    assert started(plan(NOW, [cand("a", cpu=1)], busy, CAP, STRICT)) == ["a"]


def test_jobs_start_until_the_node_is_full() -> None:
    candidates = [cand(f"j{i}", float(i), cpu=3, mem=1000) for i in range(4)]
    assert started(plan(NOW, candidates, [], CAP, STRICT)) == ["j0", "j1"]  # a third would need 9 CPU


def test_a_full_node_starts_nothing() -> None:
    assert plan(NOW, [cand("a")], [running("r", 8, 4096, 200.0)], CAP, POLICY) == []


# --- reservations ---------------------------------------------------------------------------

ENDING = [
    running("ends_80", 2, 1024, 80.0),
    running("ends_30_b", 2, 1024, 30.0),
    running("ends_50", 2, 1024, 50.0),
    running("ends_30_a", 2, 1024, 30.0),
]  # together they fill an 8 CPU / 4096 MB node


@pytest.mark.parametrize(
    ("cpu", "start_at", "spare_cpu"),
    [
        (2, 30.0, 2),  # both jobs ending at 30 are counted free at 30, not just one
        (4, 30.0, 0),
        (5, 50.0, 1),
        (6, 50.0, 0),
        (8, 80.0, 0),
    ],
)
def test_reserve_finds_the_earliest_instant_the_head_fits(cpu: int, start_at: float, spare_cpu: int) -> None:
    head = cand("head", cpu=cpu, mem=1)
    expected_mem = {30.0: 2048, 50.0: 3072, 80.0: 4096}[start_at] - 1
    assert reserve(head, 10.0, Resources(0, 0), ENDING) == Reservation(
        "head", start_at, Resources(spare_cpu, expected_mem)
    )


def test_reserve_does_not_depend_on_the_order_of_running_jobs() -> None:
    head = cand("head", cpu=5, mem=1)
    assert reserve(head, 10.0, Resources(0, 0), ENDING) == reserve(head, 10.0, Resources(0, 0), ENDING[::-1])


def test_memory_can_decide_the_reservation() -> None:
    occupying = [running("cpu_heavy", 6, 100, 30.0), running("mem_heavy", 1, 3900, 90.0)]
    head = cand("head", cpu=1, mem=200)  # CPU is free now; memory only at 90
    free = CAP - Resources(7, 4000)
    assert reserve(head, 10.0, free, occupying) == Reservation("head", 90.0, Resources(7, 3896))


def test_an_overdue_running_job_is_counted_free_from_now() -> None:
    occupying = [running("overdue", 8, 4096, 5.0)]
    assert reserve(cand("head", cpu=4), 10.0, Resources(0, 0), occupying).start_at == 10.0


# --- EASY backfill --------------------------------------------------------------------------

# A node with 2 CPU free until 200, when the 6-CPU job must end; the head needs 4 CPU.
BUSY_UNTIL_200 = [running("r1", 6, 1024, 200.0)]
HEAD = cand("head", 0.0, cpu=4, mem=512)


def test_a_short_job_that_ends_by_the_reservation_is_backfilled() -> None:
    short = cand("short", 1.0, cpu=2, mem=256, timeout=50.0)  # ends at 150
    assert plan(NOW, [HEAD, short], BUSY_UNTIL_200, CAP, POLICY) == [
        Start("short", Resources(2, 256), 150.0, passed=Reservation("head", 200.0, Resources(4, 3584)))
    ]


@pytest.mark.parametrize(("timeout", "starts"), [(100.0, True), (100.5, False)])
def test_a_job_ending_by_the_reservation_instant_is_backfilled(timeout: float, starts: bool) -> None:
    big_head = cand("big_head", 0.0, cpu=7)  # leaves 1 CPU spare at 200: a 2-CPU job must be gone by then
    job_ = cand("two_cpu", 1.0, cpu=2, timeout=timeout)  # ends at 200, or just after
    assert started(plan(NOW, [big_head, job_], BUSY_UNTIL_200, CAP, POLICY)) == (["two_cpu"] if starts else [])


def test_a_long_job_starts_if_it_fits_in_what_the_head_leaves_spare() -> None:
    long = cand("long", 1.0, cpu=2, mem=256, timeout=500.0)  # ends at 600, after the reservation
    starts = plan(NOW, [HEAD, long], BUSY_UNTIL_200, CAP, POLICY)
    assert starts == [Start("long", Resources(2, 256), 600.0, passed=Reservation("head", 200.0, Resources(2, 3328)))]


def test_a_long_job_that_would_delay_the_head_does_not_start() -> None:
    big_head = cand("big_head", 0.0, cpu=7, mem=512)  # leaves 1 CPU spare at 200
    long = cand("long", 1.0, cpu=2, mem=256, timeout=500.0)
    assert plan(NOW, [big_head, long], BUSY_UNTIL_200, CAP, POLICY) == []


def test_memory_the_head_needs_is_not_backfilled_by_a_long_job() -> None:
    memory_head = cand("memory_head", 0.0, cpu=1, mem=4000)  # only 96 MB spare at 200
    long = cand("long", 1.0, cpu=1, mem=128, timeout=500.0)
    short = cand("short", 2.0, cpu=1, mem=128, timeout=50.0)
    busy = [running("r1", 6, 3500, 200.0)]
    assert started(plan(NOW, [memory_head, long, short], busy, CAP, POLICY)) == ["short"]


def test_long_backfills_share_the_spare_between_them() -> None:
    busy = [running("r1", 4, 1024, 200.0)]  # 4 CPU free now
    head = cand("head", 0.0, cpu=6)  # reservation at 200 leaves 2 CPU spare
    long_1 = cand("long_1", 1.0, cpu=2, timeout=500.0)
    long_2 = cand("long_2", 2.0, cpu=1, timeout=500.0)  # fits now, but the spare is gone
    short = cand("short", 3.0, cpu=1, timeout=50.0)
    starts = plan(NOW, [head, long_1, long_2, short], busy, CAP, POLICY)
    assert started(starts) == ["long_1", "short"]
    assert all(s.passed is not None and s.passed.job_id == "head" for s in starts)


def test_the_reservation_counts_jobs_started_earlier_in_the_same_plan() -> None:
    first = cand("first", 0.0, cpu=6, timeout=100.0)  # starts now, ends at 200
    head = cand("head", 1.0, cpu=4)
    short = cand("short", 2.0, cpu=2, timeout=50.0)
    starts = plan(NOW, [first, head, short], [], CAP, POLICY)
    assert [(s.job_id, s.passed) for s in starts] == [
        ("first", None),
        ("short", Reservation("head", 200.0, Resources(4, 4096 - 128))),
    ]


def test_only_the_first_job_that_does_not_fit_gets_a_reservation() -> None:
    second = cand("second", 1.0, cpu=5)  # does not fit either; it is passed over, not reserved
    short = cand("short", 2.0, cpu=2, timeout=50.0)
    starts = plan(NOW, [HEAD, second, short], BUSY_UNTIL_200, CAP, POLICY)
    assert [(s.job_id, s.passed and s.passed.job_id) for s in starts] == [("short", "head")]


def test_a_job_that_fits_ahead_of_the_head_is_not_a_backfill() -> None:
    first = cand("first", 0.0, cpu=1, timeout=1000.0)
    starts = plan(NOW, [first, cand("head", 1.0, cpu=4)], BUSY_UNTIL_200, CAP, POLICY)
    assert [(s.job_id, s.backfilled) for s in starts] == [("first", False)]


def test_strict_priority_stops_at_the_head() -> None:
    first = cand("first", 0.0, cpu=1)
    head = cand("head", 1.0, cpu=4)
    short = cand("short", 2.0, cpu=1, timeout=1.0)
    assert started(plan(NOW, [first, head, short], BUSY_UNTIL_200, CAP, POLICY)) == ["first", "short"]
    assert plan(NOW, [first, head, short], BUSY_UNTIL_200, CAP, STRICT) == [
        Start("first", Resources(1, 128), NOW + 10.0, passed=None)
    ]


def test_light_jobs_do_not_starve_a_heavy_head() -> None:
    # A stream of light jobs that would each outlast the reservation cannot take the
    # resources the heavy head is promised, however many there are.
    busy = [running("r1", 6, 1024, 200.0)]
    heavy = cand("heavy", 0.0, cpu=8)
    lights = [cand(f"light_{i}", float(i + 1), cpu=1, timeout=1000.0) for i in range(10)]
    assert plan(NOW, [heavy, *lights], busy, CAP, POLICY) == []


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, -1])
def test_the_window_must_be_at_least_one(window: int) -> None:
    with pytest.raises(ValueError, match="candidate_window"):
        PolicyConfig(candidate_window=window)


def test_every_priority_needs_a_headstart() -> None:
    with pytest.raises(ValueError, match="low"):
        PolicyConfig(headstart_seconds={Priority.CRITICAL: 1.0, Priority.HIGH: 1.0, Priority.NORMAL: 1.0})


def test_the_default_policy_is_the_specs() -> None:
    assert PolicyConfig() == PolicyConfig(
        headstart_seconds={
            Priority.CRITICAL: 3 * HOUR,
            Priority.HIGH: 2 * HOUR,
            Priority.NORMAL: HOUR,
            Priority.LOW: 0.0,
        },
        candidate_window=256,
        backfill=True,
    )
