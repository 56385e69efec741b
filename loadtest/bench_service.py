"""Live service throughput (a benchmark, not a test): `python -m loadtest.bench_service`.

Starts `taskqueue serve` as a process on a fresh database and measures, in one run:
- 1000 jobs accepted one POST at a time by one client, by 16 concurrent clients,
  and as one POST /jobs/batch (dispatch paused, so only the API is measured), each
  in three rounds taken in turn, the median round reported as time and rate;
- 3000 no-op jobs drained by one node (jobs/s from resume to the last completion), and
  the 9000 the POST measures left waiting by two (a `taskqueue worker` process joins
  the service's own node), after the reads;
- GET /jobs/{id} latency p50/p99 over 2000 requests;
- the service process's RSS before and after 100,000 jobs submitted, run and read
  (`--rss-jobs`), and what those runs left in the jobs table: dead row versions, the
  VACUUMs that reclaimed them, its size.
The database is `DATABASE_URL` (a server's maintenance database) or an embedded one.
The client is aiohttp: it shares the machine's cores with the service and the database,
and httpx spent 1.7 times the service's own CPU time per request (measured with top
beside 16 clients' POSTs), so it, not the service, set the pace.
Prints a Markdown table; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
from sqlalchemy.engine import make_url

from loadtest.databases import admin_execute
from queue_service.db.embedded import embedded_postgres
from queue_service.db.engine import asyncpg_dsn
from queue_service.settings import render_url

TASKQUEUE = str(Path(sys.executable).parent / "taskqueue")
ACCEPT_ROUNDS = 3  # rounds of each way of accepting 1000 jobs; the median counts
ACCEPT_LABELS = {
    "sequential": "1000 POST /jobs, one client",
    "16_clients": "1000 POST /jobs, 16 concurrent clients",
    "batch": "1000 jobs in one POST /jobs/batch",
}


@contextmanager
def server_url() -> Iterator[str]:
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="tq-bench-") as folder, embedded_postgres(folder) as server:
        yield server.url


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    name = f"tq_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin_execute(url, f'CREATE DATABASE "{name}"'))
    try:
        yield render_url(make_url(url).set(database=name))
    finally:
        asyncio.run(admin_execute(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass(frozen=True)
class Service:
    base: str
    pid: int


LOG_TAIL_LINES = 40


@contextmanager
def taskqueue(database_url: str, *arguments: str) -> Iterator[int]:
    """A `taskqueue` command as a process on `database_url`, ended by SIGTERM; yields its pid.

    Its log goes to a temporary file, whose last lines are printed if the benchmark
    fails while the process runs: a failed request then comes with the service's side."""
    env = {**os.environ, "DATABASE_URL": database_url, "TASKQUEUE_POLL_INTERVAL_SECONDS": "0.5"}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([TASKQUEUE, *arguments], env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield process.pid
        except BaseException:
            exited = process.poll()
            log.seek(0)
            tail = log.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            state = "still running" if exited is None else f"exited with status {exited}"
            command = " ".join(["taskqueue", *arguments[:1]])
            print(f"{command} ({state}), the last lines of its log:", file=sys.stderr)
            print("\n".join(tail) or "(empty)", file=sys.stderr, flush=True)
            raise
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


class Client:
    """The service's JSON API over one aiohttp session: a failed request raises."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def post(self, path: str, body: Any = None) -> Any:
        async with self.session.post(path, json=body) as response:
            response.raise_for_status()
            return await response.json()

    async def get(self, path: str, params: list[tuple[str, str]] | None = None) -> Any:
        async with self.session.get(path, params=params) as response:
            response.raise_for_status()
            return await response.json()


@contextmanager
def service(database_url: str) -> Iterator[Service]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with taskqueue(database_url, "serve", "--port", str(port), "--node-id", "bench-node") as pid:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield Service(base, pid)


async def active_nodes(client: Client, count: int, timeout: float = 60) -> None:
    """Wait until `count` nodes are registered and active."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = (await client.get("/admin/api/overview"))["nodes"]
        if sum(1 for node in nodes if node["status"] == "active") >= count:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"fewer than {count} active nodes after {timeout} s")


def job(prefix: str, index: int, job_type: str = "noop") -> dict[str, Any]:
    return {"job_id": f"{prefix}_{index:05d}", "type": job_type, "payload": {"simulate": {"duration_seconds": 0}}}


async def one_at_a_time(client: Client, prefix: str, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        await client.post("/jobs", job(prefix, i))
    return count / (time.perf_counter() - started)


async def concurrent(client: Client, prefix: str, count: int, clients: int) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            await client.post("/jobs", job(prefix, queue.get_nowait()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return count / (time.perf_counter() - started)


async def one_batch(client: Client, prefix: str, count: int) -> float:
    started = time.perf_counter()
    await client.post("/jobs/batch", [job(prefix, i) for i in range(count)])
    return count / (time.perf_counter() - started)


async def drain(client: Client, count: int) -> float:
    """Submit `count` no-op jobs while paused, resume, and time until none is left waiting."""
    for start in range(0, count, 500):
        batch = [job("drain", i) for i in range(start, min(count, start + 500))]
        await client.post("/jobs/batch", batch)
    return await drain_waiting(client, count)


async def drain_waiting(client: Client, count: int) -> float:
    """Resume, and time until none of the `count` waiting jobs is left."""
    started = time.perf_counter()
    await client.post("/dispatch/resume")
    while True:
        waiting = await client.get("/jobs", _status_filter("ready", "running", "retrying"))
        if not waiting["items"]:
            return count / (time.perf_counter() - started)
        await asyncio.sleep(0.02)


async def read_latency(client: Client, requests: int) -> tuple[float, float]:
    timings = []
    for i in range(requests):
        started = time.perf_counter()
        await client.get(f"/jobs/drain_{i % 3000:05d}")
        timings.append(time.perf_counter() - started)
    quantiles = statistics.quantiles(timings, n=100)
    return quantiles[49] * 1000, quantiles[98] * 1000


async def memory_growth(client: Client, pid: int, count: int) -> dict[str, float]:
    """RSS of the service process before and after `count` jobs are submitted (batches of
    1000), run by its node and read back once each (a GET per job)."""
    await client.post("/dispatch/resume")
    before = rss_mb(pid)
    for start in range(0, count, 1000):
        batch = [job("rss", i) for i in range(start, min(count, start + 1000))]
        await client.post("/jobs/batch", batch)
    while (await client.get("/jobs", _status_filter("ready", "running")))["items"]:
        await asyncio.sleep(0.5)
    for i in range(0, count, max(1, count // 2000)):  # a sample of reads, spread over all of them
        await client.get(f"/jobs/rss_{i:05d}")
    after = rss_mb(pid)
    return {"jobs": count, "before_mb": before, "after_mb": after, "growth_mb": after - before}


async def jobs_table(database_url: str) -> dict[str, float]:
    """The jobs table as running jobs left it: live and dead row versions, the VACUUMs
    that reclaimed dead ones (the leader's and autovacuum's), its size with its indexes
    and the ready-queue index's, which claims walk from its head."""
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        row = await connection.fetchrow(
            """
            SELECT n_live_tup AS live_rows, n_dead_tup AS dead_rows, vacuum_count AS vacuums,
                   autovacuum_count AS autovacuums, pg_total_relation_size('jobs') / 1048576.0 AS total_mb,
                   pg_relation_size('ix_jobs_ready_queue') / 1048576.0 AS ready_index_mb
            FROM pg_stat_user_tables WHERE schemaname = current_schema() AND relname = 'jobs'
            """
        )
    finally:
        await connection.close()
    assert row is not None, "no statistics for the jobs table"
    return {key: float(value) for key, value in row.items()}


def jobs_table_cell(table: dict[str, float]) -> str:
    """What `jobs_table` found, as a table cell (this benchmark's table and the evaluation's)."""
    return (
        f"{table['live_rows']:,.0f} live rows, {table['dead_rows']:,.0f} dead row versions "
        f"({table['vacuums']:.0f} VACUUMs by the leader, {table['autovacuums']:.0f} by autovacuum); "
        f"{table['total_mb']:.0f} MB with its indexes, the ready-queue index {table['ready_index_mb']:.1f} MB"
    )


def _status_filter(*statuses: str) -> list[tuple[str, str]]:
    """The query of a one-item page of jobs in any of `statuses`: is any left?"""
    return [*(("status", status) for status in statuses), ("limit", "1")]


async def measure(base: str, pid: int, database_url: str, rss_jobs: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=32)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        client = Client(session)
        await client.post("/dispatch/pause")
        drained = await drain(client, 3000)
        await client.post("/dispatch/pause")  # the API alone, until the two-node drain
        # Each way of accepting 1000 jobs is timed in ACCEPT_ROUNDS rounds, taken in turn so a
        # slow spell of the machine does not fall on one of them only; the median round counts.
        rates: dict[str, list[float]] = {way: [] for way in ACCEPT_LABELS}
        for round_number in range(ACCEPT_ROUNDS):
            rates["sequential"].append(await one_at_a_time(client, f"seq{round_number}", 1000))
            rates["16_clients"].append(await concurrent(client, f"conc{round_number}", 1000, 16))
            rates["batch"].append(await one_batch(client, f"batch{round_number}", 1000))
        results: dict[str, Any] = {
            "drain_jobs_per_s": drained,
            **{f"post_{way}_jobs_per_s": statistics.median(runs) for way, runs in rates.items()},
            "post_rounds": rates,
            "get_job_ms": dict(zip(("p50", "p99"), await read_latency(client, 2000), strict=True)),
        }
        # A second node of the same default size, for the jobs the POST measures left waiting.
        with taskqueue(database_url, "worker", "--node-id", "bench-node-2"):
            await active_nodes(client, 2)
            waiting = len(ACCEPT_LABELS) * 1000 * ACCEPT_ROUNDS
            results["drain_two_nodes_jobs_per_s"] = await drain_waiting(client, waiting)
        rss = await memory_growth(client, pid, rss_jobs) if rss_jobs else None
        return {**results, "rss": rss, "jobs_table": await jobs_table(database_url)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rss-jobs", type=int, default=100_000, help="jobs run for the memory measure (0: skip)")
    args = parser.parse_args()
    with server_url() as url, fresh_database(url) as database, service(database) as running:
        results = asyncio.run(measure(running.base, running.pid, database, args.rss_jobs))
    print("| measure | value |\n|---|---|")
    for way, label in ACCEPT_LABELS.items():
        rate = results[f"post_{way}_jobs_per_s"]
        print(f"| {label} | {1000 / rate:.3f} s ({rate:.0f} jobs/s) |")
    print(f"| drain 3000 no-op jobs on one node | {results['drain_jobs_per_s']:.0f} jobs/s |")
    print(f"| drain 9000 no-op jobs on two nodes | {results['drain_two_nodes_jobs_per_s']:.0f} jobs/s |")
    latency = results["get_job_ms"]
    print(f"| GET /jobs/{{id}} p50 / p99 | {latency['p50']:.1f} / {latency['p99']:.1f} ms |")
    if (rss := results["rss"]) is not None:
        print(
            f"| service RSS before / after {rss['jobs']:,} jobs | {rss['before_mb']:.0f} / {rss['after_mb']:.0f} MB "
            f"(+{rss['growth_mb']:.1f} MB) |"
        )
    print(f"| jobs table afterwards | {jobs_table_cell(results['jobs_table'])} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
