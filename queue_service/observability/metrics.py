"""Prometheus metrics of one process (SPEC §8), in a registry of its own.

Three sources, each as cheap as it can be:

- the **database**, read at scrape time, for what describes the whole queue and
  must agree across replicas: depth by status × priority (from the folded
  `queue_counters`, never the jobs table), node capacity and use, paused;
- the **event stream** this process LISTENs to, for whole-queue counters:
  submitted, finished, retries. Every replica sees every event, so every replica
  counts every job: aggregate them across replicas with `max`, not `sum`;
- the process's own **worker node** (a `NodeObserver`), for what happens here:
  dispatch latency, run and wait times, attempt outcomes and timeouts. These
  are per node, so `sum` across processes is right.

The registry is per `QueueMetrics`, not prometheus-client's global one, so
several apps in one test process never collide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from queue_service.core.model import AttemptOutcome, JobStatus
from queue_service.db import attempts, driver, insight
from queue_service.db.attempts import AttemptEnd, Claim
from queue_service.db.events import JOB_UPDATED
from queue_service.db.insight import Depth, NodeUsage

# Seconds: from sub-second demo handlers to the hour-long exports a fintech platform runs.
DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A claim is one transaction: milliseconds normally, seconds only under lock contention.
DISPATCH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SNAPSHOT_TIMEOUT_SECONDS: Final = 2.0  # a scrape that waits longer on the database reports it down
# Depth and position reads sum the deltas appended since the last fold: at a thousand
# submissions a second, ten seconds between folds left tens of thousands of rows to sum
# on every submission's position; a second leaves a few thousand. A fold below the
# threshold (insight.FOLD_THRESHOLD_ROWS) writes nothing.
FOLD_INTERVAL_SECONDS: Final = 1.0
_TERMINAL: Final = frozenset(s.value for s in JobStatus if s.is_terminal)

log = logging.getLogger(__name__)


@dataclass
class QueueSnapshot:
    """What the database said at the last scrape; `up` False when it did not answer."""

    up: bool = False
    depths: list[Depth] = field(default_factory=list)
    counter_rows: int = 0
    nodes: list[NodeUsage] = field(default_factory=list)
    paused: bool = False
    read_seconds: float = 0.0


class _SnapshotCollector(Collector):
    """Yields the last snapshot and the live pool and stream figures as gauges."""

    def __init__(self, metrics: QueueMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        snap = self._metrics.snapshot
        yield _gauge("taskqueue_database_up", "1 if the database answered this scrape", [((), float(snap.up))])
        yield _gauge(
            "taskqueue_metrics_database_read_seconds",
            "time this scrape spent reading the database",
            [((), snap.read_seconds)],
        )
        depth = GaugeMetricFamily(
            "taskqueue_queue_depth",
            "jobs per status and priority in the whole queue (terminal statuses: all-time totals)",
            labels=["status", "priority"],
        )
        for d in snap.depths:
            depth.add_metric([d.status, d.priority], d.jobs)
        yield depth
        yield _gauge(
            "taskqueue_queue_counter_rows", "delta rows read for depth (folded periodically)", [((), snap.counter_rows)]
        )
        yield _gauge(
            "taskqueue_dispatch_paused", "1 while dispatch is paused on every node", [((), float(snap.paused))]
        )
        yield from _node_gauges(snap.nodes)
        yield from _pool_gauges(self._metrics.engine)
        hub = self._metrics.stream_stats
        if hub is not None:
            clients, dropped = hub()
            yield _gauge("taskqueue_stream_clients", "WebSocket clients connected to this process", [((), clients)])
            yield _gauge("taskqueue_stream_clients_dropped", "WebSocket clients dropped as too slow", [((), dropped)])


def _gauge(
    name: str, documentation: str, samples: Iterable[tuple[tuple[str, ...], float]], labels: Iterable[str] = ()
) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for label_values, value in samples:
        family.add_metric(list(label_values), value)
    return family


def _node_gauges(nodes: list[NodeUsage]) -> Iterable[Metric]:
    labels = ("node",)
    yield _gauge(
        "taskqueue_node_cpu_capacity_units",
        "CPU units a live node offers",
        (((n.node_id,), n.cpu_capacity) for n in nodes),
        labels,
    )
    yield _gauge(
        "taskqueue_node_cpu_used_units",
        "CPU units held by running attempts",
        (((n.node_id,), n.cpu_used) for n in nodes),
        labels,
    )
    yield _gauge(
        "taskqueue_node_memory_capacity_mb",
        "memory a live node offers",
        (((n.node_id,), n.memory_capacity) for n in nodes),
        labels,
    )
    yield _gauge(
        "taskqueue_node_memory_used_mb",
        "memory held by running attempts",
        (((n.node_id,), n.memory_used) for n in nodes),
        labels,
    )


def _pool_gauges(engine: AsyncEngine | None) -> Iterable[Metric]:
    if engine is None or not isinstance(engine.pool, QueuePool):  # the async adapted pool is one
        return
    pool = engine.pool
    yield _gauge("taskqueue_db_pool_size", "connections the pool keeps", [((), pool.size())])
    yield _gauge("taskqueue_db_pool_checked_out", "connections in use by this process", [((), pool.checkedout())])
    yield _gauge("taskqueue_db_pool_checked_in", "idle connections in the pool", [((), pool.checkedin())])
    yield _gauge(
        "taskqueue_db_pool_overflow", "connections beyond pool_size (negative: not yet opened)", [((), pool.overflow())]
    )
    if (sizes := driver.driver_pool_sizes(engine)) is not None:
        open_connections, idle = sizes
        yield _gauge(
            "taskqueue_db_driver_pool_open",
            "connections open in the pool of single statements (submissions, job reads, idle starts)",
            [((), open_connections)],
        )
        yield _gauge("taskqueue_db_driver_pool_idle", "idle connections in that pool", [((), idle)])


class QueueMetrics:
    """A process's metrics: a `NodeObserver` for its worker and a subscriber for its listener."""

    def __init__(self) -> None:
        # `_created` series double every counter for no use to a dashboard; the switch is
        # process-wide in prometheus-client, and this process exposes only these metrics.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine: AsyncEngine | None = None
        self.stream_stats: Callable[[], tuple[int, int]] | None = None  # (clients, dropped), set by the API
        self.snapshot = QueueSnapshot()
        r = self.registry
        self.submitted = Counter(
            "taskqueue_jobs_submitted",
            "jobs submitted to the whole queue, seen by this replica",
            ["type", "priority"],
            registry=r,
        )
        self.finished = Counter(
            "taskqueue_jobs_finished",
            "jobs that reached a terminal status in the whole queue, seen by this replica",
            ["type", "priority", "status"],
            registry=r,
        )
        self.retries = Counter(
            "taskqueue_job_retries",
            "failed attempts scheduled for a retry, whole queue",
            ["type", "priority"],
            registry=r,
        )
        self.attempts = Counter(
            "taskqueue_attempts",
            "attempts ended on this process's node, by outcome",
            ["type", "priority", "outcome"],
            registry=r,
        )
        self.timeouts = Counter(
            "taskqueue_attempt_timeouts",
            "attempts on this node stopped at their timeout",
            ["type", "priority"],
            registry=r,
        )
        self.run_seconds = Histogram(
            "taskqueue_job_run_seconds",
            "attempt run time on this node",
            ["priority", "type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.wait_seconds = Histogram(
            "taskqueue_job_wait_seconds",
            "time from ready to started, for jobs this node started",
            ["priority", "type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.dispatch_seconds = Histogram(
            "taskqueue_dispatch_seconds",
            "one claim transaction on this node (lock, plan, start)",
            buckets=DISPATCH_BUCKETS,
            registry=r,
        )
        self.dispatched = Counter(
            "taskqueue_jobs_dispatched", "attempts this node started", ["node", "backfilled"], registry=r
        )
        self.registry.register(_SnapshotCollector(self))

    # ------------------------------------------------------------ event stream
    def on_event(self, message: Mapping[str, Any]) -> None:
        """EventListener subscriber: whole-queue counters from job.updated announcements."""
        if message.get("event") != JOB_UPDATED:
            return
        job_type, priority, status = str(message.get("type")), str(message.get("priority")), message.get("status")
        if message.get("previous_status") is None:
            self.submitted.labels(job_type, priority).inc()
        if status in _TERMINAL:
            self.finished.labels(job_type, priority, status).inc()
        elif status == JobStatus.RETRYING.value:
            self.retries.labels(job_type, priority).inc()

    # ---------------------------------------------------------- NodeObserver
    def claimed(self, node_id: str, claims: list[Claim], claim_seconds: float) -> None:
        self.dispatch_seconds.observe(claim_seconds)
        for claim in claims:
            self.dispatched.labels(node_id, str(claim.backfilled).lower()).inc()
            waited = max(0.0, (datetime.now(UTC) - claim.ready_at).total_seconds() - claim_seconds / 2)
            self.wait_seconds.labels(claim.priority, claim.type).observe(waited)

    def attempt_ended(self, node_id: str, claim: Claim, end: AttemptEnd, run_seconds: float) -> None:
        self.attempts.labels(claim.type, claim.priority, end.outcome.value).inc()
        if end.outcome is AttemptOutcome.TIMED_OUT:
            self.timeouts.labels(claim.type, claim.priority).inc()
        if end.outcome is not AttemptOutcome.INTERRUPTED:  # a shutdown cut is no run time
            self.run_seconds.labels(claim.priority, claim.type).observe(run_seconds)

    # ------------------------------------------------------------- exposition
    def exposition(self, snapshot: QueueSnapshot) -> bytes:
        """The text exposition with `snapshot` as the database's view (no await in between,
        so concurrent scrapes cannot mix snapshots)."""
        self.snapshot = snapshot
        return generate_latest(self.registry)


async def read_snapshot(engine: AsyncEngine, timeout: float = SNAPSHOT_TIMEOUT_SECONDS) -> QueueSnapshot:
    """The database's view for one scrape: one short transaction, three small reads."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout), engine.begin() as conn:
            depths, rows = await insight.queue_depth(conn)
            nodes = await insight.live_nodes(conn)
            paused = await attempts.is_paused(conn)
    except Exception as error:  # a scrape still reports the process's own metrics, with database_up 0
        log.warning("metrics could not read the database: %s", error)
        return QueueSnapshot(up=False, read_seconds=time.perf_counter() - started)
    return QueueSnapshot(True, depths, rows, nodes, paused, time.perf_counter() - started)
