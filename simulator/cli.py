"""`simulate SCENARIO.yaml... [--out DIR] [--generate N --seed S]` (SPEC §9, §12), and
the capacity-planning options of issue #8: `--capacity`, `--policy`, `--sweep`, and
`--from-db` (a window of the live service's history as a scenario)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simulator.charts import write_charts
from simulator.expectations import ExpectationError
from simulator.report import render
from simulator.runner import ScenarioRun, run_scenario
from simulator.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from simulator.transform import with_capacity, with_nodes, with_policy
from simulator.whatif import parse_capacity, parse_policy, parse_sweep, render_sweep, sweep, sweep_chart
from simulator.workload import generate

# Reads a window of a live service's history as scenario data: (database URL, since,
# until) -> data. The simulator never touches the database itself; the `simulate`
# command of the installed package is given one (`queue_service.trace.main`).
TraceLoader = Callable[[str, datetime | None, datetime | None], dict[str, Any]]

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
    ctx: typer.Context,
    scenarios: Annotated[list[Path] | None, typer.Argument(help="scenario YAML files", exists=True)] = None,
    out: Annotated[Path | None, typer.Option(help="folder for reports and charts")] = None,
    generate_jobs: Annotated[int, typer.Option("--generate", help="also simulate N generated jobs")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the generated workload")] = 1,
    charts: Annotated[bool, typer.Option(help="write Gantt and utilization PNGs into --out")] = True,
    capacity: Annotated[
        str | None, typer.Option(help="simulate on this node capacity instead, CPU_UNITS/MEMORY_MB (16/8192)")
    ] = None,
    nodes: Annotated[int | None, typer.Option(min=1, help="simulate on N identical nodes of the capacity")] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(help="a policy knob, KEY=VALUE: candidate_window, backfill, headstart_<priority> (repeatable)"),
    ] = None,
    sweep_over: Annotated[
        str | None,
        typer.Option(
            "--sweep", help="KEY=V1,V2,...: one run per value (capacity, nodes or a policy knob); report and chart"
        ),
    ] = None,
    from_db: Annotated[
        str | None, typer.Option(help="also simulate the job history of the service whose database this is")
    ] = None,
    since: Annotated[datetime | None, typer.Option(help="with --from-db: jobs created at or after (UTC)")] = None,
    until: Annotated[datetime | None, typer.Option(help="with --from-db: jobs created before (UTC)")] = None,
    trace_out: Annotated[Path | None, typer.Option(help="with --from-db: write the trace as a scenario file")] = None,
) -> None:
    """Run each scenario through the pure policy in SimPy; exit 1 if any check fails."""
    console = Console(stderr=True)
    try:
        loaded = [load_scenario(path) for path in scenarios or []]
        if generate_jobs:
            loaded.append(parse_scenario(generate(generate_jobs, seed), f"generated_{generate_jobs}"))
        if from_db is not None:
            loaded.append(_trace(ctx, from_db, since, until, trace_out))
        loaded = _what_if(loaded, capacity, nodes, policy)
        sweep_setting = parse_sweep(sweep_over) if sweep_over is not None else None
    except ScenarioError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error
    if not loaded:
        console.print("[red]error:[/red] name at least one scenario file, --generate N or --from-db URL")
        raise typer.Exit(2)
    if sweep_setting is not None:
        _sweep(loaded, *sweep_setting, out, console)
        return
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


def _what_if(
    loaded: list[Scenario], capacity: str | None, nodes: int | None, policy: list[str] | None
) -> list[Scenario]:
    if capacity is not None:
        loaded = [with_capacity(scenario, parse_capacity(capacity)) for scenario in loaded]
    if nodes is not None:
        loaded = [with_nodes(scenario, nodes) for scenario in loaded]
    if policy:
        overrides = parse_policy(policy)
        loaded = [with_policy(scenario, overrides) for scenario in loaded]
    return loaded


def _trace(
    ctx: typer.Context, url: str, since: datetime | None, until: datetime | None, trace_out: Path | None
) -> Scenario:
    loader: TraceLoader | None = (ctx.obj or {}).get("trace_loader")
    if loader is None:
        raise ScenarioError("--from-db needs the installed `simulate` command (the service's database driver)")
    data = loader(url, since, until)
    if not data["jobs"]:
        raise ScenarioError(f"no jobs were created in that window ({since or 'the start'} to {until or 'now'})")
    if trace_out is not None:
        trace_out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return parse_scenario(data, str(data["name"]))


def _sweep(loaded: list[Scenario], key: str, values: list[str], out: Path | None, console: Console) -> None:
    for scenario in loaded:
        try:
            points = sweep(scenario, key, values)
        except (ScenarioError, ExpectationError) as error:
            console.print(f"[red]error:[/red] {scenario.name}: {error}")
            raise typer.Exit(2) from error
        sys.stdout.write(render_sweep(scenario.name, key, points) + "\n")
        if out is not None:
            (out / f"{scenario.name}.sweep.txt").parent.mkdir(parents=True, exist_ok=True)
            (out / f"{scenario.name}.sweep.txt").write_text(render_sweep(scenario.name, key, points), "utf-8")
            sweep_chart(scenario.name, key, points, out / f"{scenario.name}.sweep.png")
    sys.stdout.flush()


def main(trace_loader: TraceLoader | None = None) -> None:
    cli(obj={"trace_loader": trace_loader})
