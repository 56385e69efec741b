"""A headless locust run against a live service: `python -m loadtest.bench_locust`.

    python -m loadtest.bench_locust [--seconds 60] [--users 20] [--spawn-rate 5] [--json FILE]

Starts `taskqueue serve` on a fresh database (`DATABASE_URL`'s server, else an
embedded one), runs `loadtest/locustfile.py`'s users against it for the given
time, and reports per endpoint: requests, failures, p50/p95/p99 (locust's own
percentiles from its `--csv` output), with the service's RSS sampled every five
seconds. The issue's five-minute run is `--seconds 300`.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from loadtest.bench_service import fresh_database, rss_mb, server_url, service

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
RSS_EVERY_SECONDS = 5.0


def parse_stats(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.append(
                {
                    "endpoint": row["Name"],  # the locustfile names each request with its method
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "requests_per_s": float(row["Requests/s"]),
                    "p50_ms": float(row["50%"] or 0),
                    "p95_ms": float(row["95%"] or 0),
                    "p99_ms": float(row["99%"] or 0),
                }
            )
    return rows


def run(seconds: int, users: int, spawn_rate: int) -> dict[str, Any]:
    with (
        server_url() as url,
        fresh_database(url) as database,
        service(database) as running,
        tempfile.TemporaryDirectory(prefix="tq-locust-") as folder,
    ):
        samples: list[float] = [rss_mb(running.pid)]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(RSS_EVERY_SECONDS):
                samples.append(rss_mb(running.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        prefix = Path(folder) / "run"
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
            "-r", str(spawn_rate), "-t", f"{seconds}s", "--host", running.base, "--csv", str(prefix),
            "--only-summary", "--loglevel", "WARNING",
        ]  # fmt: skip
        # locust exits 1 when any request failed: that is a figure of the report, not a crash.
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        done.set()
        sampler.join()
        samples.append(rss_mb(running.pid))
        stats_file = Path(f"{prefix}_stats.csv")
        if not stats_file.exists():
            raise RuntimeError(f"locust wrote no statistics:\n{finished.stderr[-2000:]}")
        rows = parse_stats(stats_file)
    aggregated = next(row for row in rows if row["endpoint"] == "Aggregated")
    return {
        "seconds": seconds,
        "users": users,
        "endpoints": [row for row in rows if row["endpoint"] != "Aggregated"],
        "aggregated": aggregated,
        "rss_mb": {"start": samples[0], "end": samples[-1], "max": max(samples)},
    }


def report(results: dict[str, Any]) -> str:
    lines = [
        "| endpoint | requests | failures | req/s | p50 | p95 | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in [*results["endpoints"], results["aggregated"]]:
        lines.append(
            f"| {row['endpoint']} | {row['requests']:,} | {row['failures']} | {row['requests_per_s']:.1f} "
            f"| {row['p50_ms']:.0f} ms | {row['p95_ms']:.0f} ms | {row['p99_ms']:.0f} ms |"
        )
    rss = results["rss_mb"]
    lines.append("")
    lines.append(
        f"Service RSS: {rss['start']:.0f} MB at start, {rss['end']:.0f} MB at the end, {rss['max']:.0f} MB max."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--spawn-rate", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = run(args.seconds, args.users, args.spawn_rate)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
