"""Dependency rules (SPEC §3, §4): list checks, cycles named by path, readiness and propagation."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_service.core.dag import (
    check_acyclic,
    count_unfinished,
    dependency_list_problems,
    descendants_in_order,
    find_cycle,
    propagated_end,
    propagation_message,
)
from queue_service.core.errors import DependencyCycle, DependencyNotViable, FieldProblem, UnknownDependency
from queue_service.core.model import CancelReason, FailureReason, JobStatus

# --- one job's depends_on list ---------------------------------------------------------


def test_a_clean_dependency_list_has_no_problems() -> None:
    assert dependency_list_problems("job_x", ["job_a", "job_b"]) == []
    assert dependency_list_problems("job_x", []) == []


def test_duplicates_are_named_once_each_in_sorted_order() -> None:
    problems = dependency_list_problems("job_x", ["job_b", "job_a", "job_b", "job_a", "job_a", "job_c"])
    assert problems == [FieldProblem(("depends_on",), "duplicate dependencies: job_a, job_b")]


def test_a_job_cannot_depend_on_itself() -> None:
    assert dependency_list_problems("job_x", ["job_a", "job_x"]) == [
        FieldProblem(("depends_on",), "a job cannot depend on itself")
    ]


def test_duplicates_and_self_reference_are_both_reported() -> None:
    problems = dependency_list_problems("job_x", ["job_x", "job_x"])
    assert [p.loc for p in problems] == [("depends_on",), ("depends_on",)]
    assert "duplicate" in problems[0].message
    assert "itself" in problems[1].message


# --- cycles ------------------------------------------------------------------------------


def test_the_specs_cycle_is_named_from_the_first_member() -> None:
    batch = {"job_a": ["job_c"], "job_b": ["job_a"], "job_c": ["job_b"]}
    assert find_cycle(batch) == ["job_a", "job_c", "job_b", "job_a"]


def test_the_cycle_starts_at_whichever_member_comes_first_in_the_mapping() -> None:
    batch = {"job_b": ["job_a"], "job_c": ["job_b"], "job_a": ["job_c"]}
    assert find_cycle(batch) == ["job_b", "job_a", "job_c", "job_b"]


def test_a_cycle_away_from_the_first_job_is_found_and_starts_at_its_first_member() -> None:
    batch = {"root": ["job_y"], "job_z": ["job_y"], "job_y": ["job_z"], "leaf": []}
    assert find_cycle(batch) == ["job_z", "job_y", "job_z"]


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ({"job_a": ["job_a"]}, ["job_a", "job_a"]),
        ({"job_a": ["job_b"], "job_b": ["job_a"]}, ["job_a", "job_b", "job_a"]),
    ],
    ids=["self-loop", "two-cycle"],
)
def test_short_cycles(batch: dict[str, list[str]], expected: list[str]) -> None:
    assert find_cycle(batch) == expected


@pytest.mark.parametrize(
    "batch",
    [
        {},
        {"job_a": []},
        {"job_a": [], "job_b": ["job_a"], "job_c": ["job_b"]},  # chain
        {"job_d": ["job_b", "job_c"], "job_b": ["job_a"], "job_c": ["job_a"], "job_a": []},  # diamond
        {"job_e": ["job_d", "job_a"], "job_d": ["job_b", "job_c"], "job_b": ["job_a"], "job_c": ["job_a"], "job_a": []},
        {"job_a": ["stored_1"], "job_b": ["job_a", "stored_1", "stored_2"]},  # deps outside the batch
        {"job_a": ["stored_1"], "job_b": ["stored_1"]},  # no edge inside the batch at all
    ],
    ids=["empty", "single", "chain", "diamond", "double-diamond", "outside-deps", "only-outside"],
)
def test_acyclic_batches_have_no_cycle(batch: dict[str, list[str]]) -> None:
    assert find_cycle(batch) is None
    check_acyclic(batch)  # does not raise


def test_check_acyclic_raises_with_the_cycle() -> None:
    with pytest.raises(DependencyCycle) as raised:
        check_acyclic({"job_a": ["job_c"], "job_b": ["job_a"], "job_c": ["job_b"]})
    assert raised.value.cycle == ("job_a", "job_c", "job_b", "job_a")
    assert raised.value.code == "dependency_cycle"


def _has_cycle(graph: Mapping[str, Sequence[str]]) -> bool:
    """Kahn's algorithm over the edges that stay inside the mapping: an independent oracle."""
    inside = {job: [dep for dep in deps if dep in graph] for job, deps in graph.items()}
    pending = {job: len(deps) for job, deps in inside.items()}
    dependants: dict[str, list[str]] = {job: [] for job in graph}
    for job, deps in inside.items():
        for dep in deps:
            dependants[dep].append(job)
    done = [job for job, count in pending.items() if count == 0]
    seen = 0
    while done:
        job = done.pop()
        seen += 1
        for child in dependants[job]:
            pending[child] -= 1
            if pending[child] == 0:
                done.append(child)
    return seen < len(graph)


@st.composite
def batches(draw: st.DrawFn) -> dict[str, list[str]]:
    ids = draw(st.lists(st.sampled_from([f"job_{i}" for i in range(8)]), min_size=1, max_size=8, unique=True))
    universe = [*ids, "stored_1", "stored_2"]
    return {job: draw(st.lists(st.sampled_from(universe), max_size=3, unique=True)) for job in ids}


@settings(max_examples=200, deadline=None)
@given(batches())
def test_find_cycle_returns_a_real_closed_path_exactly_when_there_is_a_cycle(batch: dict[str, list[str]]) -> None:
    cycle = find_cycle(batch)
    assert (cycle is not None) == _has_cycle(batch)
    if cycle is None:
        return
    members = cycle[:-1]
    assert cycle[0] == cycle[-1]
    assert len(set(members)) == len(members)
    for job, dep in itertools.pairwise(cycle):
        assert dep in batch[job]  # each step follows a depends_on edge
    order = list(batch)
    assert cycle[0] == min(members, key=order.index)
    assert find_cycle(dict(batch)) == cycle  # same batch, same cycle named


# --- readiness on submission -------------------------------------------------------------


def test_no_dependencies_means_nothing_unfinished() -> None:
    assert count_unfinished([], {}) == 0


def test_completed_dependencies_are_satisfied_and_the_rest_count() -> None:
    existing = {
        "done": JobStatus.COMPLETED,
        "blocked": JobStatus.BLOCKED,
        "ready": JobStatus.READY,
        "running": JobStatus.RUNNING,
        "retrying": JobStatus.RETRYING,
    }
    assert count_unfinished(["done"], existing) == 0
    assert count_unfinished(list(existing), existing) == 4


def test_batch_members_count_as_unfinished() -> None:
    existing = {"done": JobStatus.COMPLETED}
    assert (
        count_unfinished(["done", "sibling_1", "sibling_2"], existing, batch_ids=["sibling_1", "sibling_2", "x"]) == 2
    )


def test_unknown_dependencies_are_all_listed_in_order() -> None:
    with pytest.raises(UnknownDependency) as raised:
        count_unfinished(["job_z", "known", "job_y"], {"known": JobStatus.READY}, batch_ids=["other"])
    assert raised.value.missing == ("job_z", "job_y")
    assert raised.value.code == "unknown_dependency"
    assert "job_z" in raised.value.detail
    assert "job_y" in raised.value.detail


def test_failed_or_cancelled_dependencies_are_not_viable() -> None:
    existing = {"ok": JobStatus.COMPLETED, "bad": JobStatus.FAILED, "gone": JobStatus.CANCELLED}
    with pytest.raises(DependencyNotViable) as raised:
        count_unfinished(["ok", "bad", "gone"], existing)
    assert raised.value.dependencies == (("bad", "failed"), ("gone", "cancelled"))
    assert raised.value.code == "dependency_not_viable"
    assert "bad (failed)" in raised.value.detail


# --- propagation -------------------------------------------------------------------------


def test_descendants_are_breadth_first_with_ties_by_id() -> None:
    children: dict[str, list[str]] = {"root": ["c", "b"], "b": ["e"], "c": ["d", "a"], "e": ["f"]}
    assert descendants_in_order("root", lambda job: children.get(job, [])) == ["b", "c", "e", "a", "d", "f"]


def test_a_diamond_descendant_appears_once() -> None:
    children: dict[str, list[str]] = {"root": ["b", "c"], "b": ["d"], "c": ["d"], "d": ["e"]}
    assert descendants_in_order("root", lambda job: children.get(job, [])) == ["b", "c", "d", "e"]


def test_a_job_without_dependants_has_no_descendants() -> None:
    assert descendants_in_order("leaf", lambda job: []) == []


def test_descendants_exclude_the_root_even_if_reached_again() -> None:
    children: dict[str, list[str]] = {"root": ["a"], "a": ["root", "b"]}
    assert descendants_in_order("root", lambda job: children.get(job, [])) == ["a", "b"]


def test_failure_propagates_as_dependency_failed() -> None:
    assert propagated_end(JobStatus.FAILED) == (JobStatus.FAILED, FailureReason.DEPENDENCY_FAILED)


def test_cancel_propagates_as_dependency_cancelled() -> None:
    assert propagated_end(JobStatus.CANCELLED) == (JobStatus.CANCELLED, CancelReason.DEPENDENCY_CANCELLED)


@pytest.mark.parametrize(
    "status", [JobStatus.BLOCKED, JobStatus.READY, JobStatus.RUNNING, JobStatus.RETRYING, JobStatus.COMPLETED]
)
def test_other_ends_do_not_propagate(status: JobStatus) -> None:
    with pytest.raises(ValueError, match="only failed or cancelled"):
        propagated_end(status)


def test_propagation_message_names_the_ancestor() -> None:
    assert propagation_message("job_a", JobStatus.FAILED) == "dependency job_a failed"
    assert propagation_message("job_b", JobStatus.CANCELLED) == "dependency job_b cancelled"
