"""Simulator and policy speed (a benchmark, not a test): `python -m loadtest.bench_simulator`.

Measures, in one run on one machine:
- load_1000.yaml: parse + simulate + checks, best of several runs;
- a generated 100,000-job load, once;
- plan() per call, with the top-K window read from a sorted ready queue, at
  1k … 1M ready jobs: the time must stay flat because plan() sees only K.
Prints a Markdown table; `--json FILE` also writes the numbers for reports.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from sortedcontainers import SortedKeyList

from queue_service.core.model import Priority, Resources
from queue_service.core.policy import Candidate, PolicyConfig, RunningJob, plan, sort_key
from simulator.runner import run_scenario
from simulator.scenario import load_scenario, parse_scenario
from simulator.workload import generate

ROOT = Path(__file__).resolve().parent.parent
CAPACITY = Resources(8, 4096)


def time_load_1000(repeats: int) -> dict[str, Any]:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run = run_scenario(load_scenario(ROOT / "scenarios" / "load_1000.yaml"))
        timings.append(time.perf_counter() - started)
    return {"best_s": min(timings), "median_s": statistics.median(timings), "passed": run.passed}


def time_generated(size: int, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    scenario = parse_scenario(generate(size, seed), f"generated_{size}")
    built = time.perf_counter()
    run = run_scenario(scenario)
    done = time.perf_counter()
    return {
        "jobs": size,
        "generate_s": built - started,
        "simulate_s": done - built,
        "total_s": done - started,
        "passed": run.passed,
        "plan_calls": run.metrics.plan_calls,
    }


def _ready_queue(size: int, rng: random.Random, policy: PolicyConfig) -> SortedKeyList:
    queue = SortedKeyList(key=lambda cand: (cand.sort_key, cand.job_id))
    priorities = list(Priority)
    queue.update(
        Candidate(
            f"job_{i:08d}",
            sort_key(rng.uniform(0, 86_400), rng.choice(priorities), policy),
            Resources(rng.choice((1, 2, 4, 6)), rng.choice((128, 512, 1024, 2048, 3072))),
            rng.uniform(1, 600),
        )
        for i in range(size)
    )
    return queue


def time_plan(sizes: list[int], calls: int) -> list[dict[str, Any]]:
    """Per-call time of reading the window and planning, in the worst case: the node
    has 1 CPU / 96 MB free, so no candidate fits and plan() scans the whole window
    looking for backfill after reserving for the head."""
    policy = PolicyConfig()
    rows = []
    for size in sizes:
        rng = random.Random(size)
        queue = _ready_queue(size, rng, policy)
        running = [RunningJob(f"run_{i}", Resources(1, 571), 100.0 + i) for i in range(7)]
        timings = []
        for call in range(calls):
            started = time.perf_counter()
            window = list(queue.islice(0, policy.candidate_window))
            plan(float(call), window, running, CAPACITY, policy)
            timings.append(time.perf_counter() - started)
        rows.append({"ready_jobs": size, "median_us": statistics.median(timings) * 1e6})
    base = rows[0]["median_us"]
    for row in rows:
        row["ratio_to_smallest"] = row["median_us"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=int, default=100_000, help="jobs in the generated load")
    parser.add_argument("--max-ready", type=int, default=1_000_000, help="largest ready queue for plan()")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    sizes = [n for n in (1_000, 10_000, 100_000, 1_000_000) if n <= args.max_ready]
    results: dict[str, Any] = {
        "load_1000": time_load_1000(repeats=5),
        "generated": time_generated(args.generated, seed=7),
        "plan": time_plan(sizes, calls=2_000),
    }
    load, gen = results["load_1000"], results["generated"]
    print("| measure | value |\n|---|---|")
    print(f"| load_1000 parse + simulate + checks (best of 5) | {load['best_s']:.3f} s |")
    generated = f"{gen['generate_s']:.1f} s / {gen['simulate_s']:.1f} s"
    print(f"| generated {gen['jobs']:,} jobs: generate / simulate | {generated} |")
    for row in results["plan"]:
        print(
            f"| plan() per call, {row['ready_jobs']:,} ready | {row['median_us']:.0f} µs "
            f"({row['ratio_to_smallest']:.2f}× the 1k time) |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
