"""Regenerate evaluation_results.md from real runs: `python -m loadtest.evaluate`.

Runs every scenario through the simulator (verdicts, makespan against its lower
bound, charts into docs/charts/), the simulator and policy benchmark, the live
service benchmark, the hot paths at 10k-1M rows and the peers side by side
(when the `peers` extra is installed), the sim-to-real agreement of every scenario and a capacity sweep,
the locust run, then writes the report with the machine described and each
figure's method. The file is never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.bench_service import ACCEPT_LABELS, jobs_table_cell
from simulator.charts import write_charts
from simulator.runner import run_scenario
from simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
CHARTS = ROOT / "docs" / "charts"


def machine() -> str:
    cpus = os.cpu_count()
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = f", {total_kb / 1024 / 1024:.0f} GiB memory"
    postgres = subprocess.run(["psql", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return (
        f"{platform.machine()}, {cpus} CPUs{memory}; Python {platform.python_version()}; {postgres or 'psql not found'}"
    )


def scenarios_section() -> list[str]:
    CHARTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "## Scenarios (simulator)",
        "",
        "Method: `simulate scenarios/*.yaml`; each scenario runs through `core.plan()` in SimPy and is held to",
        "its invariants and `expect` block. Charts: `docs/charts/`.",
        "",
        "| scenario | jobs | checks | verdict | makespan | lower bound | ratio | CPU util. | memory util. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        run = run_scenario(load_scenario(path))
        write_charts(run, CHARTS)
        m = run.metrics
        checks = len(run.invariants) + len(run.expectations)
        lines.append(
            f"| {run.scenario.name} | {len(run.scenario.jobs)} | {checks} | {'PASS' if run.passed else 'FAIL'} "
            f"| {m.makespan:.2f} s | {m.lower_bound:.2f} s | {m.makespan_ratio:.3f} "
            f"| {m.cpu_utilization:.0%} | {m.memory_utilization:.0%} |"
        )
    lines += ["", "![contention Gantt](docs/charts/resource_contention.gantt.png)", ""]
    return lines


def run_module(module: str, *args: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", module, *args, "--json", out.name], check=True, cwd=ROOT)
        return dict(json.loads(Path(out.name).read_text()))


def simulator_section(results: dict[str, Any]) -> list[str]:
    load, generated = results["load_1000"], results["generated"]
    lines = [
        "## Simulator and policy speed",
        "",
        "Method: `python -m loadtest.bench_simulator` — `load_1000.yaml` parsed, simulated and checked (best of 5);",
        "a generated load simulated once; `plan()` per call with its window read from a sorted ready queue,",
        "worst case (the head does not fit and no candidate fits, so the whole window is scanned),",
        "median of 2000 calls.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| load_1000 | {load['best_s']:.3f} s |",
        f"| generated {generated['jobs']:,} jobs | {generated['simulate_s']:.1f} s simulate "
        f"(+{generated['generate_s']:.1f} s to generate) |",
    ]
    lines += [
        f"| plan() at {row['ready_jobs']:,} ready jobs | {row['median_us']:.0f} µs "
        f"({row['ratio_to_smallest']:.2f}× the 1,000-job time) |"
        for row in results["plan"]
    ]
    return [*lines, ""]


def service_section(results: dict[str, Any]) -> list[str]:
    latency = results["get_job_ms"]
    return [
        "## Live service",
        "",
        "Method: `python -m loadtest.bench_service` — `taskqueue serve` as a process on a fresh database; submissions",
        "with dispatch paused (the API alone), each way of accepting 1000 jobs timed in three rounds taken in",
        "turn (the median round shown, its slowest in brackets); drain from resume until no job waits; reads over",
        "2000 requests. The client is aiohttp, lighter than httpx: it shares the two cores with the service and",
        "the database.",
        "",
        "| measure | value |",
        "|---|---|",
        *(
            f"| {label} | {1000 / results[f'post_{way}_jobs_per_s']:.3f} s (slowest "
            f"{1000 / min(results['post_rounds'][way]):.3f} s), {results[f'post_{way}_jobs_per_s']:.0f} jobs/s |"
            for way, label in ACCEPT_LABELS.items()
        ),
        f"| 3000 no-op jobs drained on one node | {results['drain_jobs_per_s']:.0f} jobs/s |",
        f"| 9000 no-op jobs drained on two nodes (the service's and a `taskqueue worker`) "
        f"| {results['drain_two_nodes_jobs_per_s']:.0f} jobs/s |",
        f"| GET /jobs/{{id}} p50 / p99 | {latency['p50']:.1f} / {latency['p99']:.1f} ms |",
        *(
            [
                f"| service RSS before / after {rss['jobs']:,} jobs submitted, run and read "
                f"| {rss['before_mb']:.0f} / {rss['after_mb']:.0f} MB (+{rss['growth_mb']:.1f} MB) |"
            ]
            if (rss := results.get("rss"))
            else []
        ),
        *(
            [f"| jobs table after all of the above | {jobs_table_cell(table)} |"]
            if (table := results.get("jobs_table"))
            else []
        ),
        "",
    ]


def scale_section(results: dict[str, Any]) -> list[str]:
    from loadtest.bench_scale import report

    scans = results["seq_scans_on_jobs"]
    return [
        "## Hot paths against table size",
        "",
        "Method: `python -m loadtest.bench_scale` — fresh databases of 10k, 100k and 1M jobs in a realistic status mix",
        "(and 1M finished beside 10k ready), VACUUM ANALYZEd, all seeded before any timing; each operation through",
        "the repository functions the API and worker call, in a rolled-back transaction, timed on every size in five",
        "interleaved rounds (so the machine's slow spells fall on all sizes alike), median and p99; the last",
        "columns are growth ratios.",
        "",
        report(results["tables"]),
        "",
        "Sequential scans of jobs in the captured `EXPLAIN (ANALYZE, BUFFERS)` plans: "
        + (", ".join(scans) if scans else "none."),
        "",
    ]


def peers_section(results: dict[str, Any] | None) -> list[str]:
    if results is None:
        return ["## Peers", "", "Not measured: install the `peers` extra (`pip install -e '.[peers]'`).", ""]
    from loadtest.bench_peers import tables

    peers = results["peers"]
    return [
        "## Beside the peers",
        "",
        "Method: `python -m loadtest.bench_peers` — each queue on a fresh database of the same PostgreSQL (Celery on",
        "the local Redis), in rounds so machine noise hits all alike; enqueue one by one and in batches of 1000,",
        "drain of no-op jobs by one worker, enqueue → handler start on an idle worker. Ours runs through the",
        "functions the API calls (no HTTP), with resource accounting, DAG bookkeeping and job logs.",
        "",
        tables(list(peers), {name: peer["summary"] for name, peer in peers.items()}, results["jobs"], results["runs"]),
        "",
        *_peer_notes(peers),
    ]


def ceiling_section(ceilings: dict[str, Any], peers: dict[str, Any] | None) -> list[str]:
    from loadtest.bench_ceiling import table

    return [
        "## What the schema allows",
        "",
        "Method: `python -m loadtest.bench_ceiling` — the rows SPEC asks of every job (the job, its log rows,",
        "its job.updated notice; a drain round also the attempt rows and the node's use) written with as few",
        "statements as SQL allows, by pgbench (no Python client, no plan, no handler) on a fresh database of the",
        "service's own schema, indexes and triggers, over one connection, a LISTEN connection taking the notices;",
        f"median of {ceilings['runs']} runs of {ceilings['seconds']:g} s each, taken in turn. Ours and the fastest",
        "peer are the medians of the table above. Ours / schema is what our client costs (Python, and the checks,",
        "reads and positions this SQL leaves out); schema / fastest peer below 1× means that no client of this",
        "schema matches that peer on this machine.",
        "",
        table(ceilings["workloads"], peers["peers"] if peers else None),
        "",
        *_ablation_lines(ceilings),
    ]


def _ablation_lines(ceilings: dict[str, Any]) -> list[str]:
    """What parts of the schema cost: the same pgbench runs on the schema cut down."""
    from loadtest.bench_ceiling import ablation_table

    if not ceilings.get("ablations"):
        return []
    return [
        "What parts of the schema cost: the same workloads, in the same rounds, on the schema without the three",
        "indexes GET /jobs lists through (newest first, by status, by type), without the statement-level triggers",
        "that keep queue depths and positions (metrics, `position_in_queue`), without the job.updated notices",
        "(WebSocket stream, idle nodes' wake-up), and without all three; in brackets, the ratio to the schema as",
        "built. Each is a feature SPEC asks for; the table says what a design that served it otherwise could gain.",
        "",
        ablation_table(ceilings["workloads"], ceilings["ablations"]),
        "",
    ]


def _peer_notes(peers: dict[str, Any]) -> list[str]:
    """What the runs noted about a peer (a measure it does not offer, how it acknowledges)."""
    lines = [
        f"- {peer['name']}: {note}"
        for peer in peers.values()
        for note in dict.fromkeys(note for run in peer["runs"] for note in run["notes"])
    ]
    return [*lines, ""] if lines else []


def locust_section(results: dict[str, Any] | None) -> list[str]:
    if results is None:
        return ["## Load test (locust)", "", "Not run: install the `load` extra (`pip install -e '.[load]'`).", ""]
    from loadtest.bench_locust import report

    return [
        "## Load test (locust)",
        "",
        f"Method: `python -m loadtest.bench_locust --seconds {results['seconds']}` — `taskqueue serve` on a fresh",
        f"database, {results['users']} users of `loadtest/locustfile.py` (single and DAG-batch submitters, pollers,",
        "listers, cancellers) for the whole time; locust's own percentiles; the service's RSS sampled every 5 s.",
        "",
        report(results),
        "",
    ]


def agreement_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Does the simulator predict the service?",
        "",
        "Method: `python -m loadtest.bench_agreement` — `taskqueue serve` (one node, 8 CPU / 4096 MB) on a fresh",
        "database; every scenario file replayed against it in real time as `taskqueue replay` does (submissions at",
        "`submit_at` over HTTP, results read back from the API), time-scaled as shown, and compared with `simulate`",
        "on the same scaled file, simulated with the service's time per attempt beyond the handler as measured in",
        "the run (median extra hold plus median restart gap, from the job logs; shown per scenario). Pass: statuses",
        "equal, Kendall tau-b of start order ≥ 0.95, makespan within",
        "5% + 0.5 s. Dispatch latency: p95 live wait of jobs the simulator starts the instant they are ready;",
        "swapped pairs: pairs started the other way round live although the simulator put them further apart.",
        "",
        "| scenario | jobs | time scale | overhead per attempt | statuses | tau | swapped pairs | dispatch latency "
        "| makespan sim / live (allowed error) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["agreement"]:
        statuses = "equal" if row["statuses_equal"] else f"{row['status_mismatches']} differ"
        lines.append(
            f"| {row['scenario']} | {row['jobs']} | {row['time_scale']:g} | {1000 * row['attempt_overhead_s']:.1f} ms "
            f"| {statuses} | {row['tau']:.3f} "
            f"| {row['order_violations']:,} of {row['compared'] * (row['compared'] - 1) // 2:,} "
            f"| {1000 * row['dispatch_latency_s']:.0f} ms "
            f"| {row['makespan_sim_s']:.2f} / {row['makespan_live_s']:.2f} s (±{row['makespan_allowed_s']:.2f}) "
            f"| {'PASS' if row['passed'] else 'FAIL'} |"
        )
    differing = [
        f"{row['scenario']}: {m['job']} simulated {m['simulated']}, live {m['live']}"
        for row in results["agreement"]
        for m in row.get("status_mismatch_jobs", [])
    ]
    if differing:
        lines += ["", "Statuses that differ: " + "; ".join(differing) + "."]
    sweep = results["sweep"]
    priorities = ["critical", "high", "normal", "low"]
    lines += [
        "",
        "### Capacity planning: load_1000 over node capacity (simulator)",
        "",
        "Method: `simulate scenarios/load_1000.yaml --sweep capacity=...`; one simulated run per capacity;",
        "wait is ready → first start.",
        "",
        "| capacity | makespan | CPU util. | completed / failed / cancelled / refused | "
        + " | ".join(f"{p} wait p50 / p95" for p in priorities)
        + " |",
        "|---|---|---|---|" + "---|" * len(priorities),
    ]
    for point in sweep["points"]:
        waits = [point["waits"].get(p) for p in priorities]
        lines.append(
            f"| {point['capacity']} | {point['makespan_s']:.0f} s | {point['cpu_utilization']:.0%} "
            f"| {point['completed']} / {point['failed']} / {point['cancelled']} / {point['rejected']} | "
            + " | ".join(f"{w['p50_s']:.1f} / {w['p95_s']:.1f} s" if w else "-" for w in waits)
            + " |"
        )
    lines += ["", f"![capacity sweep]({sweep['chart']})", ""]
    return lines


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", default="100000", help="jobs in the generated simulator load")
    parser.add_argument("--peer-jobs", default="10000", help="no-op jobs per peer measure")
    parser.add_argument("--locust-seconds", default="300", help="length of the locust run")
    parser.add_argument("--output", type=Path, default=ROOT / "evaluation_results.md")
    args = parser.parse_args()
    lines = [
        "# Evaluation results",
        "",
        f"Generated by `python -m loadtest.evaluate` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Do not edit by hand.",
        "",
        f"Machine: {machine()}. Timings on a shared machine are noisy; compare figures from one run.",
        "Database for the service benchmark: `DATABASE_URL` if set, else an embedded PostgreSQL.",
        "",
        *scenarios_section(),
        *simulator_section(run_module("loadtest.bench_simulator", "--generated", args.generated)),
        *service_section(run_module("loadtest.bench_service")),
        *scale_section(run_module("loadtest.bench_scale", "--reps", "100")),
    ]
    peers = (
        run_module("loadtest.bench_peers", "--jobs", args.peer_jobs)
        if all(installed(m) for m in ("pgqueuer", "procrastinate", "celery"))
        else None
    )
    lines += [
        *peers_section(peers),
        *ceiling_section(run_module("loadtest.bench_ceiling"), peers),
        *agreement_section(run_module("loadtest.bench_agreement")),
        *locust_section(
            run_module("loadtest.bench_locust", "--seconds", args.locust_seconds) if installed("locust") else None
        ),
    ]
    args.output.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
