"""Dependency rules (SPEC §3, §4): list checks, cycle detection, readiness and propagation."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Container, Iterable, Mapping, Sequence

import networkx as nx

from queue_service.core.errors import DependencyCycle, DependencyNotViable, FieldProblem, UnknownDependency
from queue_service.core.model import CancelReason, FailureReason, JobStatus


def dependency_list_problems(job_id: str, depends_on: Sequence[str]) -> list[FieldProblem]:
    """Duplicates and self-references in one job's `depends_on`."""
    problems = []
    duplicates = sorted(dep for dep, count in Counter(depends_on).items() if count > 1)
    if duplicates:
        problems.append(FieldProblem(("depends_on",), f"duplicate dependencies: {', '.join(duplicates)}"))
    if job_id in depends_on:
        problems.append(FieldProblem(("depends_on",), "a job cannot depend on itself"))
    return problems


def find_cycle(depends_on: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle among the given jobs, as a closed path, or None.

    The path follows `depends_on` edges and starts and ends at the member that
    comes first in the mapping's order, e.g. ["job_a", "job_c", "job_b", "job_a"]
    for a→c→b→a, so the same batch always names the same cycle.
    """
    if not any(dep in depends_on for deps in depends_on.values() for dep in deps):
        return None  # no edge stays inside the group, so no cycle can close in it
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(depends_on)
    for job_id, deps in depends_on.items():
        graph.add_edges_from((job_id, dep) for dep in deps)
    if nx.is_directed_acyclic_graph(graph):  # linear; the common case stops here
        return None
    position = {job_id: i for i, job_id in enumerate(depends_on)}
    # Search only inside one strongly connected component that holds a cycle: a search
    # started from every node of a large acyclic batch would be quadratic.
    cyclic = [c for c in nx.strongly_connected_components(graph) if len(c) > 1 or _loops_on_itself(graph, c)]
    component = min(cyclic, key=lambda c: min(position.get(j, len(position)) for j in c))
    start = min(component, key=lambda j: position.get(j, len(position)))
    edges = nx.find_cycle(graph.subgraph(component), source=start)
    members = [edge[0] for edge in edges]
    first = min(range(len(members)), key=lambda i: position.get(members[i], len(position)))
    rotated = members[first:] + members[:first]
    return [*rotated, rotated[0]]


def _loops_on_itself(graph: nx.DiGraph[str], component: set[str]) -> bool:
    (job_id,) = component
    return bool(graph.has_edge(job_id, job_id))


def check_acyclic(depends_on: Mapping[str, Sequence[str]]) -> None:
    cycle = find_cycle(depends_on)
    if cycle is not None:
        raise DependencyCycle(cycle)


def count_unfinished(
    depends_on: Sequence[str],
    existing_status: Mapping[str, JobStatus],
    batch_ids: Container[str] = frozenset(),
) -> int:
    """How many dependencies are not yet completed, after checking they can complete.

    `existing_status` holds the stored jobs among `depends_on`; `batch_ids` the ids
    submitted together with this job (they are new, hence unfinished), as a set the
    caller builds once: copying it per job made a batch quadratic. Raises
    UnknownDependency for ids in neither, DependencyNotViable for ones already
    failed or cancelled.
    """
    missing = [dep for dep in depends_on if dep not in existing_status and dep not in batch_ids]
    if missing:
        raise UnknownDependency(missing)
    dead = [
        (dep, existing_status[dep].value)
        for dep in depends_on
        if dep not in batch_ids and existing_status[dep] in (JobStatus.FAILED, JobStatus.CANCELLED)
    ]
    if dead:
        raise DependencyNotViable(dead)
    return sum(1 for dep in depends_on if dep in batch_ids or existing_status[dep] is not JobStatus.COMPLETED)


def descendants_in_order(root: str, dependants: Callable[[str], Iterable[str]]) -> list[str]:
    """Every job that transitively depends on `root`, breadth first, ties by id."""
    seen = {root}
    order: list[str] = []
    frontier = deque([root])
    while frontier:
        for child in sorted(dependants(frontier.popleft())):
            if child not in seen:
                seen.add(child)
                order.append(child)
                frontier.append(child)
    return order


def propagated_end(ancestor_status: JobStatus) -> tuple[JobStatus, FailureReason | CancelReason]:
    """What a waiting descendant becomes when an ancestor ends failed or cancelled."""
    if ancestor_status is JobStatus.FAILED:
        return JobStatus.FAILED, FailureReason.DEPENDENCY_FAILED
    if ancestor_status is JobStatus.CANCELLED:
        return JobStatus.CANCELLED, CancelReason.DEPENDENCY_CANCELLED
    raise ValueError(f"only failed or cancelled ends propagate, not {ancestor_status}")


def propagation_message(ancestor_id: str, ancestor_status: JobStatus) -> str:
    return f"dependency {ancestor_id} {ancestor_status.value}"
