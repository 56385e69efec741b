"""Scenarios rewritten for replay and what-if runs: time scaled, ids prefixed, capacity
or policy changed, and back to plain data (a scenario file, or the bodies of
`POST /jobs/batch`). Every rewrite goes through `parse_scenario` again, so a
rewritten scenario is checked by the same rules as a file.

A rewritten scenario keeps no `expect` block: its assertions name the original
ids and times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from queue_service.core.execution import simulated_duration
from queue_service.core.model import Priority, Resources
from queue_service.core.policy import PolicyConfig
from simulator.scenario import Scenario, ScenarioError, ScenarioJob, parse_scenario

POLICY_KEYS = ("candidate_window", "backfill", *(f"headstart_{p.value}" for p in Priority))


def job_body(job: ScenarioJob) -> dict[str, Any]:
    """The job as a client submits it (`POST /jobs/batch`), `payload.simulate` included."""
    spec = job.spec
    body: dict[str, Any] = {
        "job_id": spec.job_id,
        "type": spec.type,
        "priority": spec.priority.value,
        "payload": spec.payload,
        "resource_requirements": {"cpu_units": spec.resources.cpu_units, "memory_mb": spec.resources.memory_mb},
        "depends_on": list(spec.depends_on),
        "retry_config": spec.retry.as_json(),
        "timeout_seconds": spec.timeout_seconds,
    }
    if spec.idempotency_key is not None:
        body["idempotency_key"] = spec.idempotency_key
    return body


def _job_entry(job: ScenarioJob) -> dict[str, Any]:
    entry = job_body(job)
    payload = dict(entry.pop("payload"))
    simulate = payload.pop("simulate", None)
    if payload:
        entry["payload"] = payload
    if simulate is not None:
        entry["simulate"] = dict(simulate)
    entry["submit_at"] = job.submit_at
    if job.cancel_at is not None:
        entry["cancel_at"] = job.cancel_at
    return entry


def policy_data(policy: PolicyConfig) -> dict[str, Any]:
    return {
        "headstart_seconds": {p.value: s for p, s in policy.headstart_seconds.items()},
        "candidate_window": policy.candidate_window,
        "backfill": policy.backfill,
    }


def scenario_data(scenario: Scenario, *, keep_expect: bool = True) -> dict[str, Any]:
    """The scenario as a file holds it: loads back (`parse_scenario`) to the same scenario."""
    data: dict[str, Any] = {"name": scenario.name}
    if scenario.description:
        data["description"] = scenario.description
    data["capacity"] = {"cpu_units": scenario.capacity.cpu_units, "memory_mb": scenario.capacity.memory_mb}
    if scenario.nodes != 1:
        data["nodes"] = scenario.nodes
    if scenario.policy != PolicyConfig():
        data["policy"] = policy_data(scenario.policy)
    data["jobs"] = [_job_entry(job) for job in scenario.jobs]
    if keep_expect and scenario.expect:
        data["expect"] = dict(scenario.expect)
    return data


def _rebuilt(scenario: Scenario, data: dict[str, Any]) -> Scenario:
    data.pop("expect", None)
    # A measured property of the service, not of the file: kept as it was.
    return replace(parse_scenario(data, scenario.name), attempt_overhead_seconds=scenario.attempt_overhead_seconds)


def scaled(scenario: Scenario, factor: float) -> Scenario:
    """Every time of the workload multiplied by `factor`: arrivals, cancels, durations
    (a type's default duration made explicit first), timeouts and retry delays. The
    policy's head starts are the service's setting and stay as they are."""
    if factor <= 0:
        raise ScenarioError(f"time scale must be positive, got {factor:g}")
    data = scenario_data(scenario, keep_expect=False)
    for job, entry in zip(scenario.jobs, data["jobs"], strict=True):
        entry["submit_at"] = job.submit_at * factor
        if job.cancel_at is not None:
            entry["cancel_at"] = job.cancel_at * factor
        simulate = dict(entry.get("simulate") or {})
        simulate["duration_seconds"] = simulated_duration(job.spec.type, job.work) * factor
        entry["simulate"] = simulate
        entry["timeout_seconds"] = job.spec.timeout_seconds * factor
        retry = entry["retry_config"]
        retry["initial_delay_seconds"] *= factor
        retry["max_delay_seconds"] *= factor
    return _rebuilt(scenario, data)


def prefixed(scenario: Scenario, prefix: str) -> Scenario:
    """Every job id (and every reference to one) with `prefix` in front, so one
    scenario can run many times against one service."""
    data = scenario_data(scenario, keep_expect=False)
    for entry in data["jobs"]:
        entry["job_id"] = prefix + entry["job_id"]
        entry["depends_on"] = [prefix + dep for dep in entry["depends_on"]]
    return _rebuilt(scenario, data)


def with_capacity(scenario: Scenario, capacity: Resources) -> Scenario:
    data = scenario_data(scenario, keep_expect=False)
    data["capacity"] = {"cpu_units": capacity.cpu_units, "memory_mb": capacity.memory_mb}
    return _rebuilt(scenario, data)


def with_nodes(scenario: Scenario, nodes: int) -> Scenario:
    data = scenario_data(scenario, keep_expect=False)
    data["nodes"] = nodes
    return _rebuilt(scenario, data)


def with_policy(scenario: Scenario, overrides: Mapping[str, str]) -> Scenario:
    """Policy knobs by name: `candidate_window`, `backfill`, `headstart_<priority>`."""
    data = scenario_data(scenario, keep_expect=False)
    policy = policy_data(scenario.policy)
    for key, text in overrides.items():
        if key == "candidate_window":
            policy[key] = _parse_int(key, text)
        elif key == "backfill":
            if text.lower() not in ("true", "false", "on", "off", "1", "0"):
                raise ScenarioError(f"policy backfill: true or false, got {text!r}")
            policy[key] = text.lower() in ("true", "on", "1")
        elif key.startswith("headstart_") and key.removeprefix("headstart_") in {p.value for p in Priority}:
            policy["headstart_seconds"][key.removeprefix("headstart_")] = _parse_float(key, text)
        else:
            raise ScenarioError(f"unknown policy key {key!r}; known: {', '.join(POLICY_KEYS)}")
    data["policy"] = policy
    return _rebuilt(scenario, data)


def renamed(scenario: Scenario, name: str) -> Scenario:
    data = scenario_data(scenario, keep_expect=False)
    data["name"] = name
    return _rebuilt(scenario, data)


def _parse_int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ScenarioError(f"policy {key}: an integer, got {text!r}") from None


def _parse_float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ScenarioError(f"policy {key}: a number of seconds, got {text!r}") from None
