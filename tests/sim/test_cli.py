"""The `simulate` command: report on stdout, charts on disk, exit codes, determinism."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from simulator.cli import cli
from simulator.workload import render_yaml

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"
runner = CliRunner()


def test_report_and_charts_are_byte_identical_across_runs(tmp_path: Path) -> None:
    files = [str(SCENARIO_DIR / "04_resource_contention.yaml"), str(SCENARIO_DIR / "05_failure_recovery.yaml")]
    first = runner.invoke(cli, [*files, "--out", str(tmp_path / "a")])
    second = runner.invoke(cli, [*files, "--out", str(tmp_path / "b")])
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    assert "PASS  capacity never exceeded" in first.stdout
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "resource_contention.gantt.png" in written
    assert "resource_contention.utilization.png" in written
    for name in written:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_failed_expectation_exits_non_zero(tmp_path: Path) -> None:
    scenario = tmp_path / "wrong.yaml"
    scenario.write_text(
        "jobs:\n"
        "  - {job_id: a, type: t, priority: low, simulate: {duration_seconds: 1}}\n"
        "  - {job_id: b, type: t, priority: critical, submit_at: 0, simulate: {duration_seconds: 1}}\n"
        "expect:\n  start_order: [a, b]\n"
    )
    result = runner.invoke(cli, [str(scenario)])
    assert result.exit_code == 1
    assert "FAIL  expect start_order: started b@0, a@0" in result.stdout


def test_a_bad_scenario_is_a_clear_error(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text("jobs:\n  - {job_id: a, type: t, resource_requirements: {cpu_units: 0}}\n")
    result = runner.invoke(cli, [str(scenario)])
    assert result.exit_code == 2
    assert "bad.yaml: jobs[0]: resource_requirements.cpu_units: must be at least 1" in result.output


def test_unknown_expectation_is_refused(tmp_path: Path) -> None:
    scenario = tmp_path / "typo.yaml"
    scenario.write_text("jobs:\n  - {job_id: a, type: t}\nexpect:\n  stauts: {a: completed}\n")
    result = runner.invoke(cli, [str(scenario)])
    assert result.exit_code == 2
    assert "unknown expect keys: stauts" in result.output


def test_generated_workload_runs_from_the_command_line() -> None:
    result = runner.invoke(cli, ["--generate", "300", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "== Scenario: load_300 ==" in result.stdout


def test_checked_in_load_matches_its_generator() -> None:
    assert (SCENARIO_DIR / "load_1000.yaml").read_text(encoding="utf-8") == render_yaml(1000, 1000)
