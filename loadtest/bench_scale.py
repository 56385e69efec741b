"""Hot-path costs against the size of the jobs table: `python -m loadtest.bench_scale`.

    python -m loadtest.bench_scale [--json FILE] [--max-rows N] [--explain FILE] [--reps 200] [--rounds 5]

For each table size (10k, 100k and 1M jobs in the status mix of
tests/conftest.py's SEED_JOBS_SQL — 60% completed, 15% ready, 5% blocked, …;
then 1M finished jobs beside 10k ready ones), on a fresh database of the server
at `DATABASE_URL` (default postgresql://postgres@127.0.0.1:5432/postgres), filled
with one generate_series INSERT and VACUUM ANALYZEd, it times, through the
repository functions the API and worker call, each inside a transaction that is
rolled back (so every repetition sees the same rows; commit cost excluded):

- claim window: the worker's candidate SELECT (K=256, FOR UPDATE SKIP LOCKED);
- claim: `attempts.claim_round` in full (window, `core.plan()`, starts, logs);
- get: `jobs.get_job` of a completed job;
- position front / back: `jobs.get_job` of the first / last ready job in queue order
  (the public read that computes `position_in_queue`);
- list ready / list completed: `jobs.list_jobs` first page of 50 with a status filter;
- complete with dependants: `attempts.end_attempts` succeeding a running job
  with 10 blocked dependants (they become ready).

All the databases are seeded first and each operation is then timed on all of
them in interleaved rounds (`--rounds`), so the machine's slow spells fall on
every size alike. It prints median and p99 per size and the growth ratio (largest / 10k), writes
`EXPLAIN (ANALYZE, BUFFERS)` of every statement each operation issued at each
size to `--explain` (default out/scale_explain.txt), and reports any
`Seq Scan on jobs` in them (a report, never a crash).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from loadtest.databases import fresh_database, server_url
from queue_service.api.submission import parse_one
from queue_service.core.model import AttemptOutcome
from queue_service.db import attempts, jobs, migrate
from queue_service.db.attempts import AttemptEnd, Ending
from queue_service.db.engine import autocommit, create_engine
from queue_service.settings import Settings

NODE: Final = "bench-node"
DEPENDANTS: Final = 10
WARMUP: Final = 3
TIME_BUDGET_SECONDS: Final = 10.0  # per operation and size: fewer repetitions for slow operations
SEQ_SCAN_ON_JOBS: Final = re.compile(r"Seq Scan on jobs\b")

# The shape of tests/conftest.py's SEED_JOBS_SQL (every row satisfies the jobs CHECKs),
# with the status mix as a parameter.
MIXED: Final = """CASE
        WHEN i % 100 < 60 THEN 'completed' WHEN i % 100 < 75 THEN 'ready' WHEN i % 100 < 80 THEN 'blocked'
        WHEN i % 100 < 83 THEN 'running' WHEN i % 100 < 86 THEN 'retrying' WHEN i % 100 < 95 THEN 'failed'
        ELSE 'cancelled' END"""
FINISHED: Final = "CASE WHEN i % 100 < 90 THEN 'completed' WHEN i % 100 < 95 THEN 'failed' ELSE 'cancelled' END"
READY: Final = "'ready'"
SEED_SQL: Final = """
INSERT INTO jobs (
    job_id, type, priority, status, cpu_units, memory_mb, max_attempts, backoff_multiplier,
    initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, request_hash, attempts,
    attempt_budget, unfinished_deps, created_at, updated_at, ready_at, sort_key, started_at,
    finished_at, next_attempt_at, lease_token, lease_expires_at, worker_id, failure_reason, cancel_reason
)
SELECT
    'job_' || i, 'type_' || (i % 8), (ARRAY['critical', 'high', 'normal', 'low'])[1 + i % 4], s.status,
    1 + i % 4, 128 * (1 + i % 8), 3, 2.0, 1.0, 300.0, 0.0, 300.0, md5(i::text),
    CASE WHEN s.status IN ('blocked', 'ready') THEN 0 ELSE 1 END,
    3, CASE WHEN s.status = 'blocked' THEN 1 ELSE 0 END,
    t.created, t.created,
    CASE WHEN s.status <> 'blocked' THEN t.created END,
    CASE WHEN s.status <> 'blocked' THEN extract(epoch FROM t.created) - 3600 * (3 - i % 4) END,
    CASE WHEN s.status NOT IN ('blocked', 'ready') THEN t.created END,
    CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN t.created END,
    CASE WHEN s.status = 'retrying' THEN now() + make_interval(secs => i % 600 - 300) END,
    CASE WHEN s.status = 'running' THEN gen_random_uuid() END,
    CASE WHEN s.status = 'running' THEN now() + make_interval(secs => i % 60 - 30) END,
    CASE WHEN s.status NOT IN ('blocked', 'ready') THEN 'node-' || (i % 3) END,
    CASE WHEN s.status = 'failed' THEN 'max_attempts_exhausted' END,
    CASE WHEN s.status = 'cancelled' THEN 'user' END
FROM generate_series(CAST(:first AS integer), CAST(:first AS integer) + CAST(:count AS integer) - 1) AS i
CROSS JOIN LATERAL (SELECT {status} AS status) AS s
CROSS JOIN LATERAL (SELECT timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => i) AS created) AS t
"""
CLAIM_WINDOW_SQL: Final = (
    "SELECT job_id, sort_key, cpu_units, memory_mb, timeout_seconds FROM jobs WHERE status = 'ready' "
    "ORDER BY sort_key, job_id LIMIT :window FOR UPDATE SKIP LOCKED"
)


@dataclass(frozen=True)
class Table:
    """One table to measure: its label and (row count, status mix) segments."""

    label: str
    segments: tuple[tuple[int, str], ...]

    @property
    def rows(self) -> int:
        return sum(count for count, _ in self.segments)


TABLES: Final = (
    Table("10k", ((10_000, MIXED),)),
    Table("100k", ((100_000, MIXED),)),
    Table("1M", ((1_000_000, MIXED),)),
    Table("1M finished + 10k ready", ((1_000_000, FINISHED), (10_000, READY))),
)


@dataclass
class Capture:
    """Statements the engine sends while `on` is set, for EXPLAIN afterwards."""

    on: bool = False
    statements: list[tuple[str, Any]] = field(default_factory=list)

    def __call__(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if self.on:
            self.statements.append((statement, parameters[0] if many and parameters else parameters))

    @contextmanager
    def recording(self) -> Iterator[list[tuple[str, Any]]]:
        self.statements = []
        self.on = True
        try:
            yield self.statements
        finally:
            self.on = False


Operation = Callable[[AsyncConnection], Awaitable[object]]


@dataclass(frozen=True)
class Fixture:
    """Ids the operations work on, found or made after seeding."""

    completed: str
    front: str
    back: str
    parent: str
    lease: uuid.UUID


async def seed(engine: AsyncEngine, table: Table) -> None:
    first = 1
    async with engine.begin() as conn:
        for count, status in table.segments:
            await conn.execute(sa.text(SEED_SQL.format(status=status)), {"first": first, "count": count})
            first += count
        # As the leader's periodic fold would have by now: one position-bucket row per bucket.
        await conn.execute(sa.text("SELECT queue_rank_compact()"))
    async with autocommit(engine) as conn:
        await conn.execute(sa.text("VACUUM ANALYZE"))


async def prepare(engine: AsyncEngine, settings: Settings) -> Fixture:
    """A live node, and a running parent with blocked dependants, submitted the API's way."""
    now = datetime.now(UTC)
    parent = f"bench_parent_{uuid.uuid4().hex[:8]}"
    documents = [{"job_id": parent, "type": "noop"}] + [
        {"job_id": f"{parent}_child_{n}", "type": "noop", "depends_on": [parent]} for n in range(DEPENDANTS)
    ]
    pairs = [parse_one(document) for document in documents]
    lease = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, cpu_used, memory_used, status) "
                "VALUES (:node, 8, 4096, 1, 128, 'active')"
            ),
            {"node": NODE},
        )
        await jobs.submit(
            conn,
            [s for s, _ in pairs],
            [h for _, h in pairs],
            now,
            settings.policy_config(),
            [settings.node_capacity()],
        )
        # Started as attempts._start would: the parent leaves the queue for this node.
        await conn.execute(
            sa.text(
                "UPDATE jobs SET status = 'running', attempts = 1, started_at = :now, worker_id = :node, "
                "lease_token = :lease, lease_expires_at = :until WHERE job_id = :id"
            ),
            {"now": now, "until": now + timedelta(hours=1), "node": NODE, "lease": lease, "id": parent},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token) "
                "VALUES (:id, 1, :node, :now, :lease)"
            ),
            {"id": parent, "node": NODE, "now": now, "lease": lease},
        )
        completed = (
            await conn.execute(sa.text("SELECT job_id FROM jobs WHERE status = 'completed' ORDER BY job_id LIMIT 1"))
        ).scalar_one()
        order = "FROM jobs WHERE status = 'ready' ORDER BY sort_key {0}, job_id {0} LIMIT 1"
        front = (await conn.execute(sa.text("SELECT job_id " + order.format("ASC")))).scalar_one()
        back = (await conn.execute(sa.text("SELECT job_id " + order.format("DESC")))).scalar_one()
    async with autocommit(engine) as conn:
        await conn.execute(sa.text("ANALYZE"))
    return Fixture(completed, front, back, parent, lease)


def operations(fixture: Fixture, settings: Settings) -> dict[str, Operation]:
    policy = settings.policy_config()

    def now() -> datetime:
        return datetime.now(UTC)

    async def claim_window(conn: AsyncConnection) -> object:
        return (await conn.execute(sa.text(CLAIM_WINDOW_SQL), {"window": policy.candidate_window})).all()

    async def claim(conn: AsyncConnection) -> object:
        return (await attempts.claim_round(conn, NODE, now, policy, settings.lease_seconds)).claims

    async def complete(conn: AsyncConnection) -> object:
        ending = Ending(fixture.parent, fixture.lease, AttemptEnd(AttemptOutcome.SUCCEEDED, result=None))
        [owned] = await attempts.end_attempts(conn, [ending], now(), policy)
        if not owned:
            raise RuntimeError("the benchmark's parent job was not running")
        return owned

    return {
        "claim window (K=256)": claim_window,
        "claim (full, plan + start)": claim,
        "get job (completed)": lambda conn: jobs.get_job(conn, fixture.completed),
        "position, front of queue": lambda conn: jobs.get_job(conn, fixture.front),
        "position, back of queue": lambda conn: jobs.get_job(conn, fixture.back),
        "list ready, first page": lambda conn: jobs.list_jobs(conn, jobs.JobListing(50, statuses=["ready"])),
        "list completed, first page": lambda conn: jobs.list_jobs(conn, jobs.JobListing(50, statuses=["completed"])),
        "complete with 10 dependants": complete,
    }


async def time_once(engine: AsyncEngine, operation: Operation) -> float:
    async with engine.connect() as conn:
        transaction = await conn.begin()
        try:
            started = time.perf_counter()
            await operation(conn)
            return (time.perf_counter() - started) * 1000
        finally:
            await transaction.rollback()


async def explain(engine: AsyncEngine, statements: list[tuple[str, Any]]) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of each statement, in order, in one rolled-back transaction
    (so a statement sees what the ones before it changed, as it did when it ran)."""
    plans: list[str] = []
    async with engine.connect() as conn:
        transaction = await conn.begin()
        try:
            for statement, parameters in statements:
                if not statement.lstrip().upper().startswith(("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")):
                    continue
                rows = await conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
                plans.append(" ".join(statement.split()) + "\n" + "\n".join(row[0] for row in rows))
        finally:
            await transaction.rollback()
    return plans


def quantiles(timings: list[float]) -> dict[str, float]:
    ordered = sorted(timings)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * len(ordered)) - 1)]
    return {"median_ms": statistics.median(ordered), "p99_ms": p99, "samples": len(ordered)}


@dataclass
class Subject:
    """One seeded database under measurement, and the samples taken on it so far."""

    table: Table
    engine: AsyncEngine
    capture: Capture
    operations: dict[str, Operation]
    timings: dict[str, list[float]] = field(default_factory=dict)


async def open_subject(stack: AsyncExitStack, table: Table) -> Subject:
    url = await stack.enter_async_context(fresh_database(server_url(), "tq_scale"))
    await migrate.upgrade(url)
    settings = Settings(database_url=url, db_command_timeout_seconds=None)  # seeding 1M rows is one long statement
    engine = create_engine(settings, application_name="bench-scale")
    stack.push_async_callback(engine.dispose)
    capture = Capture()
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    started = time.perf_counter()
    await seed(engine, table)
    fixture = await prepare(engine, settings)
    print(f"  {table.label}: seeded {table.rows:,} rows in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return Subject(table, engine, capture, operations(fixture, settings))


async def measure(tables: list[Table], reps: int, rounds: int, explain_out: list[str]) -> dict[str, Any]:
    """Every table's database is seeded first, then each operation is timed on all of
    them in `rounds` interleaved rounds (the order reversed every other round), so a
    slow spell of this shared machine lands on every size alike instead of on
    whichever size happened to be measured during it."""
    async with AsyncExitStack() as stack:
        subjects = [await open_subject(stack, table) for table in tables]
        names = list(subjects[0].operations)
        per_round = max(1, -(-reps // rounds))
        for name in names:
            for subject in subjects:
                subject.timings[name] = []
                for _ in range(WARMUP):
                    await time_once(subject.engine, subject.operations[name])
            for round_number in range(rounds):
                for subject in subjects if round_number % 2 == 0 else reversed(subjects):
                    timings = subject.timings[name]
                    deadline = time.monotonic() + TIME_BUDGET_SECONDS / rounds
                    taken = 0
                    while taken < per_round and len(timings) < reps and (taken < 2 or time.monotonic() < deadline):
                        timings.append(await time_once(subject.engine, subject.operations[name]))
                        taken += 1
        for subject in subjects:
            for name, operation in subject.operations.items():
                with subject.capture.recording() as statements:
                    await time_once(subject.engine, operation)
                for plan in await explain(subject.engine, statements):
                    explain_out.append(f"=== {subject.table.label} · {name}\n{plan}\n")
        return {
            subject.table.label: {name: quantiles(timings) for name, timings in subject.timings.items()}
            for subject in subjects
        }


def seq_scans(explain_text: str) -> list[str]:
    """The headers (`=== size · operation`) of plans that read the jobs table sequentially."""
    found: list[str] = []
    for block in explain_text.split("=== ")[1:]:
        if SEQ_SCAN_ON_JOBS.search(block):
            found.append(block.splitlines()[0])
    return found


def report(results: dict[str, dict[str, dict[str, float]]]) -> str:
    labels = list(results)
    names = list(next(iter(results.values())))
    base, top = labels[0], [label for label in labels if label.startswith("1M")] or labels[-1:]
    lines = [
        "| operation | " + " | ".join(f"{label} median / p99" for label in labels) + " | "
        + " | ".join(f"{label} / {base}" for label in top) + " |",
        "|---|" + "---|" * (len(labels) + len(top)),
    ]  # fmt: skip
    for name in names:
        cells = [
            f"{results[label][name]['median_ms']:.2f} / {results[label][name]['p99_ms']:.2f} ms" for label in labels
        ]
        ratios = [f"{results[label][name]['median_ms'] / results[base][name]['median_ms']:.2f}×" for label in top]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--max-rows", type=int, default=1_010_000, help="skip tables larger than this")
    parser.add_argument("--reps", type=int, default=200, help="repetitions per operation (time-capped)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the table sizes")
    parser.add_argument("--explain", type=Path, default=Path("out/scale_explain.txt"), help="EXPLAIN output file")
    args = parser.parse_args()
    explain_out: list[str] = []
    tables = [table for table in TABLES if table.rows <= args.max_rows]
    if not tables:
        parser.error("--max-rows leaves no table to measure")
    results = asyncio.run(measure(tables, args.reps, args.rounds, explain_out))
    text = "\n".join(explain_out)
    args.explain.parent.mkdir(parents=True, exist_ok=True)
    args.explain.write_text(text, encoding="utf-8")
    scans = seq_scans(text)
    print(report(results))
    print(f"\nEXPLAIN (ANALYZE, BUFFERS) plans: {args.explain}")
    if scans:
        print("\n`Seq Scan on jobs` found in:\n" + "\n".join(f"- {header}" for header in scans))
    else:
        print("\nNo `Seq Scan on jobs` in any captured plan.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"tables": results, "seq_scans_on_jobs": scans, "explain_file": str(args.explain)}
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
