"""A worker node (SPEC §6, §11): registers its capacity, claims what `core.plan()`
chooses, runs handlers as asyncio tasks under their timeouts, renews leases,
wakes retries, and shuts down gracefully (the leader recovers dead nodes' attempts).

Dispatch wakes on LISTEN/NOTIFY (new ready work, freed resources, resume) and
falls back to polling every `poll_interval_seconds` if a notification is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.core.model import AttemptOutcome, Resources
from queue_service.core.policy import Candidate, RunningJob, first_read, plan
from queue_service.db import attempts, driver
from queue_service.db.attempts import AttemptEnd, Claim
from queue_service.db.events import CANCEL_ATTEMPT, DISPATCH_PAUSED, DISPATCH_RESUMED, JOB_UPDATED, WAKE_DISPATCH
from queue_service.db.lifecycle import epoch
from queue_service.db.listener import EventListener
from queue_service.settings import Settings
from queue_service.timeouts import event_set_within, stop_tasks
from queue_service.worker.handlers import HandlerRegistry, JobContext, PermanentError, default_registry
from queue_service.worker.ready_view import ReadyView

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
RECORD_BATCH = 64  # ended attempts written per transaction at most
# At shutdown, how long ended attempts may take to be written once interrupted. A write
# that cannot land (the database away, a lock never granted) must not hold the process:
# the attempt's lease expires and the reaper puts the job back, as after a crash.
STOP_RECORD_SECONDS = 20.0


class NodeObserver(Protocol):
    """What a node reports as it works (metrics, tracing). Called on the event loop;
    must not block or raise."""

    def claimed(self, node_id: str, claims: list[Claim], claim_seconds: float) -> None: ...

    def attempt_ended(self, node_id: str, claim: Claim, end: AttemptEnd, run_seconds: float) -> None: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


ABANDON_AFTER_SECONDS = 2.0  # how long a cancelled handler gets to stop before it is left running unwatched


class HandlerExit(Exception):
    """A handler raised SystemExit or KeyboardInterrupt: its attempt fails, the worker goes on."""


async def _contained(handler: Any, context: JobContext) -> Any:
    # An asyncio task re-raises SystemExit and KeyboardInterrupt out of the event loop,
    # so they are turned into an ordinary exception before they leave the handler's task.
    try:
        return await handler(context)
    except (SystemExit, KeyboardInterrupt) as error:
        raise HandlerExit(f"{type(error).__name__}: {error}".rstrip(": ")) from error


async def _ended_within(task: asyncio.Future[Any], seconds: float) -> bool:
    """Whether `task` ends within `seconds`: asyncio.wait on one task, without the set,
    the per-call closures and the task's own future it builds (several microseconds a
    job), and nothing at all for a task already done. Cancelling the caller leaves the
    task running, as asyncio.wait does."""
    if task.done():
        return True
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    task.add_done_callback(wake)
    timer = loop.call_later(seconds, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        task.remove_done_callback(wake)
    return task.done()


async def _cancel_or_abandon(task: asyncio.Future[Any], context: JobContext) -> bool:
    """Cancel a handler's task and wait a little for it; False if it would not stop."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=ABANDON_AFTER_SECONDS)
    if done:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
        return True
    task.add_done_callback(lambda ended: ended.cancelled() or ended.exception())  # whenever it ends: no noise
    log.error(
        "%s attempt %d ignored cancellation for %.0fs; abandoned (its resources are released)",
        context.job_id,
        context.attempt,
        ABANDON_AFTER_SECONDS,
    )
    return False


@dataclass
class RunningAttempt:
    claim: Claim
    task: asyncio.Task[None]  # the attempt's: runs the handler's task under its timeout, records the end
    handler: asyncio.Future[Any]  # the handler's own task (see WorkerNode._execute)
    stop_reason: str | None = None  # "cancelled" (already recorded elsewhere) or "interrupted" (shutdown)
    recording: bool = False  # the handler is done and its end is being written: never cancel that
    began: bool = False  # its task has taken its first step

    def stop(self, reason: str) -> None:
        """Cancel the attempt. A task cancelled before its first step never runs its own
        clean-up (it would hold its resources here for good): one that has not begun
        finds the reason when it does, and its handler is cancelled now (if it has not
        begun either, it never runs)."""
        self.stop_reason = reason
        if self.began:
            self.task.cancel()
        else:
            self.handler.cancel()


@dataclass
class WorkerNode:
    engine: AsyncEngine
    settings: Settings
    listener: EventListener
    registry: HandlerRegistry = field(default_factory=lambda: default_registry)
    clock: Clock = utc_now
    node_id: str = ""
    observers: list[NodeObserver] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node_id = self.node_id or self.settings.resolved_node_id()
        self.policy = self.settings.policy_config()
        self.capacity = self.settings.node_capacity()
        self.running: dict[str, RunningAttempt] = {}
        self._wake = asyncio.Event()
        # One claim at a time: the dispatch loop and the recorder both claim, and two
        # claims at once would plan the same free capacity (see attempts.claim_round).
        self._claiming = asyncio.Lock()
        # Dispatch was paused at the last claim, or announced paused since: submissions do
        # not wake the loop (each would be a claim transaction that finds it paused, and
        # one planned from what the node knew then could reach the database just after a
        # resume, starting a job ahead of those the node had not heard of yet); a resume
        # notice or the poll interval does.
        self._dispatch_paused = False
        self._pause_notices = 0  # pause and resume notices heard: newer than any claim begun before
        # The whole ready queue, while announcements keep it known: an idle node then
        # starts a submitted job without reading the queue first (see ready_view).
        self._ready = ReadyView(self.policy.candidate_window)
        self._endings: asyncio.Queue[tuple[Claim, AttemptEnd, asyncio.Future[bool]]] = asyncio.Queue()
        self._retry_wake = asyncio.Event()  # a new retry may be due sooner than the one we sleep for
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._register()
        self._unsubscribe = self.listener.subscribe(self._on_event)
        for name, loop in (
            ("dispatch", self._dispatch_loop),
            ("recorder", self._recorder_loop),
            ("heartbeat", self._heartbeat_loop),
            ("retries", self._retry_loop),
        ):
            self._loops.append(asyncio.create_task(loop(), name=f"{self.node_id}:{name}"))
        self._wake.set()
        log.info("node %s started with %s", self.node_id, self.capacity)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stop dispatching, let running attempts finish within the grace period, put
        any still running back in the queue (interrupted), and deregister."""
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._stopping = True
        self._wake.set()
        tasks = [attempt.task for attempt in self.running.values()]
        if tasks:
            log.info("node %s waiting up to %ss for %d running attempts", self.node_id, grace, len(tasks))
            await asyncio.wait(tasks, timeout=grace)
        for attempt in list(self.running.values()):
            if not attempt.recording:  # an attempt whose end is being written just needs the write
                attempt.stop("interrupted")
        remaining = [attempt.task for attempt in self.running.values()]
        if remaining:
            _, unwritten = await asyncio.wait(remaining, timeout=STOP_RECORD_SECONDS)
            for task in unwritten:
                task.cancel()
            if unwritten:
                names = ", ".join(sorted(task.get_name() for task in unwritten))
                log.error(
                    "node %s stops with %d attempt ends unwritten (%s): their leases will expire",
                    self.node_id,
                    len(unwritten),
                    names,
                )
        await stop_tasks(self._loops)
        if self._unsubscribe is not None:
            self._unsubscribe()
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    sa.text("UPDATE nodes SET status = 'stopped', heartbeat_at = :now WHERE node_id = :node"),
                    {"now": self.clock(), "node": self.node_id},
                )
        except Exception as error:  # the database is away: the row goes stale, and the reaper knows stale rows
            log.warning("node %s stopped without deregistering: %s: %s", self.node_id, type(error).__name__, error)
            return
        log.info("node %s stopped", self.node_id)

    async def _register(self) -> None:
        """Upsert this node's row. Use is recomputed from its running jobs, so a node
        restarted under the same id does not forget attempts the reaper has yet to recover."""
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.text(
                    """
                    INSERT INTO nodes (node_id, cpu_capacity, memory_capacity, cpu_used, memory_used, status,
                                       started_at, heartbeat_at)
                    SELECT :node, :cpu, :memory, coalesce(sum(cpu_units), 0), coalesce(sum(memory_mb), 0), 'active',
                           :now, :now
                    FROM jobs WHERE status = 'running' AND worker_id = :node
                    ON CONFLICT (node_id) DO UPDATE SET cpu_capacity = EXCLUDED.cpu_capacity,
                        memory_capacity = EXCLUDED.memory_capacity, cpu_used = EXCLUDED.cpu_used,
                        memory_used = EXCLUDED.memory_used, status = 'active', started_at = EXCLUDED.started_at,
                        heartbeat_at = EXCLUDED.heartbeat_at
                    """
                ),
                {
                    "node": self.node_id,
                    "cpu": self.capacity.cpu_units,
                    "memory": self.capacity.memory_mb,
                    "now": self.clock(),
                },
            )

    # --------------------------------------------------------------- notifications
    def _on_event(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == JOB_UPDATED:
            self._ready.announced(message)
        if event in (WAKE_DISPATCH, DISPATCH_RESUMED):
            # "Go and look": a change the node was not told the details of (a batch, a
            # reconnected listener that may have missed announcements, a resume).
            self._ready.forget()
        if event == DISPATCH_PAUSED:
            self._pause_notices += 1
            self._dispatch_paused = True
        elif event == DISPATCH_RESUMED:
            self._pause_notices += 1
            self._dispatch_paused = False
            self._wake.set()
        elif event == WAKE_DISPATCH or (event == JOB_UPDATED and message.get("status") == "ready"):
            if not self._dispatch_paused:
                self._wake.set()
        elif event == JOB_UPDATED and message.get("status") == "retrying":
            self._retry_wake.set()
        elif event == CANCEL_ATTEMPT and message.get("node_id") == self.node_id:
            self._stop_attempt(str(message.get("job_id")), "cancelled")

    def _notify(self, method: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:  # observability must never break the work it observes
                log.exception("node observer %r failed in %s", observer, method)

    def _stop_attempt(self, job_id: str, reason: str) -> None:
        attempt = self.running.get(job_id)
        if attempt is not None and not attempt.task.done() and not attempt.recording:
            attempt.stop(reason)

    # -------------------------------------------------------------------- dispatch
    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            woken = await event_set_within(self._wake, self.settings.poll_interval_seconds)
            self._wake.clear()
            if self._stopping:
                return
            if self._full():  # an ending attempt wakes us; claiming now could start nothing
                continue
            try:
                # A poll reads the queue whatever the node knows: it is the fallback for
                # a change no announcement reached us of.
                await self._claim_and_launch(read=not woken)
            except Exception:
                log.exception("dispatch on %s failed; retrying", self.node_id)
                await asyncio.sleep(self.settings.poll_interval_seconds)

    async def _claim_and_launch(self, *, read: bool = False) -> None:
        """Claim for what is free and run what the claim started: from the ready jobs
        the node knows of when it knows them all (and `read` is not asked), else by
        reading the queue."""
        async with self._claiming:
            started, notices = time.monotonic(), self._pause_notices
            async with driver.pooled(self.engine) as conn:
                claims = None if read else await self._start_known(conn)
                if claims is None:
                    claims = await self._claim(conn)
                # Before the connection goes back: its return is a step of the event loop
                # the handlers need not wait for, and what started must run even if it fails.
                self._launch(claims, time.monotonic() - started, notices)

    async def _start_known(self, conn: driver.Executor) -> list[Claim] | None:
        """core.plan() over the ready jobs the node knows of, and their start: one
        statement, where a claim reads first. None when the node does not know them
        all. The caller holds the claim lock."""
        known = self._ready.ready
        if known is None or not self.listener.connected.is_set():
            return None
        if not known:
            return []
        now = self.clock()
        candidates = [
            Candidate(q.job_id, q.sort_key, Resources(q.cpu_units, q.memory_mb), q.timeout_seconds)
            for q in known.values()
        ]
        running = [
            RunningJob(job_id, a.claim.resources, epoch(a.claim.started_at) + a.claim.timeout_seconds)
            for job_id, a in self.running.items()
        ]
        starts = plan(epoch(now), candidates, running, self.capacity, self.policy)
        if not starts:
            return []
        try:
            claims = await attempts.start_planned(
                conn, self.node_id, starts, dict(known), now, self.settings.lease_seconds
            )
        except BaseException:
            self._ready.forget()
            raise
        if not self._ready.started([s.job_id for s in starts], [c.job_id for c in claims]):
            self._wake.set()  # the queue changed under us, or dispatch did: read it
        return claims

    async def _claim(self, conn: driver.Executor, ending: Collection[str] = ()) -> list[Claim] | None:
        """`attempts.claim_round` for this node, reading first as many candidates as
        core.first_read gives for what runs here, but for the attempts whose ends the
        claim's transaction writes; what it read renews the node's view of the ready
        queue. The caller holds the claim lock."""
        running = [
            RunningJob(job_id, a.claim.resources, 0.0) for job_id, a in self.running.items() if job_id not in ending
        ]
        first_window = first_read(self.capacity, running, self.policy)
        self._ready.reading()
        try:
            claimed = await attempts.claim_round(
                conn, self.node_id, self.clock, self.policy, self.settings.lease_seconds, first_window=first_window
            )
        except BaseException:
            self._ready.read_failed()
            raise
        started = [claim.job_id for claim in claimed.claims or ()]
        self._ready.read(claimed.window, claimed.whole_queue and claimed.claims is not None, started)
        return claimed.claims

    def _launch(self, claims: list[Claim] | None, claim_seconds: float, pause_notices: int) -> None:
        """Run what a claim started; None: it found dispatch paused (see _dispatch_paused).
        `pause_notices`: as many as the node had heard when the claim began; a pause or
        resume announced since is newer than what the claim found."""
        if pause_notices == self._pause_notices:
            self._dispatch_paused = claims is None
        if claims is None:
            return
        self._notify("claimed", self.node_id, claims, claim_seconds)
        launched = time.monotonic()
        for claim in claims:
            context = JobContext(
                claim.job_id, claim.type, claim.priority, claim.payload, claim.attempt, claim.timeout_seconds
            )
            handler = self.registry.resolve(claim.type, strict=self.settings.strict_handlers)
            # The handler's task is made here, not by the attempt's task: it then takes
            # its first step in the loop's next step, one sooner.
            handler_task = asyncio.ensure_future(_contained(handler, context))
            task = asyncio.create_task(self._run(claim, context, launched), name=f"{claim.job_id}#{claim.attempt}")
            self.running[claim.job_id] = RunningAttempt(claim, task, handler_task)

    def _full(self) -> bool:
        """No job can fit: every job needs at least one CPU unit and one MB (SPEC §3)."""
        cpu = sum(a.claim.resources.cpu_units for a in self.running.values())
        memory = sum(a.claim.resources.memory_mb for a in self.running.values())
        return cpu >= self.capacity.cpu_units or memory >= self.capacity.memory_mb

    async def _run(self, claim: Claim, context: JobContext, launched: float) -> None:
        attempt = self.running[claim.job_id]
        attempt.began = True
        try:
            stopped = attempt.stop_reason is not None  # stopped before it began
            end = await self._execute(attempt.handler, context, claim.timeout_seconds, stopped=stopped)
        except asyncio.CancelledError:
            reason = attempt.stop_reason
            if reason == "interrupted":
                end = AttemptEnd(AttemptOutcome.INTERRUPTED, "interrupted by shutdown")
            else:  # cancelled or lease lost: whoever took it away already recorded the end
                self.running.pop(claim.job_id, None)
                self._wake.set()  # its resources are free again
                return
        attempt.recording = True
        self._notify("attempt_ended", self.node_id, claim, end, time.monotonic() - launched)
        dispatched = False
        try:
            dispatched = await self._record(claim, end)
        finally:
            self.running.pop(claim.job_id, None)
            if not dispatched:
                self._wake.set()

    @staticmethod
    async def _execute(task: asyncio.Future[Any], context: JobContext, timeout: float, *, stopped: bool) -> AttemptEnd:
        """Wait for a handler running in a task of its own, so that one ignoring
        cancellation cannot hold the node: past its timeout (or when the attempt is
        cancelled, or `stopped` before its task began) it is cancelled, and if it is still
        running ABANDON_AFTER_SECONDS later, it is left to itself and the attempt ends
        without it. A handler's exit (SystemExit, KeyboardInterrupt) ends the attempt,
        never the worker; a result JSON cannot carry fails the attempt."""
        try:
            if stopped:
                raise asyncio.CancelledError
            ended = await _ended_within(task, timeout)
        except asyncio.CancelledError:  # cancelled or interrupted: the handler goes too
            await _cancel_or_abandon(task, context)
            raise
        if not ended:
            abandoned = not await _cancel_or_abandon(task, context)
            reason = f"timed out after {timeout:g}s" + (" (ignored cancellation; abandoned)" if abandoned else "")
            return AttemptEnd(AttemptOutcome.TIMED_OUT, reason)
        try:
            result = task.result()
        except PermanentError as error:
            return AttemptEnd(AttemptOutcome.PERMANENT_FAILURE, f"{type(error).__name__}: {error}")
        except HandlerExit as error:
            return AttemptEnd(AttemptOutcome.FAILED, str(error))
        except Exception as error:
            return AttemptEnd(AttemptOutcome.FAILED, f"{type(error).__name__}: {error}")
        except asyncio.CancelledError:  # the handler cancelled itself
            return AttemptEnd(AttemptOutcome.FAILED, "the handler was cancelled from within")
        if result is None:  # most handlers return nothing: no encoder to run
            return AttemptEnd(AttemptOutcome.SUCCEEDED)
        try:
            json.dumps(result)
        except (TypeError, ValueError) as error:
            return AttemptEnd(AttemptOutcome.FAILED, f"the handler's result is not JSON: {error}")
        return AttemptEnd(AttemptOutcome.SUCCEEDED, result=result)

    async def _record(self, claim: Claim, end: AttemptEnd) -> bool:
        """Hand the end to the recorder and wait until it is written (or given up).
        True when the recorder also dispatched for the resources the end freed."""
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._endings.put_nowait((claim, end, written))
        return await written

    async def _recorder_loop(self) -> None:
        """Write ended attempts in batches: whatever has ended since the last write goes
        in one transaction, so under load the cost per job falls (one statement per
        kind of change, not per job), while a lone ending is written at once."""
        while True:
            batch = [await self._endings.get()]
            while not self._endings.empty() and len(batch) < RECORD_BATCH:
                batch.append(self._endings.get_nowait())
            dispatched = await self._write(batch)
            for _, _, written in batch:
                if not written.done():
                    written.set_result(dispatched)

    async def _write(self, batch: list[tuple[Claim, AttemptEnd, asyncio.Future[bool]]]) -> bool:
        """Fenced by each lease token; a database hiccup is retried so no outcome is lost
        (if it never lands, the lease expires and the reaper retries the job).

        The same transaction then claims for the resources the endings freed, as the
        dispatch loop would right after: a node draining short jobs pays one
        transaction (and one commit) per round instead of two. Only on the first try:
        if anything fails, the endings are written alone and the dispatch loop claims.
        True when it claimed here."""
        endings = [attempts.Ending(claim.job_id, claim.lease_token, end) for claim, end, _ in batch]
        ending = {claim.job_id for claim, _, _ in batch}
        claiming = not self._stopping
        for delay in (0.1, 0.5, 1.0, 2.0, None):
            try:
                # The claim lock before the transaction, as the dispatch loop takes it before
                # its statements: never a transaction waiting for the lock while holding rows.
                async with self._claiming if claiming else contextlib.nullcontext():
                    claimed, claims, claim_seconds, notices = False, None, 0.0, self._pause_notices
                    async with driver.pooled_transaction(self.engine) as conn:
                        owned = await attempts.end_attempts(conn, endings, self.clock(), self.policy)
                        if claiming and not self._stopping:
                            started = time.monotonic()
                            claims = await self._claim(conn, ending)
                            claimed, claim_seconds = True, time.monotonic() - started
                    if claimed:
                        self._launch(claims, claim_seconds, notices)
            except Exception:
                claiming = False
                self._ready.forget()  # what its claim read may have been rolled back
                if delay is None:
                    log.exception("could not record %d ended attempts", len(batch))
                    return False
                await asyncio.sleep(delay)
                continue
            for (claim, _, _), recorded in zip(batch, owned, strict=True):
                if not recorded:
                    log.warning("%s attempt %d ended after losing its lease", claim.job_id, claim.attempt)
            return claimed
        return False  # unreachable: the last try returns

    # ------------------------------------------------------------ periodic duties
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_seconds)
            renewing = list(self.running.values())  # only these are judged by the answer
            tokens: list[uuid.UUID] = [a.claim.lease_token for a in renewing]
            try:
                async with self.engine.begin() as conn:
                    held = await attempts.renew_leases(
                        conn, self.node_id, tokens, self.clock(), self.settings.lease_seconds
                    )
            except Exception:
                log.exception("heartbeat of %s failed", self.node_id)
                continue
            for attempt in renewing:
                # Gone from the database but still running here: cancelled or reaped elsewhere.
                if attempt.claim.lease_token not in held and not attempt.task.done() and attempt.stop_reason is None:
                    self._stop_attempt(attempt.claim.job_id, "lease_lost")

    async def _retry_loop(self) -> None:
        while True:
            self._retry_wake.clear()  # before reading the next due time, so no announcement slips between
            try:
                async with self.engine.begin() as conn:
                    await attempts.wake_due_retries(conn, self.clock(), self.policy)
                    due = await attempts.next_retry_due(conn)
            except Exception:
                log.exception("retry wake-up failed")
                due = None
            wait = self.settings.poll_interval_seconds
            if due is not None:
                wait = min(wait, max(0.0, (due - self.clock()).total_seconds()))
            await event_set_within(self._retry_wake, wait)
