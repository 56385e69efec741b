"""What-if runs (issue #8): `simulate --capacity / --policy / --sweep`, the rewrites
of a scenario they rest on, and the sim-to-real comparison's arithmetic."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from queue_service.core.model import Priority, Resources
from simulator.agreement import ObservedJob, attempt_overhead, compare, kendall_tau_b
from simulator.cli import cli
from simulator.runner import run_scenario
from simulator.scenario import ScenarioError, load_scenario, parse_scenario
from simulator.transform import prefixed, scaled, with_capacity, with_nodes, with_policy
from simulator.whatif import parse_capacity, parse_sweep, sweep

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"
CONTENTION = SCENARIO_DIR / "04_resource_contention.yaml"
runner = CliRunner()


def test_more_capacity_shortens_waits_and_makespan() -> None:
    points = sweep(load_scenario(CONTENTION), "capacity", ["4/2048", "8/4096", "16/8192", "32/16384"])
    makespans = [point.makespan for point in points]
    low_waits = [point.waits[Priority.LOW][2] for point in points if Priority.LOW in point.waits]
    assert makespans == sorted(makespans, reverse=True)
    assert makespans[-1] < makespans[1]
    assert low_waits == sorted(low_waits, reverse=True)
    assert low_waits[-1] == 0  # everything fits at once: nobody waits


def test_jobs_larger_than_the_capacity_are_refused_as_the_service_refuses_them() -> None:
    scenario = with_capacity(load_scenario(CONTENTION), Resources(2, 8192))
    result = run_scenario(scenario).result
    rejected = [job for job in result.jobs.values() if job.status is None]
    assert rejected  # the heavy jobs need more than 2 CPU units
    assert all(job.rejected == "unschedulable" for job in rejected)
    assert all(job.status is not None and job.status.is_terminal for job in result.accepted)


def test_policy_override_changes_the_schedule() -> None:
    scenario = load_scenario(CONTENTION)
    with_backfill = run_scenario(scenario).result
    strict = run_scenario(with_policy(scenario, {"backfill": "false"})).result
    assert strict.makespan > with_backfill.makespan


def test_scaling_and_prefixing_keep_the_schedule_shape() -> None:
    scenario = load_scenario(CONTENTION)
    original = run_scenario(scenario).result
    rewritten = run_scenario(prefixed(scaled(scenario, 0.5), "x.")).result
    assert rewritten.makespan == pytest.approx(original.makespan * 0.5)
    for job_id, job in original.jobs.items():
        assert rewritten.jobs["x." + job_id].first_started_at == pytest.approx((job.first_started_at or 0) * 0.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [("8", "CPU_UNITS/MEMORY_MB"), ("0/100", "CPU_UNITS/MEMORY_MB"), ("a/b", "CPU_UNITS/MEMORY_MB")],
)
def test_bad_capacity_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_capacity(text)


def test_bad_sweep_is_a_clear_error() -> None:
    with pytest.raises(ScenarioError, match="unknown key 'colour'"):
        parse_sweep("colour=red,blue")
    with pytest.raises(ScenarioError, match="KEY=V1,V2"):
        parse_sweep("capacity=")
    with pytest.raises(ScenarioError, match="CPU_UNITS/MEMORY_MB"):
        parse_sweep("capacity=8/4096,lots")


def test_sweep_command_writes_a_report_and_an_identical_chart(tmp_path: Path) -> None:
    arguments = [str(CONTENTION), "--sweep", "capacity=4/2048,8/4096,16/8192"]
    first = runner.invoke(cli, [*arguments, "--out", str(tmp_path / "a")])
    second = runner.invoke(cli, [*arguments, "--out", str(tmp_path / "b")])
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    assert "What-if sweep: resource_contention over capacity" in first.stdout
    assert "| 16/8192 |" in first.stdout
    chart = tmp_path / "a" / "resource_contention.sweep.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart.read_bytes() == (tmp_path / "b" / "resource_contention.sweep.png").read_bytes()


def test_what_if_flags_refuse_bad_values_with_exit_2() -> None:
    for flags in (["--capacity", "big"], ["--policy", "backfill=maybe"], ["--policy", "nonsense"], ["--sweep", "x=1"]):
        result = runner.invoke(cli, [str(CONTENTION), *flags])
        assert result.exit_code == 2, (flags, result.output)


def test_from_db_needs_the_installed_command() -> None:
    result = runner.invoke(cli, ["--from-db", "postgresql://nowhere/db"])
    assert result.exit_code == 2
    assert "--from-db needs the installed" in result.output


def test_kendall_tau_b() -> None:
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [40, 30, 20, 10]) == -1.0
    assert kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6**0.5)  # a tie in one ranking
    assert kendall_tau_b([5], [7]) == 1.0


def test_compare_finds_status_order_and_makespan_disagreements() -> None:
    simulated = run_scenario(load_scenario(CONTENTION)).result

    def observed(shift: dict[str, float], status: dict[str, str]) -> dict[str, ObservedJob]:
        return {
            job_id: ObservedJob(
                job_id,
                status.get(job_id, job.status.value if job.status else "rejected"),
                attempts=len(job.attempts),
                first_ready=job.first_ready_at,
                first_start=(job.first_started_at or 0) + shift.get(job_id, 0.01),
                finished=(job.finished_at or 0) + shift.get(job_id, 0.01),
            )
            for job_id, job in simulated.jobs.items()
        }

    faithful = compare(simulated, observed({}, {}))
    assert faithful.passed
    assert faithful.tau == 1.0
    assert faithful.dispatch_latency == pytest.approx(0.01)  # every start 10 ms late

    # A job that waited in the simulation, started 20 s late: later than jobs the
    # simulator started well after it, far beyond the dispatch latency.
    by_start = sorted(simulated.jobs.values(), key=lambda job: job.first_started_at or 0)
    late = next(job.job_id for job in by_start if (job.first_started_at or 0) > (job.first_ready_at or 0))
    last = by_start[-1].job_id
    swapped = compare(simulated, observed({late: 20.0}, {last: "failed"}))
    assert not swapped.passed
    assert not swapped.statuses_equal
    assert swapped.order_violations
    assert swapped.tau < 1.0
    assert not swapped.makespan_ok


def test_more_nodes_run_more_at_once_and_each_stays_within_its_capacity() -> None:
    scenario = load_scenario(CONTENTION)
    one = run_scenario(scenario)
    two = run_scenario(with_nodes(scenario, 2))
    assert two.passed  # every invariant, on the merged dispatch decisions of both nodes
    assert not two.result.container_violations  # each node's own CPU and memory containers
    heavy_peak = max(
        sum(1 for job in two.result.jobs.values() for a in job.attempts
            if job.spec.resources.cpu_units == 4 and a.started_at <= at < (a.ended_at or 0))
        for at in (a.started_at for job in two.result.jobs.values() for a in job.attempts)
    )  # fmt: skip
    assert heavy_peak == 4  # two heavy jobs on each node, never a third on either
    assert two.result.makespan < one.result.makespan
    assert two.result.capacity == Resources(16, 8192)


def test_nodes_are_checked_in_scenario_files_and_flags() -> None:
    with pytest.raises(ScenarioError, match="nodes: an integer from 1"):
        with_nodes(load_scenario(CONTENTION), 0)
    result = runner.invoke(cli, [str(CONTENTION), "--sweep", "nodes=1,two"])
    assert result.exit_code == 2
    assert "nodes: a whole number" in result.output
    swept = runner.invoke(cli, [str(CONTENTION), "--sweep", "nodes=1,2"])
    assert swept.exit_code == 0, swept.output
    assert "| 2 |" in swept.stdout


def test_attempt_overhead_is_measured_from_the_live_attempts_and_lengthens_each_simulated_attempt() -> None:
    # Two 1-second jobs on one CPU unit: the simulator runs them back to back.
    job = {"type": "send_email", "resource_requirements": {"cpu_units": 1, "memory_mb": 64}, "submit_at": 0}
    scenario = parse_scenario(
        {
            "name": "two_in_a_row",
            "capacity": {"cpu_units": 1, "memory_mb": 64},
            "jobs": [
                {**job, "job_id": "a", "simulate": {"duration_seconds": 1.0}},
                {**job, "job_id": "b", "simulate": {"duration_seconds": 1.0}},
            ],
        },
        "two_in_a_row",
    )
    ideal = run_scenario(scenario).result
    assert ideal.makespan == pytest.approx(2.0)
    # Live, each attempt held its unit 20 ms beyond its handler, and b started 10 ms
    # after a's end freed the unit it was waiting for.
    live = {
        "a": ObservedJob("a", "completed", 1, 0.0, 0.0, 1.02, attempt_spans=((0.0, 0.0, 1.02),)),
        "b": ObservedJob("b", "completed", 1, 0.0, 1.03, 2.05, attempt_spans=((0.0, 1.03, 2.05),)),
    }
    overhead = attempt_overhead(ideal, live)
    assert overhead == pytest.approx(0.03)
    told = run_scenario(replace(scenario, attempt_overhead_seconds=overhead)).result
    assert told.makespan == pytest.approx(2.06)  # each of the two attempts 30 ms longer
    agreement = compare(told, live, overhead)
    assert agreement.attempt_overhead == overhead
    assert abs(agreement.makespan_error) < abs(compare(ideal, live).makespan_error)
    assert attempt_overhead(ideal, {}) == 0.0  # nothing observed: an ideal service
