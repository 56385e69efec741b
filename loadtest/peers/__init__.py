"""Adapters that measure one job queue each the same way (bench_peers runs them side by side).

Every adapter answers one `RunResult` per run on a fresh database: enqueue rates
one by one and in batches, the drain rate of one worker over no-op jobs, and
enqueue → handler-start latencies on an idle worker. Each runs on the event loop
its own command line runs on (`Peer.run`): uvloop and asyncio's standard loop cost
the same Python code a different amount per job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

BATCH_SIZE: Final = 1000
LATENCY_SAMPLES: Final = 200
IDLE_GAP_SECONDS: Final = 0.02  # between latency samples, so the previous job's completion is written
DRAIN_TIMEOUT_SECONDS: Final = 600.0  # a drain that takes longer is a failed measurement
START_TIMEOUT_SECONDS: Final = 10.0  # one job not started within this is a failed latency sample


def figure(value: float | None, unit: str = "") -> str:
    """A measured figure for a table; a dash for a measure not taken."""
    if value is None:
        return "—"
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:.2f}{unit}"


def ratio(ours: float | None, theirs: float | None) -> str:
    """Ours over theirs for a table; a dash when either was not measured."""
    return f"{ours / theirs:.2f}×" if ours is not None and theirs else "—"


@dataclass
class RunResult:
    """One run's figures; a None rate is a measure the peer does not offer."""

    enqueue_one_per_s: float | None = None
    enqueue_batch_per_s: float | None = None
    drain_per_s: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Peer(Protocol):
    """A queue under test: `measure` does one complete run on the database at
    `database_url`; `run` runs it to the end on the event loop the queue's own
    command line (its worker) runs on."""

    name: str

    async def measure(self, database_url: str, jobs: int, samples: int) -> RunResult: ...

    def run(self, main: Coroutine[Any, Any, RunResult]) -> RunResult: ...


def event_loop_name() -> str:
    """The running event loop, as a run's note says it."""
    uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    return "uvloop" if uvloop else "asyncio's standard event loop"


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    """Seconds `action` takes."""
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


class StartStamps:
    """Handler-start timestamps (time.perf_counter) handed from handler to the sampler."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[float] = asyncio.Queue()

    def stamp(self) -> None:
        self._queue.put_nowait(time.perf_counter())

    async def next(self) -> float:
        async with asyncio.timeout(START_TIMEOUT_SECONDS):
            return await self._queue.get()


async def sample_latencies(
    submit: Callable[[int], Awaitable[object]], started: Callable[[], Awaitable[float]], samples: int
) -> list[float]:
    """Submit one job at a time to an idle worker; milliseconds from before the submit
    call to the handler's first line. A first, unrecorded job warms the worker up
    (its registration and LISTEN may still be under way)."""
    latencies: list[float] = []
    for index in range(-1, samples):
        submitted = time.perf_counter()
        await submit(index)
        start = await started()
        if index >= 0:
            latencies.append((start - submitted) * 1000)
        await asyncio.sleep(IDLE_GAP_SECONDS)
    return latencies


class Counter:
    """Counts handler calls and fires an event when `target` is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target = -1
        self.reached = asyncio.Event()

    def expect(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.reached.clear()

    def hit(self) -> None:
        self.count += 1
        if self.count == self.target:
            self.reached.set()
