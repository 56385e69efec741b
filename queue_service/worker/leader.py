"""Single-leader duties (SPEC §10, §11): one process among all worker nodes runs
the lease reaper, cron firing, queue-counter compaction with the VACUUM it calls for,
fresh statistics, and the VACUUM of the queue tables that running jobs churn.

Leadership is a PostgreSQL session advisory lock held on a connection of its own
(not a pooled one, which would hand the lock to whoever borrows it next). Every
worker process runs a `Leader`; the one whose `pg_try_advisory_lock` succeeds
leads, the others retry every `leader_interval_seconds`. The lock belongs to the
session, so it goes when the leader does: a clean stop closes the connection, a
killed process's socket is closed by its kernel, and a vanished host is found out
by the TCP keepalives set below. A standby then takes over at its next try.

The duties do not rely on the lock for correctness, only for economy: each is
safe if two processes ever overlap (the old leader finishing a tick while its
lost connection is noticed). The reaper locks rows with SKIP LOCKED and ends
attempts fenced; firing locks schedule rows and cron job ids are primary keys;
compaction takes its own transaction lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from queue_service.db import attempts, insight, jobs, retention, schedules
from queue_service.db.engine import asyncpg_dsn, autocommit
from queue_service.observability.metrics import FOLD_INTERVAL_SECONDS
from queue_service.settings import Settings
from queue_service.timeouts import event_set_within, stop_tasks

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
LEADER_LOCK_KEY: Final = 0x7461736B_6C656164  # "tasklead": any stable 64-bit number
LEADER_APPLICATION_PREFIX: Final = "taskqueue-leader:"  # pg_stat_activity shows who leads
MAX_REAPER_INTERVAL_SECONDS: Final = 5.0
CONNECT_TIMEOUT_SECONDS: Final = 10.0
RETENTION_INTERVAL_SECONDS: Final = 60.0  # how often the leader purges old finished jobs
# How often the leader vacuums what folding churned (only if it folded meanwhile):
# a few ms each time, against a position read that slows by ~0.1 ms per 5,000 dead rows.
VACUUM_INTERVAL_SECONDS: Final = 2.0
STATISTICS_INTERVAL_SECONDS: Final = 2.0  # how often the leader looks for queue tables a burst left unanalysed
CHURN_VACUUM_INTERVAL_SECONDS: Final = 5.0  # how often it looks for queue tables churn left full of dead rows
# A leader whose host vanishes without closing its socket loses the lock after
# about idle + interval × count seconds (TCP only; a Unix socket closes with the process).
KEEPALIVES: Final = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3"}


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Duty:
    name: str
    interval: float
    run: Callable[[AsyncConnection, datetime], Awaitable[None]]
    autocommit: bool = False  # run outside a transaction (VACUUM cannot run in one)
    last_run: float = float("-inf")


@dataclass
class Leader:
    """A candidate for leadership; `start()` runs it in the background until `stop()`."""

    engine: AsyncEngine
    database_url: str
    settings: Settings
    node_id: str
    clock: Clock = utc_now
    terms: int = 0  # how many times this candidate became leader
    leading: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self.policy = self.settings.policy_config()
        reaper_interval = min(self.settings.lease_seconds / 2, MAX_REAPER_INTERVAL_SECONDS)
        self.duties = [
            _Duty("lease reaper", reaper_interval, self._reap),
            _Duty("cron", self.settings.leader_interval_seconds, self._fire_schedules),
            _Duty("counter compaction", FOLD_INTERVAL_SECONDS, self._compact),
            _Duty("statistics", STATISTICS_INTERVAL_SECONDS, self._refresh_statistics),
            _Duty("vacuum after folding", VACUUM_INTERVAL_SECONDS, self._vacuum_folded, autocommit=True),
            _Duty("vacuum after churn", CHURN_VACUUM_INTERVAL_SECONDS, self._vacuum_churned, autocommit=True),
        ]
        self._folded_since_vacuum = False
        if self.settings.retention_seconds is not None:
            self.duties.append(_Duty("retention purge", RETENTION_INTERVAL_SECONDS, self._purge))

    @property
    def is_leader(self) -> bool:
        return self.leading.is_set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.node_id}:leader")

    async def stop(self) -> None:
        """Stop leading or waiting; closing the connection releases the lock at once."""
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None

    async def drop_connection(self) -> None:
        """Lose the lock connection abruptly, as a crash would (for fail-over tests)."""
        if self._connection is not None:
            self._connection.terminate()

    # ------------------------------------------------------------------ election
    async def _run(self) -> None:
        while True:
            try:
                await self._campaign()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("leader candidate %s lost its connection: %s", self.node_id, error)
            except Exception:  # a candidate must never die quietly: stand again after a pause
                log.exception("leader candidate %s failed", self.node_id)
            finally:
                if self.leading.is_set():
                    log.warning("node %s is no longer the leader", self.node_id)
                self.leading.clear()
                await self._close()
            await asyncio.sleep(self.settings.leader_interval_seconds)

    async def _campaign(self) -> None:
        self._connection = connection = await asyncpg.connect(
            asyncpg_dsn(self.database_url),
            timeout=CONNECT_TIMEOUT_SECONDS,
            server_settings={"application_name": LEADER_APPLICATION_PREFIX + self.node_id[:40], **KEEPALIVES},
        )
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        while not await connection.fetchval(
            "SELECT pg_try_advisory_lock($1)", LEADER_LOCK_KEY, timeout=CONNECT_TIMEOUT_SECONDS
        ):
            await self._wait(lost, self.settings.leader_interval_seconds)
        self.terms += 1
        self.leading.set()
        log.info("node %s is the leader (term %d)", self.node_id, self.terms)
        while True:
            await self._run_due_duties()
            # A round trip on the lock's own connection: if it is gone, so is the lock.
            await connection.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_SECONDS)
            await self._wait(lost, self.settings.leader_interval_seconds)

    @staticmethod
    async def _wait(lost: asyncio.Event, seconds: float) -> None:
        if await event_set_within(lost, seconds):
            raise ConnectionError("the leader lock's connection closed")

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):  # it may be half dead already; the lock goes with it either way
                await connection.close(timeout=CONNECT_TIMEOUT_SECONDS)
            if not connection.is_closed():
                connection.terminate()

    # -------------------------------------------------------------------- duties
    async def _run_due_duties(self) -> None:
        for duty in self.duties:
            if time.monotonic() - duty.last_run < duty.interval:
                continue
            duty.last_run = time.monotonic()
            try:
                unit_of_work = autocommit(self.engine) if duty.autocommit else self.engine.begin()
                async with unit_of_work as conn:
                    await duty.run(conn, self.clock())
            except Exception:  # one failing duty must not stop the others, nor end leadership
                log.exception("leader duty %s failed; trying again next time", duty.name)

    async def _reap(self, conn: AsyncConnection, now: datetime) -> None:
        recovered = await attempts.reap_expired_leases(conn, now, self.policy)
        if recovered:
            log.warning("recovered attempts of lost workers: %s", ", ".join(recovered))
        lost = await attempts.mark_lost_nodes(conn, now, self.settings.lease_seconds)
        if lost:
            log.warning("nodes silent for a whole lease are lost: %s", ", ".join(lost))

    async def _fire_schedules(self, conn: AsyncConnection, now: datetime) -> None:
        capacities = await jobs.live_capacities(conn) or [self.settings.node_capacity()]
        fired = await schedules.fire_due(conn, now, self.policy, capacities)
        if fired.created:
            log.info("cron created %s", ", ".join(fired.created))
        for name, why in fired.failed:
            log.warning("schedule %s could not fire: %s", name, why)

    async def _purge(self, conn: AsyncConnection, now: datetime) -> None:
        assert self.settings.retention_seconds is not None
        purged = await retention.purge_finished(conn, now - timedelta(seconds=self.settings.retention_seconds))
        if purged:
            log.info("retention purged %d finished jobs", purged)

    async def _refresh_statistics(self, conn: AsyncConnection, now: datetime) -> None:
        analysed = await insight.refresh_statistics(conn)
        if analysed:
            log.info("analysed %s after a burst of changes", ", ".join(analysed))

    async def _vacuum_churned(self, conn: AsyncConnection, now: datetime) -> None:
        vacuumed = await insight.vacuum_churned(conn)
        if vacuumed:
            log.info("vacuumed %s after churn", ", ".join(vacuumed))

    async def _compact(self, conn: AsyncConnection, now: datetime) -> None:
        # Depth counters and position buckets, when worth it.
        self._folded_since_vacuum |= await insight.fold_queue_counters(conn)

    async def _vacuum_folded(self, conn: AsyncConnection, now: datetime) -> None:
        if self._folded_since_vacuum:
            self._folded_since_vacuum = False
            await insight.vacuum_folded(conn)
