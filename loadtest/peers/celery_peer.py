"""Celery with the local Redis broker, for reference (it does not use PostgreSQL).

Enqueue is `apply_async` one by one (Celery has no bulk-insert call; `group`
still publishes message by message). Drain is one worker process
(`celery worker --pool solo -c 1`) started beforehand on an idle queue and told
to consume the loaded queue with `add_consumer`; it is timed until a last
`stamp` task, queued behind the no-op jobs, starts (a solo worker runs in queue
order). Latency: `stamp` tasks on the idle worker, read back from Redis. Its
producer is synchronous: the event loop only waits for the thread it runs in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

import redis

from loadtest.peers import DRAIN_TIMEOUT_SECONDS, START_TIMEOUT_SECONDS, RunResult, rate, sample_latencies
from loadtest.peers.celery_app import BROKER, app, noop, stamp

ROOT: Final = Path(__file__).resolve().parents[2]
WORKER_READY_SECONDS: Final = 30.0
WORKER_STOP_SECONDS: Final = 30.0


class CeleryPeer:
    name = f"Celery {version('celery')} + Redis"
    uses_postgres = False

    def run(self, main: Coroutine[Any, Any, RunResult]) -> RunResult:
        return asyncio.run(main)

    async def measure(self, database_url: str, jobs: int, samples: int) -> RunResult:
        return await asyncio.to_thread(_measure, jobs, samples)


def _start_worker(node: str, idle_queue: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "celery", "-A", "loadtest.peers.celery_app", "worker",
        "--pool", "solo", "--concurrency", "1", "--queues", idle_queue, "--hostname", node,
        "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "BENCH_CELERY_BROKER": BROKER, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_ready(node: str) -> None:
    deadline = time.monotonic() + WORKER_READY_SECONDS
    while time.monotonic() < deadline:
        if app.control.ping(destination=[node], timeout=0.5):
            return
    raise RuntimeError(f"celery worker {node} did not answer a ping within {WORKER_READY_SECONDS:g}s")


def _pop_stamp(client: redis.Redis, key: str, timeout: float) -> float:
    popped = client.blpop([key], timeout=timeout)
    if popped is None:
        raise TimeoutError(f"no task start recorded on {key} within {timeout:g}s")
    return float(popped[1])


def _durability(client: redis.Redis) -> str:
    """What an acknowledged enqueue means on this broker, read from its configuration:
    the PostgreSQL queues acknowledge after their commit is flushed to disk."""
    appendonly = client.config_get("appendonly").get("appendonly")
    if appendonly != "yes":
        return "the broker (Redis) runs with appendonly no: an enqueue is acknowledged from memory, on no disk"
    fsync = client.config_get("appendfsync").get("appendfsync")
    return f"the broker (Redis) runs with appendonly yes, appendfsync {fsync}"


def _measure(jobs: int, samples: int) -> RunResult:
    run = uuid.uuid4().hex[:8]
    queue, idle_queue, key = f"bench-{run}", f"bench-idle-{run}", f"bench-stamps-{run}"
    node = f"bench-{run}@{socket.gethostname()}"
    # redis-py's default 5 s socket timeout would cut a long blocking pop short.
    client = redis.Redis.from_url(BROKER, socket_timeout=DRAIN_TIMEOUT_SECONDS + START_TIMEOUT_SECONDS)
    result = RunResult(notes=["no batch enqueue API", _durability(client)])
    worker = _start_worker(node, idle_queue)
    try:
        _wait_ready(node)
        started = time.perf_counter()
        for _ in range(jobs):
            noop.apply_async(queue=queue)
        result.enqueue_one_per_s = rate(jobs, time.perf_counter() - started)
        stamp.apply_async((key,), queue=queue)

        started = time.perf_counter()
        app.control.add_consumer(queue, destination=[node], reply=True)
        finished = _pop_stamp(client, key, DRAIN_TIMEOUT_SECONDS)
        result.drain_per_s = rate(jobs, finished - started)

        result.latencies_ms = asyncio.run(_latencies(client, queue, key, samples))
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        client.delete(queue, idle_queue, key)
        client.close()
    return result


async def _latencies(client: redis.Redis, queue: str, key: str, samples: int) -> list[float]:
    async def submit(_index: int) -> None:
        stamp.apply_async((key,), queue=queue)

    async def started() -> float:
        return _pop_stamp(client, key, START_TIMEOUT_SECONDS)

    return await sample_latencies(submit, started, samples)
