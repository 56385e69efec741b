"""Seeded workload generator: mixed types, priorities, resources, dependencies,
failures and cancels, reproducible from (size, seed). Produces scenario data, so
a generated load can be written to YAML, simulated, or submitted to the service."""

from __future__ import annotations

import random
from typing import Any

# (type, cpu, memory MB, mean seconds, weight): the kinds of work a fintech platform runs.
JOB_KINDS = (
    ("send_email", 1, 128, 0.5, 30),
    ("send_notifications", 1, 256, 0.8, 15),
    ("fetch_prices", 1, 512, 2.0, 15),
    ("generate_report", 2, 1024, 6.0, 15),
    ("data_export", 4, 2048, 12.0, 10),
    ("risk_model", 6, 3072, 20.0, 5),
)
PRIORITY_WEIGHTS = (("critical", 5), ("high", 20), ("normal", 55), ("low", 20))
DEPENDENCY_SHARE = 0.25  # of jobs depend on 1-3 recent earlier jobs
FAILURE_SHARE = 0.06  # fail their first attempt or two
TIMEOUT_SHARE = 0.02  # overrun their timeout once
PERMANENT_SHARE = 0.01
CANCEL_SHARE = 0.01
TARGET_LOAD = 0.9  # arrival rate keeps the node about this busy on CPU


def generate(size: int, seed: int, *, cpu_units: int = 8, memory_mb: int = 4096) -> dict[str, Any]:
    """Scenario data for `size` jobs; the same (size, seed) always gives the same data."""
    rng = random.Random(seed)
    kinds = [kind for kind in JOB_KINDS if kind[1] <= cpu_units and kind[2] <= memory_mb]
    weights = [kind[4] for kind in kinds]
    mean_cpu_seconds = sum(k[1] * k[3] * k[4] for k in kinds) / sum(weights)
    arrival_rate = TARGET_LOAD * cpu_units / mean_cpu_seconds  # jobs per second
    clock = 0.0
    jobs: list[dict[str, Any]] = []
    for index in range(size):
        job_type, cpu, memory, mean_seconds, _ = rng.choices(kinds, weights)[0]
        clock += rng.expovariate(arrival_rate)
        duration = round(rng.uniform(0.5, 1.5) * mean_seconds, 3)
        job_id = f"load_{index:06d}"
        simulate: dict[str, Any] = {"duration_seconds": duration}
        roll = rng.random()
        if roll < FAILURE_SHARE:
            simulate["fail_attempts"] = rng.choice((1, 2))
        elif roll < FAILURE_SHARE + TIMEOUT_SHARE:
            simulate["timeout_attempts"] = 1
        elif roll < FAILURE_SHARE + TIMEOUT_SHARE + PERMANENT_SHARE:
            simulate["permanent_failure"] = True
        job: dict[str, Any] = {
            "job_id": job_id,
            "type": job_type,
            "priority": rng.choices([p for p, _ in PRIORITY_WEIGHTS], [w for _, w in PRIORITY_WEIGHTS])[0],
            "resource_requirements": {"cpu_units": cpu, "memory_mb": memory},
            "timeout_seconds": round(duration * 2 + 1, 3),
            "retry_config": {"max_attempts": 3, "initial_delay_seconds": 1.0, "backoff_multiplier": 2.0},
            "submit_at": round(clock, 3),
            "simulate": simulate,
        }
        if index > 0 and rng.random() < DEPENDENCY_SHARE:
            recent = range(max(0, index - 50), index)
            picks = rng.sample(recent, k=min(len(recent), rng.choice((1, 1, 2, 3))))
            job["depends_on"] = [f"load_{i:06d}" for i in sorted(picks)]
        if rng.random() < CANCEL_SHARE:
            job["cancel_at"] = round(clock + rng.uniform(0, 30), 3)
        jobs.append(job)
    return {
        "name": f"load_{size}",
        "description": f"{size} generated jobs (seed {seed}): mixed types, priorities, resources, "
        "dependencies, failures, timeouts and cancels at ~90% CPU load.",
        "capacity": {"cpu_units": cpu_units, "memory_mb": memory_mb},
        "jobs": jobs,
        "expect": {"min_backfills": 1},
    }
