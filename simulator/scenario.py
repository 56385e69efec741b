"""Scenario files (SPEC §9): capacity, policy overrides, jobs with arrival times and
simulated work, and `expect` assertions. Loaded into plain values, validated by core."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from queue_service.core import constants as c
from queue_service.core.errors import InvalidJob, PayloadTooLarge
from queue_service.core.model import JobSpec, Priority, Resources, SimulatedWork
from queue_service.core.policy import PolicyConfig
from queue_service.core.validation import parse_job_spec, simulated_work

# libyaml's loader when present: same safe subset, several times faster on large loads.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SCENARIO_FIELDS = frozenset({"name", "description", "capacity", "nodes", "policy", "jobs", "expect"})
MAX_NODES = 1024
SCHEDULE_FIELDS = frozenset({"submit_at", "cancel_at", "simulate"})


class ScenarioError(Exception):
    """A scenario file that cannot be simulated; the message says where and why."""


@dataclass(frozen=True)
class ScenarioJob:
    spec: JobSpec
    submit_at: float
    cancel_at: float | None
    work: SimulatedWork


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    capacity: Resources  # of each node
    policy: PolicyConfig
    jobs: tuple[ScenarioJob, ...]
    expect: Mapping[str, Any] = field(default_factory=dict)
    nodes: int = 1  # identical nodes, each of `capacity`
    # The service's own time per attempt (claim, start, record), on top of the handler's:
    # the attempt holds its resources this much longer. 0 is an ideal service.
    attempt_overhead_seconds: float = 0.0


def _number(value: object, where: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ScenarioError(f"{where}: must be a number ≥ {minimum:g}, got {value!r}")
    return float(value)


def _capacity(raw: object) -> Resources:
    if raw is None:
        return Resources(c.DEFAULT_NODE_CPU_UNITS, c.DEFAULT_NODE_MEMORY_MB)
    if not isinstance(raw, Mapping) or set(raw) - {"cpu_units", "memory_mb"}:
        raise ScenarioError("capacity: must be {cpu_units, memory_mb}")
    cpu = raw.get("cpu_units", c.DEFAULT_NODE_CPU_UNITS)
    memory = raw.get("memory_mb", c.DEFAULT_NODE_MEMORY_MB)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (cpu, memory)):
        raise ScenarioError("capacity: cpu_units and memory_mb must be integers ≥ 1")
    return Resources(cpu, memory)


def _policy(raw: object) -> PolicyConfig:
    if raw is None:
        return PolicyConfig()
    if not isinstance(raw, Mapping) or set(raw) - {"headstart_seconds", "candidate_window", "backfill"}:
        raise ScenarioError("policy: allowed keys are headstart_seconds, candidate_window, backfill")
    default = PolicyConfig()
    headstarts = dict(default.headstart_seconds)
    for name, seconds in dict(raw.get("headstart_seconds") or {}).items():
        try:
            headstarts[Priority(name)] = _number(seconds, f"policy.headstart_seconds.{name}")
        except ValueError as error:
            raise ScenarioError(f"policy.headstart_seconds: unknown priority {name!r}") from error
    window = raw.get("candidate_window", default.candidate_window)
    backfill = raw.get("backfill", default.backfill)
    if not isinstance(window, int) or window < 1 or not isinstance(backfill, bool):
        raise ScenarioError("policy: candidate_window must be an integer ≥ 1, backfill true or false")
    return PolicyConfig(headstart_seconds=headstarts, candidate_window=window, backfill=backfill)


def _job(raw: object, index: int) -> ScenarioJob:
    where = f"jobs[{index}]"
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{where}: must be a mapping")
    body = {k: v for k, v in raw.items() if k not in SCHEDULE_FIELDS}
    if "simulate" in raw:
        body["payload"] = {**dict(body.get("payload") or {}), "simulate": raw["simulate"]}
    try:
        spec = parse_job_spec(body, default_job_id=f"job_{index:06d}")
        work = simulated_work(spec.payload)
    except InvalidJob as invalid:
        problems = "; ".join(f"{'.'.join(map(str, p.loc))}: {p.message}" for p in invalid.problems)
        raise ScenarioError(f"{where}: {problems}") from invalid
    except PayloadTooLarge as too_large:
        raise ScenarioError(f"{where}: {too_large.detail}") from too_large
    submit_at = _number(raw.get("submit_at", 0), f"{where}.submit_at")
    cancel_raw = raw.get("cancel_at")
    cancel_at = None if cancel_raw is None else _number(cancel_raw, f"{where}.cancel_at")
    return ScenarioJob(spec, submit_at, cancel_at, work)


def parse_scenario(data: object, default_name: str) -> Scenario:
    if not isinstance(data, Mapping):
        raise ScenarioError("a scenario is a mapping with capacity, jobs and expect")
    unknown = sorted(set(data) - SCENARIO_FIELDS)
    if unknown:
        raise ScenarioError(f"unknown top-level keys: {', '.join(unknown)}")
    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, Sequence) or isinstance(raw_jobs, str) or not raw_jobs:
        raise ScenarioError("jobs: must be a non-empty list")
    jobs = tuple(_job(raw, i) for i, raw in enumerate(raw_jobs))
    seen: set[str] = set()
    for job in jobs:
        if job.spec.job_id in seen:
            raise ScenarioError(f"job id {job.spec.job_id!r} appears twice")
        seen.add(job.spec.job_id)
    expect = data.get("expect") or {}
    if not isinstance(expect, Mapping):
        raise ScenarioError("expect: must be a mapping")
    return Scenario(
        name=str(data.get("name", default_name)),
        description=str(data.get("description", "")).strip(),
        capacity=_capacity(data.get("capacity")),
        policy=_policy(data.get("policy")),
        jobs=jobs,
        expect=dict(expect),
        nodes=_nodes(data.get("nodes", 1)),
    )


def _nodes(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_NODES:
        raise ScenarioError(f"nodes: an integer from 1 to {MAX_NODES}, got {raw!r}")
    return raw


def load_scenario(path: Path) -> Scenario:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeLoader)
    except yaml.YAMLError as error:
        raise ScenarioError(f"{path.name}: not valid YAML: {error}") from error
    try:
        return parse_scenario(data, path.stem)
    except ScenarioError as error:
        raise ScenarioError(f"{path.name}: {error}") from error
