"""`WS /jobs/stream` against real servers: a job's whole life, filters and auth,
fan-out across two API processes on one database, and a slow consumer that
must not hold up anyone else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from queue_service.api.app import create_app
from queue_service.observability.fanout import EventHub
from queue_service.settings import Settings

pytestmark = pytest.mark.integration

TASKQUEUE = str(Path(sys.executable).parent / "taskqueue")
TABLES = "jobs, job_dependencies, job_attempts, job_events, nodes, queue_counters"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _QuietServer(uvicorn.Server):
    """uvicorn in the test's own loop, leaving the test runner's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, *, run_worker: bool = True, send_buffer: int | None = None
) -> AsyncIterator[tuple[str, FastAPI]]:
    """The app served over real HTTP and WebSocket on a free port; yields (address, app).

    `send_buffer` caps the kernel send buffer of accepted sockets (they inherit it from
    the listening one), so a stalled client fills it in kilobytes rather than megabytes.
    """
    app = create_app(settings, run_worker=run_worker)
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listening.bind(("127.0.0.1", 0))
    port = int(listening.getsockname()[1])
    # Bounded shutdown: a client that never completes its close handshake (a stalled
    # socket, a test that failed before closing it) cannot hang the test run.
    server = _QuietServer(uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[listening]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task
        listening.close()


class ApiProcess:
    """`taskqueue serve` (API and a worker node) as a separate process."""

    def __init__(self, database_url: str, node_id: str) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        environment = {**os.environ, "DATABASE_URL": database_url, "TASKQUEUE_POLL_INTERVAL_SECONDS": "0.2"}
        self.process = subprocess.Popen(
            [TASKQUEUE, "serve", "--port", str(self.port), "--node-id", node_id],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        self.address = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.stderr()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://{self.address}/ready").status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("the API process never became ready")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
async def clean_url(migrated_url: str) -> str:
    """The module's database, emptied (each test runs its own service on it)."""
    import asyncpg

    from queue_service.db.engine import asyncpg_dsn
    from queue_service.settings import normalize_database_url

    connection = await asyncpg.connect(asyncpg_dsn(normalize_database_url(migrated_url)))
    try:
        await connection.execute(f"TRUNCATE {TABLES} CASCADE")
        await connection.execute("UPDATE dispatch_control SET paused = false")
        await connection.execute("UPDATE nodes SET status = 'stopped'")
    finally:
        await connection.close()
    return migrated_url


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": url, "poll_interval_seconds": 0.2, "node_id": "stream-node"}
    return Settings(**(values | overrides))


async def subscribe(address: str, query: str = "", **options: Any) -> ClientConnection:
    """A stream client, returned once the server confirms the subscription."""
    client = await connect(f"ws://{address}/jobs/stream{query}", **options)
    hello = json.loads(await client.recv())
    assert hello["event"] == "stream.subscribed", hello
    return client


async def collect(client: ClientConnection, done: Any, timeout: float = 60) -> list[dict[str, Any]]:
    """Job events until `done(events)` is true."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not done(events):
            event = json.loads(await client.recv())
            if event["event"] == "job.updated":
                events.append(event)
    return events


def quick(job_id: str, **simulate: Any) -> dict[str, Any]:
    sim = {"duration_seconds": 0.01} | simulate
    return {"job_id": job_id, "type": "stream_test", "payload": {"simulate": sim}}


async def test_a_job_whole_life_with_a_retry(clean_url: str) -> None:
    async with serving(settings_for(clean_url)) as (address, _):
        client = await subscribe(address, "?job_id=life")
        other = await subscribe(address, "?status=completed&type=stream_test")
        body = quick("life", fail_attempts=1) | {"retry_config": {"initial_delay_seconds": 0}}
        async with httpx.AsyncClient(base_url=f"http://{address}") as http:
            assert (await http.post("/jobs", json=body)).status_code == 201
            assert (await http.post("/jobs", json=quick("noise"))).status_code == 201
        events = await collect(client, lambda e: e and e[-1]["status"] == "completed")
        completed = await collect(other, lambda e: len(e) == 2)
        await client.close()
        await other.close()
    transitions = [(e["previous_status"], e["status"], e["attempt"]) for e in events]
    assert transitions == [
        (None, "ready", 0),
        ("ready", "running", 1),
        ("running", "retrying", 1),
        ("retrying", "ready", 1),
        ("ready", "running", 2),
        ("running", "completed", 2),
    ]
    assert {e["job_id"] for e in events} == {"life"}
    assert set(events[0]) == {"event", "job_id", "type", "priority", "status", "previous_status", "attempt", "at"}
    assert sorted(e["job_id"] for e in completed) == ["life", "noise"]


@pytest.mark.parametrize(
    "query",
    ["?status=finished", "?job_id=bad%20id", "?type=a&type=b", "?type=" + "x" * 65],
)
async def test_bad_filters_close_with_1008(clean_url: str, query: str) -> None:
    async with serving(settings_for(clean_url), run_worker=False) as (address, _):
        client = await connect(f"ws://{address}/jobs/stream{query}")
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert "invalid filter" in closed.value.rcvd.reason


async def test_api_keys_need_a_token(clean_url: str) -> None:
    async with serving(settings_for(clean_url, api_keys=("s3cret",)), run_worker=False) as (address, _):
        for query in ("", "?token=wrong"):
            client = await connect(f"ws://{address}/jobs/stream{query}")
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
        authorised = await subscribe(address, "?token=s3cret")
        await authorised.close()


async def test_heartbeat_pings_an_idle_stream(clean_url: str) -> None:
    async with serving(settings_for(clean_url, stream_heartbeat_seconds=0.2), run_worker=False) as (address, _):
        client = await subscribe(address)
        async with asyncio.timeout(5):
            ping = json.loads(await client.recv())
        await client.close()
    assert ping["event"] == "ping"
    assert ping["at"].endswith("Z")


async def test_a_slow_consumer_is_dropped_and_never_stalls_the_others(clean_url: str) -> None:
    jobs, batch_size = 3000, 500  # more than the slow client's socket buffers (a few kB) and its 2000 in the hub
    settings = settings_for(clean_url, stream_buffer=2000)
    async with serving(settings, run_worker=False, send_buffer=8192) as (address, app):
        # A consumer that completes the handshake and then never reads, with a tiny receive window.
        slow = socket.socket()
        try:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect, or the window is set
            slow.connect(("127.0.0.1", int(address.rsplit(":", 1)[1])))
            slow.sendall(
                b"GET /jobs/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert (await asyncio.to_thread(slow.recv, 4096)).startswith(b"HTTP/1.1 101")
            fast = await subscribe(address)
            received: list[dict[str, Any]] = []
            started = time.monotonic()
            async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as http:
                await http.post("/dispatch/pause")  # only submissions: one event per job
                # The fast consumer reads each batch's events as they come; the slow one falls
                # behind by a batch each time until the hub drops it. Neither waits for the other.
                for first in range(0, jobs, batch_size):
                    batch = [quick(f"slow-{i}") for i in range(first, first + batch_size)]
                    assert (await http.post("/jobs/batch", json=batch)).status_code == 201
                    received += await collect(fast, lambda e: len(e) == batch_size)
            elapsed = time.monotonic() - started
            hub: EventHub = app.state.stream_hub
            assert hub.clients_dropped == 1
            assert hub.client_count == 2  # the fast one, and the slow one until its close handshake ends
            await fast.close()
        finally:
            slow.close()
    assert [e["job_id"] for e in received] == [f"slow-{i}" for i in range(jobs)]
    assert elapsed < 30


async def test_every_change_of_many_jobs_through_two_api_processes(clean_url: str) -> None:
    """Jobs submitted to both processes, run by both nodes; a client on each sees every
    change of every job, in order per job, none missing."""
    jobs = int(os.environ.get("STREAM_TEST_JOBS", "1000"))
    first, second = ApiProcess(clean_url, "fan-a"), ApiProcess(clean_url, "fan-b")
    try:
        clients = [await subscribe(first.address), await subscribe(second.address)]
        expected = 3 * jobs  # ready, running, completed
        collectors = [asyncio.create_task(collect(c, lambda e: len(e) >= expected, timeout=120)) for c in clients]
        started = time.monotonic()
        for index, process in enumerate((first, second)):
            async with httpx.AsyncClient(base_url=f"http://{process.address}", timeout=60) as http:
                for start in range(index * jobs // 2, (index + 1) * jobs // 2, 250):
                    batch = [quick(f"fan-{i}") for i in range(start, min(start + 250, (index + 1) * jobs // 2))]
                    assert (await http.post("/jobs/batch", json=batch)).status_code == 201
        results = await asyncio.gather(*collectors)
        elapsed = time.monotonic() - started
        for client in clients:
            await client.close()
    finally:
        first.stop()
        second.stop()
    for events in results:
        by_job: dict[str, list[str]] = {}
        for event in events:
            by_job.setdefault(event["job_id"], []).append(event["status"])
        assert len(by_job) == jobs
        assert all(statuses == ["ready", "running", "completed"] for statuses in by_job.values())
        nodes = {e["job_id"] for e in events}
        assert len(nodes) == jobs
    print(f"\n{jobs} jobs, {3 * jobs} events to each of 2 clients through 2 API processes in {elapsed:.1f}s")
