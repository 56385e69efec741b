"""The Celery application the benchmark's worker process loads (`celery -A loadtest.peers.celery_app`).

Its broker is `BENCH_CELERY_BROKER` (read at import, as Celery workers load their
app by module path), by default the local Redis on a database of its own. Tasks:
`noop` returns at once; `stamp` pushes `time.perf_counter()` (CLOCK_MONOTONIC,
shared by every process on the machine) onto a Redis list the benchmark waits on.
"""

from __future__ import annotations

import os
import time
from typing import Final

import redis
from celery import Celery

DEFAULT_BROKER: Final = "redis://127.0.0.1:6379/11"
BROKER: Final = os.environ.get("BENCH_CELERY_BROKER", DEFAULT_BROKER)

app = Celery("bench", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
_redis = redis.Redis.from_url(BROKER)


def _noop() -> None:
    """No work at all."""


def _stamp(key: str) -> None:
    """Record when this task started, for the benchmark to read."""
    started = time.perf_counter()
    _redis.rpush(key, repr(started))


# Registered by call rather than as decorators: Celery is untyped, and a decorator
# would leave the functions untyped too.
noop = app.task(name="bench.noop")(_noop)
stamp = app.task(name="bench.stamp")(_stamp)
