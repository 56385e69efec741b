"""Gantt and utilization charts (PNG) of a run, byte-identical for identical runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from queue_service.core.model import AttemptOutcome
from simulator.runner import ScenarioRun

OUTCOME_COLOURS = {
    AttemptOutcome.SUCCEEDED: "#2e7d32",
    AttemptOutcome.FAILED: "#ef6c00",
    AttemptOutcome.TIMED_OUT: "#c62828",
    AttemptOutcome.PERMANENT_FAILURE: "#6a1b9a",
    AttemptOutcome.CANCELLED: "#757575",
}
LABELLED_ROWS = 60  # above this, job names would overlap
PNG_METADATA = {"Software": None}  # no version string: identical runs give identical files


def gantt(run: ScenarioRun, path: Path) -> None:
    jobs = sorted(
        (job for job in run.result.jobs.values() if job.attempts),
        key=lambda job: (job.attempts[0].started_at, job.attempts[0].sequence),
    )
    height = min(40.0, max(3.0, 0.28 * len(jobs) + 1.5))
    fig, ax = plt.subplots(figsize=(11, height))
    for row, job in enumerate(jobs):
        for attempt in job.attempts:
            end = attempt.ended_at if attempt.ended_at is not None else attempt.latest_end
            colour = OUTCOME_COLOURS.get(attempt.outcome or AttemptOutcome.SUCCEEDED, "#000000")
            ax.barh(
                row,
                end - attempt.started_at,
                left=attempt.started_at,
                height=0.7,
                color=colour,
                edgecolor="black",
                linewidth=0.3,
                hatch="//" if attempt.backfilled else None,
            )
    if len(jobs) <= LABELLED_ROWS:
        ax.set_yticks(range(len(jobs)), [f"{job.job_id} ({job.spec.priority.value})" for job in jobs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("simulated seconds")
    cap = run.result.capacity
    ax.set_title(f"{run.scenario.name}: attempts on a {cap.cpu_units} CPU / {cap.memory_mb} MB node")
    legend = [Patch(color=colour, label=outcome.value) for outcome, colour in OUTCOME_COLOURS.items()]
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="backfilled"))
    ax.grid(axis="x", linewidth=0.3)
    # Below the axis label, in a strip tight_layout leaves free.
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * 3.0 / height, 1, 1))
    fig.savefig(path, metadata=PNG_METADATA)
    plt.close(fig)


def utilization(run: ScenarioRun, path: Path) -> None:
    samples = run.result.usage
    cap = run.result.capacity
    times = [s.at for s in samples]
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.step(times, [100 * s.used.cpu_units / cap.cpu_units for s in samples], where="post", label="CPU %")
    ax.step(times, [100 * s.used.memory_mb / cap.memory_mb for s in samples], where="post", label="memory %")
    ax.axhline(100, color="black", linewidth=0.6, linestyle="--")
    ax.set_ylim(0, 110)
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("% of capacity")
    m = run.metrics
    ax.set_title(f"{run.scenario.name}: CPU {m.cpu_utilization:.0%}, memory {m.memory_utilization:.0%} on average")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, metadata=PNG_METADATA)
    plt.close(fig)


def write_charts(run: ScenarioRun, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{run.scenario.name}.gantt.png", out_dir / f"{run.scenario.name}.utilization.png"]
    gantt(run, paths[0])
    utilization(run, paths[1])
    return paths
