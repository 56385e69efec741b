"""What-if runs for capacity planning (issue #8): a scenario simulated again with
another capacity or policy, and sweeps over one setting with a report and a chart.

`--sweep capacity=8/4096,16/8192`, `--sweep nodes=1,2,4` or `--sweep candidate_window=16,256` (any policy
key of `simulator.transform.with_policy`): each value gives one simulated run of the
same workload; the report has, per value, the makespan, utilization of CPU and
memory, and the p50/p95 wait (ready → first start) by priority.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt

from queue_service.core.model import Priority, Resources
from simulator.agreement import quantile
from simulator.metrics import utilization
from simulator.records import SimulationResult
from simulator.runner import run_scenario
from simulator.scenario import Scenario, ScenarioError
from simulator.transform import POLICY_KEYS, renamed, with_capacity, with_nodes, with_policy

CAPACITY_KEY = "capacity"
NODES_KEY = "nodes"
PRIORITY_COLOURS = {
    Priority.CRITICAL: "#c62828",
    Priority.HIGH: "#ef6c00",
    Priority.NORMAL: "#1565c0",
    Priority.LOW: "#757575",
}
PNG_METADATA = {"Software": None}  # identical sweeps give identical files


def parse_capacity(text: str) -> Resources:
    """`16/8192`: CPU units / memory MB, both positive."""
    cpu, slash, memory = text.partition("/")
    try:
        capacity = Resources(int(cpu), int(memory)) if slash else None
    except ValueError:
        capacity = None
    if capacity is None or capacity.cpu_units < 1 or capacity.memory_mb < 1:
        raise ScenarioError(f"capacity: CPU_UNITS/MEMORY_MB such as 16/8192, got {text!r}")
    return capacity


def parse_nodes(text: str) -> int:
    try:
        nodes = int(text)
    except ValueError:
        nodes = 0
    if nodes < 1:
        raise ScenarioError(f"nodes: a whole number ≥ 1, got {text!r}")
    return nodes


def parse_policy(settings: Sequence[str]) -> dict[str, str]:
    """`key=value` pairs (validated when applied)."""
    overrides = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or not key or not value:
            raise ScenarioError(f"policy: KEY=VALUE such as candidate_window=64, got {setting!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """`KEY=V1,V2,...` with KEY `capacity` or a policy key."""
    key, equals, values = text.partition("=")
    key = key.strip()
    choices = [value.strip() for value in values.split(",") if value.strip()]
    if not equals or not choices:
        raise ScenarioError(f"sweep: KEY=V1,V2,... such as capacity=8/4096,16/8192, got {text!r}")
    if key not in (CAPACITY_KEY, NODES_KEY) and key not in POLICY_KEYS:
        known = ", ".join((CAPACITY_KEY, NODES_KEY, *POLICY_KEYS))
        raise ScenarioError(f"sweep: unknown key {key!r}; known: {known}")
    for value in choices:
        if key == CAPACITY_KEY:
            parse_capacity(value)
        elif key == NODES_KEY:
            parse_nodes(value)
    return key, choices


def with_setting(scenario: Scenario, key: str, value: str) -> Scenario:
    if key == CAPACITY_KEY:
        changed = with_capacity(scenario, parse_capacity(value))
    elif key == NODES_KEY:
        changed = with_nodes(scenario, parse_nodes(value))
    else:
        changed = with_policy(scenario, {key: value})
    return renamed(changed, f"{scenario.name}[{key}={value}]")


@dataclass(frozen=True)
class SweepPoint:
    value: str
    makespan: float
    cpu_utilization: float
    memory_utilization: float
    waits: dict[Priority, tuple[int, float, float]]  # priority -> (jobs, p50, p95) in seconds
    completed: int
    failed: int
    cancelled: int
    rejected: int  # refused at submission, such as jobs larger than the capacity


def waits_by_priority(result: SimulationResult) -> dict[Priority, tuple[int, float, float]]:
    found: dict[Priority, list[float]] = {}
    for job in result.accepted:
        if job.first_started_at is not None and job.first_ready_at is not None:
            found.setdefault(job.spec.priority, []).append(job.first_started_at - job.first_ready_at)
    return {p: (len(w), quantile(w, 0.5), quantile(w, 0.95)) for p in Priority if (w := found.get(p))}


def sweep(scenario: Scenario, key: str, values: Sequence[str]) -> list[SweepPoint]:
    points = []
    for value in values:
        result = run_scenario(with_setting(scenario, key, value)).result
        cpu, memory = utilization(result)
        statuses = [job.status.value for job in result.accepted if job.status is not None]
        points.append(
            SweepPoint(
                value=value,
                makespan=result.makespan,
                cpu_utilization=cpu,
                memory_utilization=memory,
                waits=waits_by_priority(result),
                completed=statuses.count("completed"),
                failed=statuses.count("failed"),
                cancelled=statuses.count("cancelled"),
                rejected=len(result.jobs) - len(result.accepted),
            )
        )
    return points


def render_sweep(name: str, key: str, points: Sequence[SweepPoint]) -> str:
    priorities = [p for p in Priority if any(p in point.waits for point in points)]
    header = ["| " + key + " | makespan | CPU util | memory util | completed / failed / cancelled / rejected |"]
    header[0] += "".join(f" {p.value} wait p50 / p95 |" for p in priorities)
    rule = "|---" * (5 + len(priorities)) + "|"
    lines = [f"== What-if sweep: {name} over {key} ==", header[0], rule]
    for point in points:
        row = (
            f"| {point.value} | {point.makespan:.1f}s | {point.cpu_utilization:.0%} | {point.memory_utilization:.0%} "
            f"| {point.completed} / {point.failed} / {point.cancelled} / {point.rejected} |"
        )
        for priority in priorities:
            _, p50, p95 = point.waits.get(priority, (0, 0.0, 0.0))
            row += f" {p50:.1f}s / {p95:.1f}s |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def sweep_chart(name: str, key: str, points: Sequence[SweepPoint], path: Path) -> Path:
    """p95 wait by priority (log scale) and makespan with CPU utilization, per value."""
    labels = [point.value for point in points]
    positions = list(range(len(points)))
    fig, (waits_ax, makespan_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for priority in Priority:
        series = [point.waits.get(priority, (0, 0.0, 0.0))[2] for point in points]
        if any(point.waits.get(priority) for point in points):
            waits_ax.plot(
                positions, [max(value, 0.01) for value in series], marker="o", label=priority.value,
                color=PRIORITY_COLOURS[priority],
            )  # fmt: skip
    waits_ax.set_yscale("log")
    waits_ax.set_title("p95 wait, ready → start (s, log scale; 0 drawn at 0.01)")
    waits_ax.set_xticks(positions, labels)
    waits_ax.set_xlabel(key)
    waits_ax.legend(title="priority")
    waits_ax.grid(alpha=0.3, which="both")
    makespan_ax.bar(positions, [point.makespan for point in points], color="#90a4ae", label="makespan")
    makespan_ax.set_title("makespan (bars, s) and CPU utilization (line)")
    makespan_ax.set_xticks(positions, labels)
    makespan_ax.set_xlabel(key)
    makespan_ax.set_ylabel("seconds")
    utilization_ax = makespan_ax.twinx()
    utilization_ax.plot(positions, [100 * point.cpu_utilization for point in points], color="#2e7d32", marker="s")
    utilization_ax.set_ylim(0, 105)
    utilization_ax.set_ylabel("CPU utilization %")
    fig.suptitle(f"What-if: {name} over {key}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return path
