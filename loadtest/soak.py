"""Soak run (not part of CI): `python -m loadtest.soak --minutes 30`.

Runs `taskqueue api` and several `taskqueue worker` processes on a fresh database,
drives them with mixed traffic for the given time, and kill -9s one worker every
`--kill-every` seconds (it comes back under the same node id at once). Traffic:
single jobs of every priority and size, some asked to fail once or time out, DAG
batches (a diamond of four), polls of recent jobs, list pages, and cancels.

Every `--sample-every` seconds it records the RSS of each process and the p99 of
the requests made in that window. At the end it waits for every accepted job to
finish, then checks the database:
- lost: accepted (a 201 seen) but no row, or a row stuck short of a final status
  (the backlog left when the load stops drains first);
- duplicated: two attempts of one job that overlap in time, or a job with two
  successful attempts;
- capacity: the most CPU units any node held at once, against its capacity.
Exit status 1 if anything was lost or duplicated, or capacity was exceeded.

The database is `DATABASE_URL` (a server's maintenance database) or an embedded one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from loadtest.bench_service import TASKQUEUE, fresh_database, rss_mb, server_url
from queue_service.db.engine import asyncpg_dsn
from queue_service.settings import normalize_database_url

NODES = {"soak-a": 8, "soak-b": 8, "soak-c": 4}  # node id -> CPU units
LEASE_SECONDS = 5.0  # short, so a killed node's attempts come back within the run's rhythm
PRIORITIES = ("critical", "high", "normal", "low")
STALL_SECONDS = 60.0  # after the load stops: unfinished jobs that make no progress this long are stuck
STARTUP_SECONDS = 5.0  # a process younger than this has not reached its working size
OVERLAPS_SQL = """
SELECT count(*) FROM job_attempts a JOIN job_attempts b
  ON a.job_id = b.job_id AND b.attempt > a.attempt
WHERE a.ended_at IS NULL OR a.ended_at > b.started_at
"""
DOUBLE_SUCCESS_SQL = """
SELECT count(*) FROM (
  SELECT job_id FROM job_attempts WHERE outcome = 'succeeded' GROUP BY job_id HAVING count(*) > 1
) twice
"""
CPU_PEAKS_SQL = """
WITH edges AS (
    SELECT a.node_id, a.started_at AS at, j.cpu_units AS change
    FROM job_attempts a JOIN jobs j USING (job_id)
    UNION ALL
    SELECT a.node_id, a.ended_at, -j.cpu_units
    FROM job_attempts a JOIN jobs j USING (job_id) WHERE a.ended_at IS NOT NULL
), running AS (
    SELECT node_id, sum(change) OVER (PARTITION BY node_id ORDER BY at, change ROWS UNBOUNDED PRECEDING) AS cpu
    FROM edges
)
SELECT node_id, max(cpu) FROM running GROUP BY node_id ORDER BY node_id
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """One `taskqueue` process; its log is discarded (the soak judges by the database)."""

    def __init__(self, arguments: list[str], environment: dict[str, str]) -> None:
        self.arguments = arguments
        self.environment = environment
        self.popen = self._spawn()
        self.spawned = time.monotonic()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [TASKQUEUE, *self.arguments], env=self.environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill_and_restart(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.popen = self._spawn()
        self.spawned = time.monotonic()

    def rss_mb(self) -> float | None:
        """Resident memory; None while a restarted process is still starting up."""
        if time.monotonic() - self.spawned < STARTUP_SECONDS:
            return None
        try:
            return rss_mb(self.popen.pid)
        except (OSError, RuntimeError):  # between a kill and its restart
            return None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@contextmanager
def cluster(database_url: str) -> Iterator[tuple[str, Process, dict[str, Process]]]:
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "TASKQUEUE_LEASE_SECONDS": str(LEASE_SECONDS),
        "TASKQUEUE_LOG_LEVEL": "warning",
    }
    port = free_port()
    api = Process(["api", "--port", str(port), "--log-level", "warning"], environment)
    workers = {
        node: Process(
            [
                "worker",
                "--node-id",
                node,
                "--cpu-units",
                str(cpu),
                "--memory-mb",
                str(cpu * 512),
                "--log-level",
                "warning",
            ],
            environment,
        )
        for node, cpu in NODES.items()
    }
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not become ready in 60 s")
            time.sleep(0.2)
        yield base, api, workers
    finally:
        for process in [api, *workers.values()]:
            process.stop()


@dataclass
class Window:
    """What happened in one sampling window."""

    started: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0  # 5xx or transport errors


@dataclass
class Traffic:
    accepted: set[str] = field(default_factory=set)
    cancelled: int = 0
    requests: int = 0
    server_errors: int = 0
    window: Window = field(default_factory=lambda: Window(time.monotonic()))
    serial: int = 0

    def next_id(self, kind: str) -> str:
        self.serial += 1
        return f"soak-{kind}-{self.serial:07d}"


def single_job(traffic: Traffic, rng: random.Random) -> dict[str, Any]:
    simulate: dict[str, Any] = {"duration_seconds": round(rng.uniform(0.02, 0.8), 3)}
    roll = rng.random()
    if roll < 0.08:
        simulate["fail_attempts"] = 1
    elif roll < 0.10:
        simulate["timeout_attempts"] = 1
    return {
        "job_id": traffic.next_id("one"),
        "type": rng.choice(("send_email", "generate_report", "export_data")),
        "priority": rng.choice(PRIORITIES),
        "payload": {"simulate": simulate},
        "resource_requirements": {"cpu_units": rng.choice((1, 1, 2, 4)), "memory_mb": rng.choice((128, 256, 1024))},
        "retry_config": {"max_attempts": 6, "initial_delay_seconds": 0.2, "max_delay_seconds": 2},
        "timeout_seconds": 5,
    }


def diamond(traffic: Traffic, rng: random.Random) -> list[dict[str, Any]]:
    top, left, right, bottom = (traffic.next_id("dag") for _ in range(4))
    edges = {top: [], left: [top], right: [top], bottom: [left, right]}
    return [
        {
            "job_id": job_id,
            "type": "pipeline_step",
            "priority": "normal",
            "payload": {"simulate": {"duration_seconds": round(rng.uniform(0.05, 0.3), 3)}},
            "resource_requirements": {"cpu_units": 1, "memory_mb": 256},
            "depends_on": parents,
            "retry_config": {"max_attempts": 6, "initial_delay_seconds": 0.2, "max_delay_seconds": 2},
        }
        for job_id, parents in edges.items()
    ]


async def request(traffic: Traffic, call: Any) -> httpx.Response | None:
    started = time.perf_counter()
    traffic.requests += 1
    try:
        response: httpx.Response = await call
    except httpx.TransportError:
        traffic.window.errors += 1
        traffic.server_errors += 1
        return None
    traffic.window.latencies.append(time.perf_counter() - started)
    if response.status_code >= 500:
        traffic.window.errors += 1
        traffic.server_errors += 1
    return response


async def user(client: httpx.AsyncClient, traffic: Traffic, seed: int, until: float, pause: float) -> None:
    """One simulated client: mostly submitting, sometimes reading, listing or cancelling."""
    rng = random.Random(seed)
    recent: list[str] = []
    while time.monotonic() < until:
        roll = rng.random()
        if roll < 0.45:
            body = single_job(traffic, rng)
            response = await request(traffic, client.post("/jobs", json=body))
            if response is not None and response.status_code == 201:
                traffic.accepted.add(body["job_id"])
                recent = [*recent[-50:], body["job_id"]]
        elif roll < 0.60:
            batch = diamond(traffic, rng)
            response = await request(traffic, client.post("/jobs/batch", json=batch))
            if response is not None and response.status_code == 201:
                traffic.accepted.update(job["job_id"] for job in batch)
                recent = [*recent[-50:], batch[0]["job_id"]]
        elif roll < 0.85 and recent:
            await request(traffic, client.get(f"/jobs/{rng.choice(recent)}"))
        elif roll < 0.97:
            await request(
                traffic, client.get("/jobs", params={"status": rng.choice(("ready", "running")), "limit": 50})
            )
        elif recent:
            response = await request(traffic, client.patch(f"/jobs/{rng.choice(recent)}/cancel"))
            if response is not None and response.status_code == 200:
                traffic.cancelled += 1
        await asyncio.sleep(pause * rng.uniform(0.5, 1.5))


def p99_ms(latencies: list[float]) -> float:
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, round(0.99 * len(ordered)) - 1)]


async def drive(args: argparse.Namespace, base: str, api: Process, workers: dict[str, Process]) -> dict[str, Any]:
    traffic = Traffic()
    samples: list[dict[str, Any]] = []
    kills = 0
    started = time.monotonic()
    until = started + args.minutes * 60
    rng = random.Random(args.seed)
    names = sorted(workers)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        users = [
            asyncio.create_task(user(client, traffic, args.seed + n, until, args.users / args.rate))
            for n in range(args.users)
        ]
        next_kill = started + args.kill_every
        next_sample = started + args.sample_every
        while time.monotonic() < until:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now >= next_kill:
                workers[rng.choice(names)].kill_and_restart()
                kills += 1
                next_kill += args.kill_every
            if now >= next_sample:
                window, traffic.window = traffic.window, Window(now)
                sample = {
                    "minute": (now - started) / 60,
                    "accepted": len(traffic.accepted),
                    "requests": len(window.latencies),
                    "p99_ms": p99_ms(window.latencies),
                    "errors": window.errors,
                    "rss_api_mb": api.rss_mb(),
                    "rss_workers_mb": {name: workers[name].rss_mb() for name in names},
                }
                samples.append(sample)
                minute, accepted, p99 = sample["minute"], sample["accepted"], sample["p99_ms"]
                print(
                    f"  {minute:5.1f} min  accepted {accepted:>7,}  p99 {p99:6.1f} ms  "
                    f"errors {sample['errors']}  RSS api {sample['rss_api_mb'] or 0:.0f} MB",
                    file=sys.stderr,
                )
                next_sample += args.sample_every
        await asyncio.gather(*users)
    return {"traffic": traffic, "samples": samples, "kills": kills, "seconds": time.monotonic() - started}


def pairs(rows: list[asyncpg.Record]) -> dict[str, int]:
    return {str(row[0]): int(row[1]) for row in rows}


async def verdict(database_url: str, accepted: set[str]) -> dict[str, Any]:
    """Wait for every accepted job to finish, then count what was lost or duplicated."""
    connection = await asyncpg.connect(asyncpg_dsn(normalize_database_url(database_url)))
    try:
        # A backlog drains; a stuck job does not: give up only when nothing has finished for a while.
        fewest, progress_at = None, time.monotonic()
        while True:
            unfinished = await connection.fetchval(
                "SELECT count(*) FROM jobs WHERE status NOT IN ('completed', 'failed', 'cancelled')"
            )
            if fewest is None or unfinished < fewest:
                fewest, progress_at = unfinished, time.monotonic()
            if unfinished == 0 or time.monotonic() - progress_at > STALL_SECONDS:
                break
            await asyncio.sleep(1)
        stored = {row["job_id"] for row in await connection.fetch("SELECT job_id FROM jobs")}
        statuses = pairs(await connection.fetch("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status"))
        outcomes = pairs(
            await connection.fetch("SELECT outcome, count(*) FROM job_attempts GROUP BY outcome ORDER BY outcome")
        )
        return {
            "missing": len(accepted - stored),
            "unfinished": unfinished,
            "statuses": statuses,
            "outcomes": outcomes,
            "overlapping": await connection.fetchval(OVERLAPS_SQL),
            "double_success": await connection.fetchval(DOUBLE_SUCCESS_SQL),
            "cpu_peaks": pairs(await connection.fetch(CPU_PEAKS_SQL)),
        }
    finally:
        await connection.close()


def report(args: argparse.Namespace, run: dict[str, Any], checks: dict[str, Any]) -> tuple[str, bool]:
    traffic: Traffic = run["traffic"]
    over = {node: peak for node, peak in checks["cpu_peaks"].items() if peak > NODES.get(node, 0)}
    lost = checks["missing"] + checks["unfinished"]
    duplicated = checks["overlapping"] + checks["double_success"]
    passed = lost == 0 and duplicated == 0 and not over
    first, last = run["samples"][0] if run["samples"] else {}, run["samples"][-1] if run["samples"] else {}
    lines = [
        f"# Soak: {run['seconds'] / 60:.1f} minutes, {args.users} clients, {len(NODES)} workers, "
        f"kill -9 every {args.kill_every:g} s",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests / 5xx or transport errors | {traffic.requests:,} / {traffic.server_errors} |",
        f"| jobs accepted / cancelled by clients | {len(traffic.accepted):,} / {traffic.cancelled:,} |",
        f"| final statuses | {', '.join(f'{k} {v:,}' for k, v in checks['statuses'].items())} |",
        f"| attempt outcomes | {', '.join(f'{k} {v:,}' for k, v in checks['outcomes'].items())} |",
        f"| worker kills | {run['kills']} |",
        f"| lost (accepted but no row, or stuck unfinished) | {lost} |",
        f"| duplicated (overlapping attempts, two successes) | {duplicated} |",
        "| CPU peak per node (capacity) | "
        + ", ".join(f"{node} {peak} ({NODES.get(node)})" for node, peak in checks["cpu_peaks"].items())
        + " |",
    ]
    if first and last:
        lines.append(f"| API RSS first / last sample | {first['rss_api_mb']:.0f} / {last['rss_api_mb']:.0f} MB |")
        p99s = [sample["p99_ms"] for sample in run["samples"] if sample["requests"]]
        if p99s:
            lines.append(
                f"| request p99 per window: median / worst | {statistics.median(p99s):.1f} / {max(p99s):.1f} ms |"
            )
    lines += [
        "",
        "| minute | accepted | requests | p99 ms | errors | API RSS MB | worker RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for sample in run["samples"]:
        workers = ", ".join(f"{rss:.0f}" if rss else "restarting" for rss in sample["rss_workers_mb"].values())
        lines.append(
            f"| {sample['minute']:.1f} | {sample['accepted']:,} | {sample['requests']:,} | {sample['p99_ms']:.1f} | "
            f"{sample['errors']} | {sample['rss_api_mb'] or 0:.0f} | {workers} |"
        )
    lines += ["", f"Result: {'PASS' if passed else 'FAIL'}", ""]
    return "\n".join(lines), passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--users", type=int, default=8, help="concurrent clients")
    # About 1 job per request, 0.4 s and 1.75 CPU units each: 20 requests/s keep the
    # three nodes (20 units) about 75% busy, a rate they hold through the kills.
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second, all clients together")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between worker kills")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds per RSS / p99 sample")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    with server_url() as server, fresh_database(server) as database, cluster(database) as (base, api, workers):
        print(f"soak: {args.minutes:g} min against {base}", file=sys.stderr)
        run = asyncio.run(drive(args, base, api, workers))
        checks = asyncio.run(verdict(database, run["traffic"].accepted))
    text, passed = report(args, run, checks)
    print(text)
    if args.out is not None:
        args.out.write_text(text, "utf-8")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
