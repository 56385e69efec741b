"""The worker runtime against a real database: sharing work between nodes, cancel,
lease recovery, graceful stop, fencing and timeouts."""

from __future__ import annotations

import asyncio
import contextvars
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.core.model import AttemptOutcome, Priority, Resources
from queue_service.core.policy import PolicyConfig, Reservation, Start, sort_key
from queue_service.core.validation import parse_job_spec
from queue_service.db import attempts, jobs
from queue_service.db.attempts import AttemptEnd
from queue_service.db.engine import asyncpg_dsn, autocommit, create_engine
from queue_service.db.events import StatusChange, notified_messages
from queue_service.db.listener import EventListener
from queue_service.settings import Settings, normalize_database_url
from queue_service.worker.handlers import HandlerRegistry, JobContext
from queue_service.worker.leader import Leader
from queue_service.worker.node import WorkerNode

pytestmark = pytest.mark.integration

NodeFactory = Callable[..., Awaitable[WorkerNode]]


def _settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "poll_interval_seconds": 0.2,
        "lease_seconds": 2.0,
        "shutdown_grace_seconds": 1.0,
        "db_pool_size": 4,
    }
    return Settings(**(values | overrides))


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    """A pool the size a node runs with: dispatch, completions and heartbeats at once."""
    engine = create_engine(_settings(migrated_url, db_pool_size=10))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def clean(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text("TRUNCATE jobs, job_dependencies, job_attempts, job_events, nodes CASCADE"))


@pytest.fixture
async def nodes(migrated_url: str, engine: AsyncEngine, clean: None) -> AsyncIterator[NodeFactory]:
    listener = EventListener(migrated_url)
    await listener.start()
    started: list[WorkerNode] = []

    async def start(node_id: str, cpu: int = 8, memory: int = 4096, **overrides: Any) -> WorkerNode:
        settings = _settings(migrated_url, node_cpu_units=cpu, node_memory_mb=memory, **overrides)
        node = WorkerNode(engine, settings, listener, node_id=node_id)
        await node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        if not node._stopping:
            await node.stop(0)
    await listener.stop()


async def insert_ready(engine: AsyncEngine, jobs: list[dict[str, Any]]) -> None:
    """Ready jobs inserted as submission would leave them (the API has its own tests)."""
    now = datetime.now(UTC)
    policy = Settings().policy_config()
    async with engine.begin() as conn:
        for job in jobs:
            priority = job.get("priority", "normal")
            await conn.execute(
                sa.text(
                    """
                    INSERT INTO jobs (job_id, type, priority, status, payload, cpu_units, memory_mb, max_attempts,
                        backoff_multiplier, initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds,
                        request_hash, attempt_budget, ready_at, sort_key)
                    VALUES (:id, 'work', :priority, 'ready', CAST(:payload AS jsonb), :cpu, :memory, :max_attempts,
                        2, :initial, 60, 0, :timeout, 'test', :max_attempts, :now, :key)
                    """
                ),
                {
                    "id": job["job_id"],
                    "priority": priority,
                    "payload": json.dumps({"simulate": job.get("simulate", {"duration_seconds": 0.01})}),
                    "cpu": job.get("cpu", 1),
                    "memory": job.get("memory", 128),
                    "max_attempts": job.get("max_attempts", 3),
                    "initial": job.get("initial_delay", 0.2),
                    "timeout": job.get("timeout", 30),
                    "now": now,
                    "key": sort_key(now.timestamp(), Priority(priority), policy),
                },
            )
        await conn.execute(sa.text("SELECT pg_notify('taskqueue_events', '{\"event\": \"dispatch.wake\"}')"))


async def insert_active_node(engine: AsyncEngine, node_id: str) -> None:
    """An active node of the default size using nothing, as registration leaves it."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, cpu_used, memory_used, status,"
                " started_at, heartbeat_at) VALUES (:node, 8, 4096, 0, 0, 'active', now(), now())"
            ),
            {"node": node_id},
        )


async def wait_for(engine: AsyncEngine, sql: str, expected: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    value: object = None
    while asyncio.get_running_loop().time() < deadline:
        async with engine.connect() as conn:
            value = (await conn.execute(sa.text(sql))).scalar()
        if value == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sql!r} gave {value!r}, waited for {expected!r}")


async def test_a_submission_wakes_a_node_at_once(nodes: NodeFactory, engine: AsyncEngine) -> None:
    """A lone submission's announcement of its ready job is what wakes the dispatchers: the
    job starts long before the node's poll interval (here a minute) would look."""
    await nodes("woken", poll_interval_seconds=60)
    await asyncio.sleep(0.2)  # the node's first claim, at start, found nothing
    spec = parse_job_spec({"type": "work", "payload": {"simulate": {"duration_seconds": 0}}}, default_job_id="woken-1")
    async with autocommit(engine) as conn:
        submitted = await jobs.submit_alone(
            conn, spec, "digest", datetime.now(UTC), PolicyConfig(), [Resources(8, 4096)]
        )
    assert submitted is not None
    await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'woken-1'", "completed", timeout=3)


async def test_a_claim_runs_what_it_started_even_if_its_connection_fails_on_return(
    nodes: NodeFactory, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's start is committed before its connection goes back to the driver pool;
    giving it back failing (the connection broke) must not leave what started unrun,
    holding the node's resources until its lease expires with no node to recover it."""
    await insert_ready(engine, [{"job_id": "started-1"}])
    give_back = asyncpg.pool.Pool.release
    failed: list[asyncpg.pool.Pool] = []

    async def breaking(pool: asyncpg.pool.Pool, connection: Any, *, timeout: float | None = None) -> None:
        await give_back(pool, connection, timeout=timeout)
        if not failed:
            failed.append(pool)
            raise ConnectionResetError("the connection broke on its way back")

    monkeypatch.setattr(asyncpg.pool.Pool, "release", breaking)
    await nodes("n1")  # its first claim, at start, takes the job
    await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'started-1'", "completed", timeout=5)
    assert failed


async def test_an_idle_node_that_knows_the_queue_starts_a_submission_without_reading_it(
    nodes: NodeFactory, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its last read reached the end of the queue, and every submission since announced
    what a plan needs: the node plans over what it knows and starts the job in one
    statement. It still starts in queue order: a critical job before a low one
    submitted ahead of it, once the single unit is free."""
    reads = 0
    claim_round = attempts.claim_round

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await claim_round(*args, **kwargs)

    monkeypatch.setattr(attempts, "claim_round", counted)
    await nodes("knowing", cpu=1, poll_interval_seconds=60)
    await wait_for(engine, "SELECT count(*) FROM nodes WHERE node_id = 'knowing'", 1)
    await asyncio.sleep(0.2)  # its first claim read the (empty) queue
    reads_before = reads

    def spec(job_id: str, seconds: float, priority: str = "normal") -> Any:
        document = {"type": "work", "priority": priority, "payload": {"simulate": {"duration_seconds": seconds}}}
        return parse_job_spec(document, default_job_id=job_id)

    async with autocommit(engine) as conn:
        await jobs.submit_alone(conn, spec("alone", 0.3), "d", datetime.now(UTC), PolicyConfig(), [Resources(1, 4096)])
    await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'alone'", "running", timeout=3)
    assert reads == reads_before  # started from what it knew
    async with engine.begin() as conn:  # while it runs: nothing fits, so nothing starts yet
        await jobs.submit(
            conn,
            [spec("low", 0, "low"), spec("critical", 0, "critical")],
            ["d", "d"],
            datetime.now(UTC),
            PolicyConfig(),
            [Resources(1, 4096)],
        )
    await wait_for(engine, "SELECT count(*) FROM jobs WHERE status = 'completed'", 3, timeout=10)
    async with engine.connect() as conn:
        order = (await conn.execute(sa.text("SELECT job_id FROM job_attempts ORDER BY started_at, job_id"))).scalars()
        assert list(order) == ["alone", "critical", "low"]


async def test_two_idle_nodes_that_know_the_queue_start_each_submission_once(
    nodes: NodeFactory, engine: AsyncEngine
) -> None:
    """Both know the queue and both try each lone submission from what they know: the
    start re-checks in the database, so one runs it; the other's view is forgotten and
    it reads the queue again. Each job runs once, and every one runs."""
    await nodes("left", cpu=2, poll_interval_seconds=60)
    await nodes("right", cpu=2, poll_interval_seconds=60)
    await wait_for(engine, "SELECT count(*) FROM nodes", 2)
    await asyncio.sleep(0.2)  # their first claims read the (empty) queue
    for index in range(40):
        document = {"type": "work", "payload": {"simulate": {"duration_seconds": 0.01}}}
        spec = parse_job_spec(document, default_job_id=f"raced-{index:02d}")
        async with autocommit(engine) as conn:
            await jobs.submit_alone(conn, spec, "d", datetime.now(UTC), PolicyConfig(), [Resources(2, 4096)])
        await asyncio.sleep(0.005)
    await wait_for(engine, "SELECT count(*) FROM jobs WHERE status = 'completed'", 40, timeout=20)
    async with engine.connect() as conn:
        attempts_made = (await conn.execute(sa.text("SELECT count(*) FROM job_attempts"))).scalar_one()
        used = (await conn.execute(sa.text("SELECT sum(cpu_used) + sum(memory_used) FROM nodes"))).scalar()
    assert attempts_made == 40
    assert used == 0


async def test_an_attempt_cancelled_before_its_task_began_frees_its_resources(
    nodes: NodeFactory, engine: AsyncEngine
) -> None:
    """A cancel announcement can be handled between a claim's launch and its task's
    first step: the attempt never runs its handler, and the node does not go on
    counting its resources as used."""
    node = await nodes("early", cpu=1, poll_interval_seconds=60)
    handled: list[str] = []

    async def work(job: JobContext) -> None:
        handled.append(job.job_id)

    node.registry = HandlerRegistry()
    node.registry.register("work", work)
    now = datetime.now(UTC)
    claim = attempts.Claim("early-1", "work", "normal", {}, 1, uuid.uuid4(), 30.0, Resources(1, 64), False, now, now)
    node._launch([claim], 0.0, node._pause_notices)
    node._stop_attempt("early-1", "cancelled")  # in the same step as the launch
    async with asyncio.timeout(2):
        while "early-1" in node.running:
            await asyncio.sleep(0.01)
    assert not node._full()
    assert handled == []


def count_claims(node: WorkerNode, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """From now on, count the node's claims (a read of the queue, or a start of what it
    knows): the returned function tells how many so far."""
    calls = 0
    claim = node._claim_and_launch

    async def counted(**kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        await claim(**kwargs)

    monkeypatch.setattr(node, "_claim_and_launch", counted)
    return lambda: calls


@asynccontextmanager
async def dispatch_paused(engine: AsyncEngine) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Dispatch paused for the block, which may resume it with the function it is given;
    resumed at the end either way, so a failing test leaves no other paused."""

    async def set_paused(paused: bool) -> None:
        async with engine.begin() as conn:
            await attempts.set_paused(conn, paused)

    await set_paused(True)
    try:
        yield lambda: set_paused(False)
    finally:
        await set_paused(False)


async def test_a_paused_node_claims_once_not_per_submission_and_a_resume_starts_it_at_once(
    nodes: NodeFactory, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused, every submission's wake notice would be a claim transaction that only finds
    dispatch paused: the node remembers and waits for the resume notice (or its poll
    interval, here longer than the test), which starts the waiting jobs at once."""
    async with dispatch_paused(engine) as resume:
        node = await nodes("paused", poll_interval_seconds=60)
        claims = count_claims(node, monkeypatch)
        for index in range(40):
            await insert_ready(engine, [{"job_id": f"held-{index:02d}"}])  # each with its wake notice
        await asyncio.sleep(0.5)
        assert claims() <= 2  # the start's, which found dispatch paused, and a wake before its answer
        await resume()
        await wait_for(engine, "SELECT count(*) FROM jobs WHERE status = 'completed'", 40, timeout=5)


async def test_a_node_that_hears_dispatch_paused_tries_no_start_until_resumed(
    nodes: NodeFactory, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause is announced: an idle node that knows the queue stops starting submissions
    at once, rather than after a start that finds dispatch paused. Such a start, planned
    from what the node knew then, could reach the database just after a resume and start
    a job ahead of the higher-priority ones submitted meanwhile."""
    node = await nodes("hears-pause", poll_interval_seconds=60)
    await insert_ready(engine, [{"job_id": "before-pause"}])
    await wait_for(engine, "SELECT count(*) FROM jobs WHERE status = 'completed'", 1, timeout=5)
    tries = count_claims(node, monkeypatch)
    async with dispatch_paused(engine) as resume:
        for index, priority in enumerate(["low", "normal", "high", "critical"]):
            await insert_ready(engine, [{"job_id": f"paused-{index}", "priority": priority}])
        await asyncio.sleep(0.3)
        assert tries() == 0
        await resume()
        await wait_for(engine, "SELECT count(*) FROM jobs WHERE status = 'completed'", 5, timeout=5)


async def test_a_node_runs_one_claim_at_a_time(
    engine: AsyncEngine, nodes: NodeFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatch loop and the recorder both claim, and a claim plans from a read
    that locks nothing: two at once would plan the same free units (backfilling
    different jobs from different views, the second's starts would break the node's
    CHECK). So a node runs its claims one after another, whoever asks."""
    in_flight, most = 0, 0
    claiming: contextvars.ContextVar[bool] = contextvars.ContextVar("claiming", default=False)

    def watched(step: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """A claim reads then starts, or starts from what the node knows: either is one."""

        async def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal in_flight, most
            if claiming.get():  # the start of a claim already counted
                return await step(*args, **kwargs)
            token = claiming.set(True)
            in_flight += 1
            most = max(most, in_flight)
            try:
                await asyncio.sleep(0.005)  # between the caller's ask and the database: room for another claim
                return await step(*args, **kwargs)
            finally:
                in_flight -= 1
                claiming.reset(token)

        return call

    monkeypatch.setattr(attempts, "claim_round", watched(attempts.claim_round))
    monkeypatch.setattr(attempts, "start_planned", watched(attempts.start_planned))
    node = await nodes("busy", cpu=3, memory=2048, poll_interval_seconds=60)
    await asyncio.gather(*(node._claim_and_launch() for _ in range(3)))
    assert most == 1
    # Sizes of 1 to 3 units; each insert's notice wakes the dispatch loop while the recorder claims.
    for first in range(0, 150, 3):
        await insert_ready(
            engine,
            [
                {"job_id": f"short_{i:03d}", "cpu": 1 + i * 7 % 3, "simulate": {"duration_seconds": 0}}
                for i in range(first, first + 3)
            ],
        )
    await wait_for(engine, "SELECT count(*) FROM jobs WHERE status = 'completed'", 150, timeout=60)
    async with engine.connect() as conn:
        attempts_made = (await conn.execute(sa.text("SELECT count(*) FROM job_attempts"))).scalar_one()
    assert attempts_made == 150
    assert most == 1
    assert not [r for r in caplog.records if r.name == node.__module__ and r.levelname == "ERROR"]


async def test_two_nodes_share_work_without_running_anything_twice(engine: AsyncEngine, nodes: NodeFactory) -> None:
    await nodes("node-a", cpu=4, memory=2048)
    await nodes("node-b", cpu=4, memory=2048)
    await insert_ready(engine, [{"job_id": f"job_{i:03d}", "simulate": {"duration_seconds": 0.02}} for i in range(200)])
    await wait_for(engine, "SELECT count(*) FROM jobs WHERE status = 'completed'", 200, timeout=60)
    async with engine.connect() as conn:
        per_job = (await conn.execute(sa.text("SELECT max(attempts), min(attempts) FROM jobs"))).one()
        per_node: dict[str, int] = dict(
            (await conn.execute(sa.text("SELECT node_id, count(*) FROM job_attempts GROUP BY node_id"))).all()
        )
        rows = (await conn.execute(sa.text("SELECT node_id, started_at, ended_at FROM job_attempts"))).all()
        used = (await conn.execute(sa.text("SELECT sum(cpu_used) + sum(memory_used) FROM nodes"))).scalar()
    assert tuple(per_job) == (1, 1)  # no attempt ran twice
    assert set(per_node) == {"node-a", "node-b"}
    assert sum(per_node.values()) == 200
    assert used == 0
    for node_id in per_node:  # a sweep over each node's attempt intervals: never above 4 CPU
        events = sorted(
            [(r.started_at, 1) for r in rows if r.node_id == node_id]
            + [(r.ended_at, -1) for r in rows if r.node_id == node_id],
            key=lambda e: (e[0], e[1]),
        )
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        assert peak <= 4


async def test_cancel_stops_a_running_attempt_within_a_second(engine: AsyncEngine, nodes: NodeFactory) -> None:
    node = await nodes("node-c")
    await insert_ready(engine, [{"job_id": "long", "simulate": {"duration_seconds": 60}, "cpu": 3}])
    await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'long'", "running")
    async with engine.begin() as conn:
        await attempts.cancel_job(conn, "long", datetime.now(UTC))
    started = asyncio.get_running_loop().time()
    while "long" in node.running:
        await asyncio.sleep(0.02)
        assert asyncio.get_running_loop().time() - started < 1.0
    async with engine.connect() as conn:
        used = (await conn.execute(sa.text("SELECT cpu_used FROM nodes WHERE node_id = 'node-c'"))).scalar()
        outcome = (await conn.execute(sa.text("SELECT outcome FROM job_attempts WHERE job_id = 'long'"))).scalar()
    assert used == 0
    assert outcome == "cancelled"


async def test_a_dead_workers_attempt_is_recovered_after_its_lease(
    engine: AsyncEngine, nodes: NodeFactory, migrated_url: str
) -> None:
    """A node that vanished mid-attempt: its lease lapses, the attempt counts as
    worker_lost, its resources are freed and another node retries the job."""
    expired = datetime.now(UTC) - timedelta(seconds=1)
    token = uuid.uuid4()
    await insert_ready(engine, [{"job_id": "orphan", "cpu": 2, "simulate": {"duration_seconds": 0.05}}])
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, cpu_used, memory_used) "
                "VALUES ('ghost', 8, 4096, 2, 128)"
            )
        )
        await conn.execute(
            sa.text(
                "UPDATE jobs SET status = 'running', attempts = 1, worker_id = 'ghost', started_at = :t, "
                "lease_token = :token, lease_expires_at = :t WHERE job_id = 'orphan'"
            ),
            {"t": expired, "token": token},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token) "
                "VALUES ('orphan', 1, 'ghost', :t, :token)"
            ),
            {"t": expired, "token": token},
        )
    await nodes("node-d", lease_seconds=1.0)
    leader = Leader(engine, migrated_url, _settings(migrated_url, lease_seconds=1.0), "node-d")
    await leader.start()  # the reaper is a leader duty
    try:
        await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'orphan'", "completed")
    finally:
        await leader.stop()
    async with engine.connect() as conn:
        outcomes = (
            await conn.execute(
                sa.text("SELECT outcome, node_id FROM job_attempts WHERE job_id = 'orphan' ORDER BY attempt")
            )
        ).all()
        ghost_used = (await conn.execute(sa.text("SELECT cpu_used FROM nodes WHERE node_id = 'ghost'"))).scalar()
    assert [tuple(o) for o in outcomes] == [("worker_lost", "ghost"), ("succeeded", "node-d")]
    assert ghost_used == 0


async def test_graceful_stop_puts_a_running_attempt_back_in_the_queue(engine: AsyncEngine, nodes: NodeFactory) -> None:
    node = await nodes("node-e")
    await insert_ready(engine, [{"job_id": "slow", "simulate": {"duration_seconds": 30}}])
    await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'slow'", "running")
    await node.stop(0.2)
    async with engine.connect() as conn:
        job = (
            await conn.execute(sa.text("SELECT status, attempts, counted_attempts FROM jobs WHERE job_id = 'slow'"))
        ).one()
        outcome = (await conn.execute(sa.text("SELECT outcome FROM job_attempts WHERE job_id = 'slow'"))).scalar()
    assert tuple(job) == ("ready", 1, 0)  # numbered attempt 1, not counted against max_attempts
    assert outcome == AttemptOutcome.INTERRUPTED.value


async def test_a_stale_worker_cannot_end_an_attempt_it_no_longer_owns(engine: AsyncEngine, nodes: NodeFactory) -> None:
    await nodes("node-f")
    await insert_ready(engine, [{"job_id": "fenced", "simulate": {"duration_seconds": 30}}])
    await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'fenced'", "running")
    async with engine.begin() as conn:
        owned = await attempts.end_attempt(
            conn,
            "fenced",
            uuid.uuid4(),
            AttemptEnd(AttemptOutcome.SUCCEEDED),
            datetime.now(UTC),
            Settings().policy_config(),
        )
    assert owned is False
    await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'fenced'", "running", timeout=1)


async def test_a_timed_out_attempt_is_retried(engine: AsyncEngine, nodes: NodeFactory) -> None:
    await nodes("node-g")
    job = {
        "job_id": "overrun",
        "timeout": 0.3,
        "initial_delay": 0.1,
        "simulate": {"duration_seconds": 0.05, "timeout_attempts": 1},
    }
    await insert_ready(engine, [job])
    await wait_for(engine, "SELECT status FROM jobs WHERE job_id = 'overrun'", "completed")
    async with engine.connect() as conn:
        outcomes = (
            (await conn.execute(sa.text("SELECT outcome FROM job_attempts WHERE job_id = 'overrun' ORDER BY attempt")))
            .scalars()
            .all()
        )
    assert outcomes == ["timed_out", "succeeded"]


async def test_a_dependant_of_two_parents_ending_in_one_batch_becomes_ready(engine: AsyncEngine, clean: None) -> None:
    """Batched endings count every completed parent of a shared dependant."""
    now = datetime.now(UTC)
    tokens = {"left": uuid.uuid4(), "right": uuid.uuid4()}
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, cpu_used, memory_used) "
                "VALUES ('batch-node', 8, 4096, 2, 256)"
            )
        )
        for name, token in tokens.items():
            await conn.execute(
                sa.text(
                    "INSERT INTO jobs (job_id, type, priority, status, cpu_units, memory_mb, max_attempts, "
                    "backoff_multiplier, initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, "
                    "request_hash, attempts, attempt_budget, started_at, worker_id, lease_token, lease_expires_at) "
                    "VALUES (:id, 'work', 'normal', 'running', 1, 128, 3, 2, 1, 60, 0, 30, 'h', 1, 3, :now, "
                    "'batch-node', :token, :until)"
                ),
                {"id": name, "now": now, "token": token, "until": now + timedelta(seconds=30)},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO job_attempts (job_id, attempt, node_id, started_at, lease_token) "
                    "VALUES (:id, 1, 'batch-node', :now, :token)"
                ),
                {"id": name, "now": now, "token": token},
            )
        await conn.execute(
            sa.text(
                "INSERT INTO jobs (job_id, type, priority, status, cpu_units, memory_mb, max_attempts, "
                "backoff_multiplier, initial_delay_seconds, max_delay_seconds, jitter, timeout_seconds, "
                "request_hash, attempt_budget, unfinished_deps) "
                "VALUES ('child', 'work', 'normal', 'blocked', 1, 128, 3, 2, 1, 60, 0, 30, 'h', 3, 2)"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO job_dependencies (job_id, depends_on_job_id) VALUES ('child', 'left'), ('child', 'right')"
            )
        )
    endings = [attempts.Ending(name, token, AttemptEnd(AttemptOutcome.SUCCEEDED)) for name, token in tokens.items()]
    async with engine.begin() as conn:
        owned = await attempts.end_attempts(conn, endings, datetime.now(UTC), Settings().policy_config())
    assert owned == [True, True]
    async with engine.connect() as conn:
        child = (await conn.execute(sa.text("SELECT status, unfinished_deps FROM jobs WHERE job_id = 'child'"))).one()
        used = (
            await conn.execute(sa.text("SELECT cpu_used, memory_used FROM nodes WHERE node_id = 'batch-node'"))
        ).one()
    assert tuple(child) == ("ready", 0)
    assert tuple(used) == (0, 0)


async def test_a_heartbeat_locks_jobs_in_the_order_the_recorder_does(
    engine: AsyncEngine, clean: None, migrated_url: str
) -> None:
    """Renewing leases locks the node's running jobs, as recording their ends does (in id
    order). Locked in the order the rows lie on disk instead, a heartbeat and the recorder
    deadlocked: each held a job the other waited for (seen in a 64-unit drain), and the
    deadlock check held both for a second before failing one."""
    node_id = "beating"
    await insert_active_node(engine, node_id)
    await insert_ready(engine, [{"job_id": "job_a"}, {"job_id": "job_b"}])
    async with autocommit(engine) as conn:
        claimed = await attempts.claim_round(conn, node_id, lambda: datetime.now(UTC), Settings().policy_config(), 30)
        claims = claimed.claims
        assert claims is not None
        # job_a's row moves past job_b's on disk (a new version, not a HOT one): disk order is no longer id order.
        await conn.execute(
            sa.text("UPDATE jobs SET created_at = created_at - interval '1 second' WHERE job_id = 'job_a'")
        )
    tokens = {claim.job_id: claim.lease_token for claim in claims}
    assert set(tokens) == {"job_a", "job_b"}

    recorder = await asyncpg.connect(asyncpg_dsn(normalize_database_url(migrated_url)))
    try:
        await recorder.execute("SET deadlock_timeout = '50ms'")  # this side detects a cycle, fast
        transaction = recorder.transaction()
        await transaction.start()
        await recorder.execute("SELECT 1 FROM jobs WHERE job_id = 'job_a' FOR UPDATE")

        async def beat() -> set[uuid.UUID]:
            async with engine.begin() as conn:
                return await attempts.renew_leases(conn, node_id, list(tokens.values()), datetime.now(UTC), 30)

        heartbeat = asyncio.create_task(beat())
        await asyncio.sleep(0.3)  # the heartbeat now waits for job_a (holding job_b too, if it went by disk order)
        await recorder.execute("SELECT 1 FROM jobs WHERE job_id = 'job_b' FOR UPDATE")  # the recorder's next lock
        await transaction.commit()
        assert await asyncio.wait_for(heartbeat, 5) == set(tokens.values())
    finally:
        await recorder.close()


async def test_a_start_logs_and_announces_each_job_as_the_log_and_stream_promise(
    engine: AsyncEngine, clean: None, migrated_url: str
) -> None:
    """The start function writes each job's `dispatched` and `started` entries (saying
    whether it went in queue order or backfilled past whom) and announces it with the
    payload events.StatusChange gives, in the order of the plan."""
    node_id = "logging-node"
    await insert_active_node(engine, node_id)
    await insert_ready(engine, [{"job_id": "job_b", "priority": "high"}, {"job_id": "job_a", "cpu": 2, "memory": 256}])
    heard: list[dict[str, Any]] = []
    listening = await asyncpg.connect(asyncpg_dsn(normalize_database_url(migrated_url)))
    await listening.add_listener("taskqueue_events", lambda *args: heard.extend(notified_messages(args[-1])))
    now = datetime.now(UTC)
    queued = {
        job_id: attempts.Queued(job_id, "work", priority, 0, 0.0, cpu, memory, 30.0, now)
        for job_id, priority, cpu, memory in (("job_b", "high", 1, 128), ("job_a", "normal", 2, 256))
    }
    passed = Reservation("job_x", now.timestamp() + 60, Resources(1, 128))
    starts = [Start("job_b", Resources(1, 128), 0.0), Start("job_a", Resources(2, 256), 0.0, passed)]
    try:
        async with autocommit(engine) as conn:
            claims = await attempts.start_planned(conn, node_id, starts, queued, now, 30)
        async with asyncio.timeout(10):
            while len([m for m in heard if m.get("event") == "job.updated"]) < 2:
                await asyncio.sleep(0.01)
    finally:
        await listening.close()
    assert [(c.job_id, c.attempt, c.backfilled) for c in claims] == [("job_b", 1, False), ("job_a", 1, True)]
    expected = [
        StatusChange(job_id, "work", priority, "running", "ready", 1, now).payload()
        for job_id, priority in (("job_b", "high"), ("job_a", "normal"))
    ]
    assert [m for m in heard if m.get("event") == "job.updated"] == expected
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT job_id, attempt, level, event, message, data, at FROM job_log"
                    " ORDER BY job_id DESC, at, step, seq"
                )
            )
        ).all()
    assert [tuple(row[:6]) for row in rows if row.event in ("dispatched", "started")] == [
        ("job_b", 1, "info", "dispatched", f"to {node_id} (in queue order)",
         {"node": node_id, "cpu_units": 1, "memory_mb": 128, "backfill": False}),
        ("job_b", 1, "info", "started", "attempt 1 started", {}),
        ("job_a", 1, "info", "dispatched", f"to {node_id} (backfilled past job_x)",
         {"node": node_id, "cpu_units": 2, "memory_mb": 256, "backfill": True}),
        ("job_a", 1, "info", "started", "attempt 1 started", {}),
    ]  # fmt: skip
    assert {row.at for row in rows if row.event in ("dispatched", "started")} == {now}
