"""A network partition of one worker from the database, through a TCP proxy the test
controls: the worker's packets stop arriving (nothing is closed, as when a link
drops), its lease expires, the leader returns its job to the queue, another node
runs it to completion, and when the link comes back the partitioned worker's late
completion is refused by the fencing token. The partitioned worker does not hang:
its statements time out, and once healed it takes work again.

Three `taskqueue worker` processes: `leader` (1 CPU, started first, so it holds the
leader lock and reaps; too small for the job), `cut` (through the proxy) and,
once the partition begins, `rescuer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.api.submission import parse_one
from queue_service.core.model import Resources
from queue_service.db import jobs
from queue_service.db.engine import create_engine
from queue_service.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TASKQUEUE = str(Path(sys.executable).parent / "taskqueue")
LEASE_SECONDS = 1.5
COMMAND_TIMEOUT_SECONDS = 1.0
JOB_SECONDS = 3.0


class PartitionProxy:
    """Relays TCP between clients and one server until `partition()`: from then on
    bytes are read and dropped in both directions (a black hole: no FIN, no RST, so
    only timeouts notice). `heal()` resets the connections that lived through it, as
    TCP does once its retransmissions give up, and relays new ones again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        # A host that is a directory is a Unix socket (the embedded server's), as in libpq.
        self.target = (target_host, target_port)
        self.partitioned = False
        self.connections: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._reset_all()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def partition(self) -> None:
        self.partitioned = True

    def heal(self) -> None:
        self._reset_all()
        self.partitioned = False

    def _reset_all(self) -> None:
        for writer in list(self.connections):
            writer.transport.abort()
        self.connections.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.partitioned:  # the SYN is answered by our kernel; the startup packet goes nowhere
            self.connections.add(client_writer)
            await self._drain_into_void(client_reader)
            return
        try:
            host, port = self.target
            if host.startswith("/"):
                server_reader, server_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                server_reader, server_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.transport.abort()
            return
        self.connections |= {client_writer, server_writer}
        pipes = {
            asyncio.ensure_future(self._pipe(client_reader, server_writer)),
            asyncio.ensure_future(self._pipe(server_reader, client_writer)),
        }
        # One side closing closes the other, as it would without us in between.
        _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pending:
            pipe.cancel()
        for writer in (client_writer, server_writer):
            self.connections.discard(writer)
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not self.partitioned:
                    writer.write(data)
                    await writer.drain()

    @staticmethod
    async def _drain_into_void(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass


@contextlib.asynccontextmanager
async def proxy_to(url: str) -> AsyncIterator[tuple[PartitionProxy, str]]:
    parsed = make_url(url)
    socket_dir = parsed.query.get("host")
    host = socket_dir if isinstance(socket_dir, str) else parsed.host or "127.0.0.1"
    proxy = PartitionProxy(host, parsed.port or 5432)
    port = await proxy.start()
    through_proxy = parsed.difference_update_query(["host"]).set(host="127.0.0.1", port=port)
    try:
        yield proxy, through_proxy.render_as_string(hide_password=False)
    finally:
        await proxy.stop()


class Worker:
    def __init__(self, url: str, node_id: str, cpu: int) -> None:
        # Appending: the test reads it while the process writes, and a shared offset
        # moved back by a read must not make the process overwrite what it wrote.
        self.log = tempfile.TemporaryFile(mode="a+b")  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "TASKQUEUE_LEASE_SECONDS": str(LEASE_SECONDS),
            "TASKQUEUE_POLL_INTERVAL_SECONDS": "0.2",
            "TASKQUEUE_LEADER_INTERVAL_SECONDS": "0.3",
            "TASKQUEUE_DB_CONNECT_TIMEOUT_SECONDS": str(COMMAND_TIMEOUT_SECONDS),
            "TASKQUEUE_DB_COMMAND_TIMEOUT_SECONDS": str(COMMAND_TIMEOUT_SECONDS),
        }
        self.process = subprocess.Popen(
            [TASKQUEUE, "worker", "--node-id", node_id, "--cpu-units", str(cpu), "--memory-mb", str(cpu * 512)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def stop(self) -> str:
        """SIGTERM, wait, and the process's log lines (JSON on stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.exit_code = self.process.returncode
        self.log.seek(0)
        text = self.log.read().decode("utf-8", "replace")
        self.log.close()
        return text


async def submit(engine: AsyncEngine, body: dict[str, Any]) -> None:
    settings = Settings()
    spec, hints = parse_one(body)
    async with engine.begin() as conn:
        await jobs.submit(conn, [spec], [hints], datetime.now(UTC), settings.policy_config(), [Resources(8, 4096)])


async def wait_for(engine: AsyncEngine, sql: str, params: dict[str, Any], timeout: float = 30) -> Any:
    """Poll `sql` until it returns a row; that row's first value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with engine.connect() as conn:
            value = (await conn.execute(sa.text(sql), params)).scalar()
        if value is not None:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {sql} {params}")


async def attempt_rows(engine: AsyncEngine, job_id: str) -> list[tuple[int, str, str | None]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT attempt, node_id, outcome FROM job_attempts WHERE job_id = :job ORDER BY attempt"),
            {"job": job_id},
        )
        return [(attempt, node, outcome) for attempt, node, outcome in rows]


async def test_partitioned_worker_loses_its_job_and_its_late_completion_is_fenced(migrated_url: str) -> None:
    engine = create_engine(Settings(database_url=migrated_url))
    workers: dict[str, Worker] = {}
    logs: dict[str, str] = {}
    exit_codes: dict[str, int | None] = {}
    try:
        async with proxy_to(migrated_url) as (proxy, proxied_url):
            workers["leader"] = Worker(migrated_url, "leader", 1)
            await wait_for(engine, "SELECT 1 FROM nodes WHERE node_id = 'leader'", {})
            await asyncio.sleep(1)  # it has taken the leader lock before anyone else runs
            workers["cut"] = Worker(proxied_url, "cut", 8)
            await submit(
                engine,
                {
                    "job_id": "p-job",
                    "type": "partition",
                    "payload": {"simulate": {"duration_seconds": JOB_SECONDS}},
                    "resource_requirements": {"cpu_units": 2, "memory_mb": 256},
                    "retry_config": {"max_attempts": 3, "initial_delay_seconds": 0.1},
                },
            )
            await wait_for(engine, "SELECT 1 FROM job_attempts WHERE job_id = 'p-job' AND node_id = 'cut'", {})

            proxy.partition()
            cut_at = time.monotonic()
            workers["rescuer"] = Worker(migrated_url, "rescuer", 8)
            await wait_for(engine, "SELECT 1 FROM jobs WHERE job_id = 'p-job' AND status = 'completed'", {})
            rescued_after = time.monotonic() - cut_at
            # The cut worker's handler has ended by now (it ran JOB_SECONDS); its
            # recorder is still retrying into the void. Let the link come back.
            assert rescued_after > JOB_SECONDS - 1
            proxy.heal()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                workers["cut"].log.seek(0)
                if b"ended after losing its lease" in workers["cut"].log.read():
                    break
                await asyncio.sleep(0.2)

            # Healed, the cut worker takes work again: the only node with room for it.
            rescuer = workers.pop("rescuer")
            logs["rescuer"] = rescuer.stop()
            exit_codes["rescuer"] = rescuer.exit_code
            await submit(engine, {"job_id": "p-after", "type": "partition", "resource_requirements": {"cpu_units": 2}})
            after_node = await wait_for(
                engine, "SELECT worker_id FROM jobs WHERE job_id = 'p-after' AND status = 'completed'", {}
            )
            attempts = await attempt_rows(engine, "p-job")
            async with engine.connect() as conn:
                job = (
                    (await conn.execute(sa.text("SELECT status, attempts, result FROM jobs WHERE job_id = 'p-job'")))
                    .mappings()
                    .one()
                )
    finally:
        for name, worker in workers.items():
            logs[name] = worker.stop()
            exit_codes[name] = worker.exit_code
        await engine.dispose()
        for name, text in logs.items():  # shown by pytest when the test fails
            print(f"--- {name} ---\n{text[-3000:]}")

    refused = [
        json.loads(line)
        for line in logs["cut"].splitlines()
        if line.startswith("{") and "ended after losing its lease" in line
    ]
    print(f"\npartition: rescued {rescued_after:.1f}s after the cut; attempts {attempts}; refused {len(refused)}")
    assert attempts == [(1, "cut", "worker_lost"), (2, "rescuer", "succeeded")]
    assert job["status"] == "completed"
    assert job["attempts"] == 2
    assert len(refused) == 1  # the late success was written nowhere
    assert "p-job" in refused[0]["message"]
    assert after_node == "cut"
    # Stopped after the proxy, and so the database, had gone: it still exits cleanly.
    assert exit_codes == {"leader": 0, "cut": 0, "rescuer": 0}, exit_codes
