"""`simulate SCENARIO.yaml... [--out DIR] [--generate N --seed S]` (SPEC §9, §12)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simulator.charts import write_charts
from simulator.expectations import ExpectationError
from simulator.report import render
from simulator.runner import ScenarioRun, run_scenario
from simulator.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from simulator.workload import generate

PROGRESS_THRESHOLD = 2_000  # jobs; smaller runs finish before a bar is worth drawing

cli = typer.Typer(add_completion=False, help=__doc__)


def _run_with_progress(scenario: Scenario, console: Console) -> ScenarioRun:
    if len(scenario.jobs) < PROGRESS_THRESHOLD or not console.is_terminal:
        return run_scenario(scenario)
    columns = (TextColumn(scenario.name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("jobs", total=len(scenario.jobs))
        return run_scenario(scenario, lambda done: progress.update(task, completed=done))


@cli.command()
def simulate(
    scenarios: Annotated[list[Path] | None, typer.Argument(help="scenario YAML files", exists=True)] = None,
    out: Annotated[Path | None, typer.Option(help="folder for reports and charts")] = None,
    generate_jobs: Annotated[int, typer.Option("--generate", help="also simulate N generated jobs")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the generated workload")] = 1,
    charts: Annotated[bool, typer.Option(help="write Gantt and utilization PNGs into --out")] = True,
) -> None:
    """Run each scenario through the pure policy in SimPy; exit 1 if any check fails."""
    console = Console(stderr=True)
    loaded: list[Scenario] = []
    try:
        loaded += [load_scenario(path) for path in scenarios or []]
        if generate_jobs:
            loaded.append(parse_scenario(generate(generate_jobs, seed), f"generated_{generate_jobs}"))
    except ScenarioError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error
    if not loaded:
        console.print("[red]error:[/red] name at least one scenario file, or --generate N")
        raise typer.Exit(2)
    all_passed = True
    for scenario in loaded:
        try:
            run = _run_with_progress(scenario, console)
        except ExpectationError as error:
            console.print(f"[red]error:[/red] {scenario.name}: {error}")
            raise typer.Exit(2) from error
        all_passed &= run.passed
        sys.stdout.write(render(run, full_timeline=False) + "\n")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{scenario.name}.report.txt").write_text(render(run, full_timeline=True), encoding="utf-8")
            if charts:
                write_charts(run, out)
    sys.stdout.flush()
    if not all_passed:
        raise typer.Exit(1)


def main() -> None:
    cli()
