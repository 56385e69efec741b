"""Sim-to-real agreement and a capacity sweep (issue #8): `python -m loadtest.bench_agreement`.

Starts `taskqueue serve` (one node, 8 CPU / 4096 MB, the scenarios' capacity) on a
fresh database and replays every scenario file against it in real time, exactly as
`taskqueue replay` does: the small ones at half speed, `load_1000` (38 simulated
minutes) at `--load-scale` (0.1: under four minutes). Each live run is compared with `simulate` on the same
prepared file (with the service's measured time per attempt): statuses, start order
(Kendall tau-b), makespan error.

Then sweeps `load_1000` over node capacity in the simulator and writes the chart
(`--charts`). Prints a Markdown table; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from loadtest.bench_service import fresh_database, server_url, service
from queue_service.replay import client_for, prepare, replay
from simulator.scenario import load_scenario
from simulator.whatif import sweep, sweep_chart

ROOT = Path(__file__).resolve().parent.parent
SMALL_SCALE = 0.5
SWEEP_CAPACITIES = ["4/2048", "6/3072", "8/4096", "12/6144", "16/8192", "32/16384"]


async def replay_all(base: str, load_scale: float) -> list[dict[str, Any]]:
    rows = []
    async with client_for(base, None) as client:
        for path in sorted((ROOT / "scenarios").glob("*.yaml")):
            scale = load_scale if path.stem == "load_1000" else SMALL_SCALE
            scenario = prepare(load_scenario(path), time_scale=scale, prefix=f"{path.stem}-{time.time_ns()}.")
            started = time.monotonic()
            result = await replay(client, scenario, poll_interval=0.25)
            a = result.agreement
            rows.append(
                {
                    "scenario": a.scenario,
                    "jobs": a.jobs,
                    "time_scale": scale,
                    "wall_s": time.monotonic() - started,
                    "statuses_equal": a.statuses_equal,
                    "status_mismatches": len(a.status_mismatches),
                    "status_mismatch_jobs": [
                        {"job": job, "simulated": simulated, "live": live}
                        for job, simulated, live in a.status_mismatches
                    ],
                    "tau": a.tau,
                    "compared": a.compared,
                    "order_violations": len(a.order_violations),
                    "dispatch_latency_s": a.dispatch_latency,
                    "attempt_overhead_s": a.attempt_overhead,
                    "start_error_p95_s": a.start_error_p95,
                    "makespan_sim_s": a.makespan_sim,
                    "makespan_live_s": a.makespan_live,
                    "makespan_error_s": a.makespan_error,
                    "makespan_allowed_s": a.makespan_allowed,
                    "passed": a.passed,
                }
            )
            print(f"  {a.scenario}: {'PASS' if a.passed else 'FAIL'} tau {a.tau:.3f}", flush=True)
    return rows


def capacity_sweep(charts: Path) -> dict[str, Any]:
    scenario = load_scenario(ROOT / "scenarios" / "load_1000.yaml")
    points = sweep(scenario, "capacity", SWEEP_CAPACITIES)
    chart = sweep_chart(scenario.name, "capacity", points, charts / "load_1000.capacity_sweep.png")
    return {
        "chart": str(chart.relative_to(ROOT)) if chart.is_relative_to(ROOT) else str(chart),
        "points": [
            {
                "capacity": p.value,
                "makespan_s": p.makespan,
                "cpu_utilization": p.cpu_utilization,
                "memory_utilization": p.memory_utilization,
                "completed": p.completed,
                "failed": p.failed,
                "cancelled": p.cancelled,
                "rejected": p.rejected,
                "waits": {priority.value: {"p50_s": w[1], "p95_s": w[2]} for priority, w in p.waits.items()},
            }
            for p in points
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-scale", type=float, default=0.1, help="time scale of load_1000's replay")
    parser.add_argument("--charts", type=Path, default=ROOT / "docs" / "charts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with server_url() as server, fresh_database(server) as database, service(database) as running:
        agreement = asyncio.run(replay_all(running.base, args.load_scale))
    results = {"agreement": agreement, "sweep": capacity_sweep(args.charts)}
    print("| scenario | jobs | time scale | statuses | tau | makespan sim / live | verdict |")
    print("|---|---|---|---|---|---|---|")
    for row in agreement:
        print(
            f"| {row['scenario']} | {row['jobs']} | {row['time_scale']:g} | "
            f"{'equal' if row['statuses_equal'] else 'differ'} | {row['tau']:.3f} | "
            f"{row['makespan_sim_s']:.2f} / {row['makespan_live_s']:.2f} s | {'PASS' if row['passed'] else 'FAIL'} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
