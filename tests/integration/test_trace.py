"""Trace export (issue #8): a live run's job and attempt history read back out of the
database as a scenario (arrivals, resources, priorities, edges, measured durations
and outcomes), then simulated with the same capacity. The simulator's per-job
waits (ready → first start) agree with the recorded ones within the dispatch
latency measured on the same run, and the statuses are the same.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from api_fixtures import SCENARIOS, live_service

from queue_service.replay import prepare, replay
from queue_service.trace import export_trace
from simulator.agreement import compare
from simulator.runner import run_scenario
from simulator.scenario import load_scenario, parse_scenario

pytestmark = [pytest.mark.integration]

SIMULATE = str(Path(sys.executable).parent / "simulate")
WAIT_SLACK_SECONDS = 0.05  # on top of the measured dispatch latency: clock reads and rounding to 1 ms


async def test_trace_of_a_live_run_simulates_to_the_recorded_waits(migrated_url: str, tmp_path: Path) -> None:
    scenario = prepare(load_scenario(SCENARIOS / "05_failure_recovery.yaml"), time_scale=0.5, prefix="trace.")
    async with live_service(migrated_url, scenario, node_id="trace-node") as client:
        live = await replay(client, scenario, poll_interval=0.1)

    trace = await export_trace(migrated_url, None, None, name="recovery_trace")
    traced = parse_scenario(trace.scenario, "recovery_trace")
    assert traced.capacity == scenario.capacity  # the node that ran it
    assert {job.spec.job_id for job in traced.jobs} == {job.spec.job_id for job in scenario.jobs}
    simulated = run_scenario(traced).result
    agreement = compare(simulated, trace.recorded)
    assert agreement.statuses_equal, agreement.status_mismatches

    latency = max(agreement.dispatch_latency, live.agreement.dispatch_latency)
    differences = {}
    for job_id, job in simulated.jobs.items():
        recorded = trace.recorded[job_id]
        if job.first_started_at is None or recorded.first_start is None:
            continue
        assert job.first_ready_at is not None
        assert recorded.first_ready is not None
        simulated_wait = job.first_started_at - job.first_ready_at
        recorded_wait = recorded.first_start - recorded.first_ready
        differences[job_id] = abs(simulated_wait - recorded_wait)
    worst = max(differences, key=lambda job_id: differences[job_id])
    print(
        f"\ntrace: {len(differences)} jobs, dispatch latency {latency:.3f}s, worst wait error {differences[worst]:.3f}s"
    )
    started_live = {job_id for job_id, job in trace.recorded.items() if job.first_start is not None}
    assert set(differences) == started_live  # the same jobs started (dependants of failures never do)
    assert differences[worst] <= latency + WAIT_SLACK_SECONDS, (worst, differences[worst], latency)

    # The same trace from the command line, written out as a scenario file that loads back.
    scenario_file = tmp_path / "trace.yaml"
    command = subprocess.run(
        [SIMULATE, "--from-db", migrated_url, "--trace-out", str(scenario_file), "--since", "2000-01-01"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert command.returncode == 0, command.stderr
    assert "Result: PASS" in command.stdout
    reloaded = load_scenario(scenario_file)
    assert len(reloaded.jobs) == len(scenario.jobs)
    assert {job.spec.job_id for job in reloaded.jobs} == {job.spec.job_id for job in scenario.jobs}
    assert yaml.safe_load(scenario_file.read_text())["capacity"] == {"cpu_units": 8, "memory_mb": 4096}


async def test_an_empty_window_is_a_clear_error(migrated_url: str) -> None:
    command = subprocess.run(
        [SIMULATE, "--from-db", migrated_url, "--since", "2999-01-01"], capture_output=True, text=True, timeout=120
    )
    assert command.returncode == 2
    assert "no jobs were created in that window" in command.stderr
