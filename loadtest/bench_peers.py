"""Ours beside Procrastinate, PgQueuer and Celery on one machine: `python -m loadtest.bench_peers`.

    python -m loadtest.bench_peers [--json FILE] [--jobs N] [--runs 3] [--samples 200] [--peers ours,pgqueuer]

Each queue, on a fresh database of the same PostgreSQL server (`DATABASE_URL`,
default postgresql://postgres@127.0.0.1:5432/postgres; Celery uses the local
Redis instead), in one run: enqueues N no-op jobs one by one (timed), drains
them with one worker (timed from the worker's start to the last completion),
samples enqueue → handler-start latency on the idle worker, then enqueues N more
in batches of 1000 (timed). Runs are interleaved across queues (round 1 of
every queue, then round 2, …) so machine noise spreads evenly; each figure is
the median over the runs (latency percentiles are per run, then the median).
Each run goes on the event loop the queue's own command line runs on (uvloop for
ours and PgQueuer where installed, asyncio's standard loop for Procrastinate).
Prints Markdown tables, with our figures as ratios to each peer; `--json`
writes every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.databases import fresh_database, server_url
from loadtest.peers import LATENCY_SAMPLES, Peer, RunResult, event_loop_name, figure, ratio
from loadtest.peers.celery_peer import CeleryPeer
from loadtest.peers.ours import Ours, OursWideNode
from loadtest.peers.pgqueuer_peer import PgQueuerPeer
from loadtest.peers.procrastinate_peer import ProcrastinatePeer
from queue_service.cli import freeze_startup_objects

PEERS: dict[str, type[Peer]] = {
    "ours": Ours,
    "ours-64": OursWideNode,
    "procrastinate": ProcrastinatePeer,
    "pgqueuer": PgQueuerPeer,
    "celery": CeleryPeer,
}
RATES = (
    ("enqueue_one_per_s", "enqueue one by one"),
    ("enqueue_batch_per_s", "enqueue, batches of 1000"),
    ("drain_per_s", "drain, one worker"),
)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def summarise(runs: list[RunResult]) -> dict[str, Any]:
    """Medians over runs of each rate and of each run's latency p50/p99."""
    summary: dict[str, Any] = {}
    for key, _ in RATES:
        values = [value for run in runs if (value := getattr(run, key)) is not None]
        summary[key] = statistics.median(values) if values else None
    sampled = [run.latencies_ms for run in runs if run.latencies_ms]
    summary["latency_p50_ms"] = statistics.median(percentile(s, 0.50) for s in sampled) if sampled else None
    summary["latency_p99_ms"] = statistics.median(percentile(s, 0.99) for s in sampled) if sampled else None
    return summary


async def run_once(peer: Peer, jobs: int, samples: int) -> RunResult:
    if not getattr(peer, "uses_postgres", True):
        result = await peer.measure("", jobs, samples)
    else:
        prefix = "tq_peer_" + type(peer).__name__.lower()
        async with fresh_database(server_url(), prefix) as url:
            result = await peer.measure(url, jobs, samples)
    result.notes.append(f"ran on {event_loop_name()}")
    return result


def measure_all(names: list[str], jobs: int, samples: int, rounds: int) -> dict[str, list[RunResult]]:
    peers = {name: PEERS[name]() for name in names}
    results: dict[str, list[RunResult]] = {name: [] for name in names}
    for round_number in range(1, rounds + 1):
        for name, peer in peers.items():
            print(f"round {round_number}/{rounds}: {peer.name} …", file=sys.stderr, flush=True)
            try:
                results[name].append(peer.run(run_once(peer, jobs, samples)))
            except Exception as error:  # one broken peer must not lose the others' figures
                print(f"  {peer.name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                results[name].append(RunResult(notes=[f"failed: {type(error).__name__}: {error}"]))
    return results


def tables(names: list[str], summaries: dict[str, dict[str, Any]], jobs: int, rounds: int) -> str:
    labels = {name: PEERS[name].name for name in names}
    lines = [
        f"### Peers side by side ({jobs:,} no-op jobs, median of {rounds} runs)",
        "",
        "| queue | " + " | ".join(label for _, label in RATES) + " | enqueue → start p50 | p99 |",
        "|---|" + "---|" * (len(RATES) + 2),
    ]
    for name in names:
        s = summaries[name]
        rates = " | ".join(figure(s[key], " /s") for key, _ in RATES)
        latencies = f"{figure(s['latency_p50_ms'], ' ms')} | {figure(s['latency_p99_ms'], ' ms')}"
        lines.append(f"| {labels[name]} | {rates} | {latencies} |")
    peers = [name for name in names if not name.startswith("ours")]
    for own in (name for name in names if name.startswith("ours")):
        ours = summaries[own]
        lines += [
            "",
            f"{labels[own]} as a ratio to each peer (ours / peer; above 1× is better for rates, below 1× for latency):",
            "",
            "| peer | " + " | ".join(label for _, label in RATES) + " | latency p50 | latency p99 |",
            "|---|" + "---|" * (len(RATES) + 2),
        ]
        for name in peers:
            s = summaries[name]
            cells = [ratio(ours[key], s[key]) for key, _ in RATES]
            cells += [ratio(ours["latency_p50_ms"], s["latency_p50_ms"])]
            cells += [ratio(ours["latency_p99_ms"], s["latency_p99_ms"])]
            lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--jobs", type=int, default=10_000, help="no-op jobs per measure (default 10000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per queue; figures are medians (default 3)")
    parser.add_argument("--samples", type=int, default=LATENCY_SAMPLES, help="latency samples per run (200)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    args = parser.parse_args()
    names = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        parser.error(f"unknown peers: {', '.join(unknown)}")
    # Every queue runs in this process, built by now: frozen as `taskqueue` freezes its own.
    freeze_startup_objects()
    results = measure_all(names, args.jobs, args.samples, args.runs)
    summaries = {name: summarise(runs) for name, runs in results.items()}
    print(tables(names, summaries, args.jobs, args.runs))
    for name, runs in results.items():
        for note in dict.fromkeys(note for run in runs for note in run.notes):
            print(f"\n- {PEERS[name].name}: {note}")
    if args.json:
        document = {
            "jobs": args.jobs,
            "runs": args.runs,
            "samples": args.samples,
            "machine": {"python": platform.python_version(), "platform": platform.platform()},
            "peers": {
                name: {"name": PEERS[name].name, "summary": summaries[name], "runs": [asdict(r) for r in results[name]]}
                for name in names
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
