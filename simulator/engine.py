"""The SimPy engine: arrivals, cancels, attempts, retries and propagation, with every
decision taken by `queue_service.core` (plan, state machine, backoff, DAG rules).

One seam between simulated and wall-clock time, as in SimPy itself: the live
worker runs the same core calls with asyncio time instead of these processes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import simpy
from simpy.events import EventPriority
from sortedcontainers import SortedKeyList

from queue_service.core import dag, execution, states, validation
from queue_service.core.errors import DependencyCycle, QueueError
from queue_service.core.model import ZERO, AttemptOutcome, CancelReason, FailureReason, JobStatus, Resources
from queue_service.core.policy import Candidate, RunningJob, Start, plan, sort_key
from simulator.invariants import DispatchMonitor
from simulator.records import AttemptRecord, JobRecord, Rejection, RetryRecord, SimulationResult, UsageSample
from simulator.scenario import Scenario

# SimPy orders same-instant events by (priority, insertion). URGENT=0 and NORMAL=1
# are SimPy's own; dispatch runs after every normal event of the instant, so plan()
# sees all simultaneous arrivals and completions together, as the live worker does.
DISPATCH_PRIORITY = EventPriority(2)


class _AfterInstant(simpy.Event):
    """An event that fires once everything else scheduled for this instant has run."""

    def __init__(self, env: simpy.Environment, callback: Callable[[simpy.Event], None]) -> None:
        super().__init__(env)
        self._ok = True
        self._value = None
        self.callbacks.append(callback)
        env.schedule(self, DISPATCH_PRIORITY)


@dataclass
class _Node:
    """One worker node: its capacity, the containers that count its use, what runs
    on it, and the monitor of its own dispatch decisions."""

    capacity: Resources
    cpu: simpy.Container
    memory: simpy.Container
    monitor: DispatchMonitor
    running: dict[str, RunningJob] = field(default_factory=dict)


def merged(monitors: Sequence[DispatchMonitor], capacity: Resources) -> DispatchMonitor:
    """The nodes' monitors as one, for the invariant checks."""
    first = next((m.first_backfill for m in monitors if m.first_backfill is not None), None)
    return DispatchMonitor(
        capacity,
        starts=sum(m.starts for m in monitors),
        backfills=sum(m.backfills for m in monitors),
        order_violations=[v for m in monitors for v in m.order_violations],
        delay_violations=[v for m in monitors for v in m.delay_violations],
        first_backfill=first,
    )


class Simulation:
    """One run of one scenario on its node, or on `scenario.nodes` identical nodes that
    each plan in turn over what is still ready (node 0 first), as live nodes claim."""

    def __init__(self, scenario: Scenario, on_progress: Callable[[int], None] | None = None) -> None:
        self.scenario = scenario
        self.policy = scenario.policy
        self.capacity = scenario.capacity  # of each node
        self.env = simpy.Environment()
        # Independent capacity check: the policy decides; the containers only count.
        cpu, memory = self.capacity.cpu_units, self.capacity.memory_mb
        self.nodes = [
            _Node(
                self.capacity,
                simpy.Container(self.env, capacity=cpu, init=cpu),
                simpy.Container(self.env, capacity=memory, init=memory),
                DispatchMonitor(self.capacity),
            )
            for _ in range(scenario.nodes)
        ]
        self.total_capacity = Resources(cpu * scenario.nodes, memory * scenario.nodes)
        self.node_of: dict[str, _Node] = {}
        self.jobs = {
            job.spec.job_id: JobRecord(job.spec, job.work, job.submit_at, job.cancel_at) for job in scenario.jobs
        }
        self.dependants: dict[str, list[str]] = defaultdict(list)
        self.ready: SortedKeyList = SortedKeyList(key=lambda cand: cand.queue_order)
        self.candidates: dict[str, Candidate] = {}
        self.running: dict[str, RunningJob] = {}
        self.attempt_processes: dict[str, simpy.Process] = {}
        self.used = ZERO
        self.usage: list[UsageSample] = [UsageSample(0.0, ZERO)]
        self.rejections: list[Rejection] = []
        self.container_violations: list[str] = []
        self.plan_calls = 0
        self.start_count = 0
        self.finished_count = 0
        self._dispatch_pending = False
        self._on_progress = on_progress

    # ----------------------------------------------------------------- driving
    def run(self) -> SimulationResult:
        by_time = sorted(self.scenario.jobs, key=lambda job: job.submit_at)
        for submit_at, batch in groupby(by_time, key=lambda job: job.submit_at):
            self.env.process(self._arrive(submit_at, [job.spec.job_id for job in batch]))
        for job in self.scenario.jobs:
            if job.cancel_at is not None:
                self.env.process(self._cancel_later(job.spec.job_id, job.cancel_at))
        self.env.run()
        return SimulationResult(
            scenario_name=self.scenario.name,
            capacity=self.total_capacity,
            jobs=self.jobs,
            rejections=self.rejections,
            usage=self.usage,
            plan_calls=self.plan_calls,
            container_violations=self.container_violations,
        )

    @property
    def now(self) -> float:
        return float(self.env.now)

    def _request_dispatch(self) -> None:
        if not self._dispatch_pending:
            self._dispatch_pending = True
            _AfterInstant(self.env, self._dispatch)

    # --------------------------------------------------------------- arrivals
    def _arrive(self, at: float, job_ids: list[str]) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(at)
        self._submit_batch(job_ids)

    def _submit_batch(self, job_ids: list[str]) -> None:
        """All or nothing, like POST /jobs/batch: each job fits the node, known deps,
        viable deps, no cycle."""
        batch = {job_id: self.jobs[job_id].spec.depends_on for job_id in job_ids}
        existing = {
            dep: status
            for deps in batch.values()
            for dep in deps
            if dep in self.jobs and (status := self.jobs[dep].status) is not None
        }
        try:
            for job_id in job_ids:
                validation.check_schedulable(self.jobs[job_id].spec, self.capacity)
            unfinished = {job_id: dag.count_unfinished(deps, existing, batch) for job_id, deps in batch.items()}
            dag.check_acyclic(batch)
        except QueueError as error:
            cycle = error.cycle if isinstance(error, DependencyCycle) else None
            self.rejections.append(Rejection(self.now, tuple(job_ids), error.code, error.detail, cycle))
            for job_id in job_ids:
                self.jobs[job_id].rejected = error.code
                self.finished_count += 1
            return
        for job_id in job_ids:
            job = self.jobs[job_id]
            job.unfinished_deps = unfinished[job_id]
            for dep in job.spec.depends_on:
                self.dependants[dep].append(job_id)
            self._set_status(job, states.initial_status(job.unfinished_deps), initial=True)
            if job.status is JobStatus.READY:
                self._make_ready(job)
        self._request_dispatch()

    def _cancel_later(self, job_id: str, at: float) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(at)
        job = self.jobs[job_id]
        if job.status is None or job.status.is_terminal:
            return
        if job.status is JobStatus.RUNNING:
            self.attempt_processes[job_id].interrupt("cancelled")
        self._end(job, JobStatus.CANCELLED, reason=CancelReason.USER, error="cancelled by user")
        self._request_dispatch()

    # ---------------------------------------------------------------- dispatch
    def _dispatch(self, _event: simpy.Event) -> None:
        self._dispatch_pending = False
        if not self.ready:
            return
        for node in self.nodes:
            window = list(self.ready.islice(0, self.policy.candidate_window))
            if not window:
                break
            starts = plan(self.now, window, list(node.running.values()), node.capacity, self.policy)
            self.plan_calls += 1
            for start in starts:
                self._start(self.jobs[start.job_id], start, node)
            node.monitor.observe(self.now, window, starts, list(node.running.values()))

    @property
    def monitor(self) -> DispatchMonitor:
        return merged([node.monitor for node in self.nodes], self.capacity)

    def _start(self, job: JobRecord, start: Start, node: _Node) -> None:
        self.ready.remove(self.candidates.pop(job.job_id))
        self._take(job.job_id, start.resources, node)
        running = RunningJob(job.job_id, start.resources, start.latest_end)
        self.running[job.job_id] = node.running[job.job_id] = running
        self.node_of[job.job_id] = node
        number = len(job.attempts) + 1
        self.start_count += 1
        job.attempts.append(AttemptRecord(number, self.start_count, self.now, start.latest_end, start.backfilled))
        self._set_status(job, JobStatus.RUNNING)
        self.attempt_processes[job.job_id] = self.env.process(self._attempt(job, number))

    def _take(self, job_id: str, need: Resources, node: _Node) -> None:
        for container, amount, name in ((node.cpu, need.cpu_units, "cpu"), (node.memory, need.memory_mb, "memory")):
            request = container.get(amount)
            if not request.triggered:  # the policy overcommitted: record it, never hide it
                request.cancel()
                self.container_violations.append(f"t={self.now:g}: {job_id} took {amount} {name} not free")
        self._record_usage(self.used + need)

    def _give_back(self, job_id: str) -> None:
        freed = self.running.pop(job_id).resources
        node = self.node_of.pop(job_id)
        del node.running[job_id]
        node.cpu.put(freed.cpu_units)
        node.memory.put(freed.memory_mb)
        self.attempt_processes.pop(job_id, None)
        self._record_usage(self.used - freed)

    def _record_usage(self, used: Resources) -> None:
        self.used = used
        if self.usage[-1].at == self.now:
            self.usage[-1] = UsageSample(self.now, used)
        else:
            self.usage.append(UsageSample(self.now, used))

    # ---------------------------------------------------------------- attempts
    def _attempt(self, job: JobRecord, number: int) -> Generator[simpy.Event, Any, None]:
        behaviour = execution.simulated_attempt(job.spec.type, job.work, number, job.spec.timeout_seconds)
        record = job.attempts[-1]
        try:
            yield self.env.timeout(behaviour.run_seconds + self.scenario.attempt_overhead_seconds)
        except simpy.Interrupt:
            record.ended_at, record.outcome = self.now, AttemptOutcome.CANCELLED
            self._give_back(job.job_id)
            return
        record.ended_at, record.outcome = self.now, behaviour.outcome
        self._give_back(job.job_id)
        if behaviour.outcome is AttemptOutcome.SUCCEEDED:
            self._complete(job)
        else:
            self._after_failure(job, number, behaviour.outcome)
        self._request_dispatch()

    def _complete(self, job: JobRecord) -> None:
        self._end(job, JobStatus.COMPLETED)
        for child_id in self.dependants.get(job.job_id, ()):
            child = self.jobs[child_id]
            child.unfinished_deps -= 1
            if child.unfinished_deps == 0 and child.status is JobStatus.BLOCKED:
                self._set_status(child, JobStatus.READY)
                self._make_ready(child)

    def _after_failure(self, job: JobRecord, number: int, outcome: AttemptOutcome) -> None:
        job.counted_attempts += 1
        job.last_error = f"attempt {number} {outcome.value}"
        decision = execution.after_failed_attempt(
            job_id=job.job_id,
            retry=job.spec.retry,
            attempt=number,
            counted_attempts=job.counted_attempts,
            permanent=outcome is AttemptOutcome.PERMANENT_FAILURE,
            failed_at=self.now,
        )
        if isinstance(decision, execution.GiveUp):
            self._end(job, JobStatus.FAILED, reason=decision.reason, error=job.last_error)
            return
        self._set_status(job, JobStatus.RETRYING)
        job.next_attempt_at = decision.next_attempt_at
        self.env.process(self._wake_for_retry(job, number, decision.delay_seconds))

    def _wake_for_retry(self, job: JobRecord, number: int, delay: float) -> Generator[simpy.Event, Any, None]:
        failed_at = self.now
        yield self.env.timeout(delay)
        if job.status is not JobStatus.RETRYING:  # cancelled while it waited
            return
        job.retries.append(RetryRecord(number, failed_at, self.now))
        job.next_attempt_at = None
        self._set_status(job, JobStatus.READY)
        self._make_ready(job)
        self._request_dispatch()

    # ------------------------------------------------------------ transitions
    def _make_ready(self, job: JobRecord) -> None:
        job.ready_at = self.now
        if job.first_ready_at is None:
            job.first_ready_at = self.now
        candidate = Candidate(
            job.job_id,
            sort_key(self.now, job.spec.priority, self.policy),
            job.spec.resources,
            job.spec.timeout_seconds,
        )
        self.candidates[job.job_id] = candidate
        self.ready.add(candidate)

    def _set_status(self, job: JobRecord, target: JobStatus, *, initial: bool = False) -> None:
        if not initial:
            assert job.status is not None
            states.transition(job.job_id, job.status, target)
        job.status = target
        job.history.append((self.now, target))

    def _end(
        self,
        job: JobRecord,
        status: JobStatus,
        *,
        reason: FailureReason | CancelReason | None = None,
        error: str | None = None,
        propagate: bool = True,
    ) -> None:
        if job.job_id in self.candidates:
            self.ready.remove(self.candidates.pop(job.job_id))
        self._set_status(job, status)
        job.finished_at = self.now
        if isinstance(reason, FailureReason):
            job.failure_reason = reason
        elif isinstance(reason, CancelReason):
            job.cancel_reason = reason
        if error is not None:
            job.last_error = error
        self.finished_count += 1
        if self._on_progress is not None:
            self._on_progress(self.finished_count)
        if propagate and status in (JobStatus.FAILED, JobStatus.CANCELLED):
            self._propagate(job, status)

    def _propagate(self, ancestor: JobRecord, ancestor_status: JobStatus) -> None:
        end_status, reason = dag.propagated_end(ancestor_status)
        message = dag.propagation_message(ancestor.job_id, ancestor_status)
        for job_id in dag.descendants_in_order(ancestor.job_id, self._dependants_of):
            job = self.jobs[job_id]
            if job.status is not None and job.status.is_waiting:
                # The walk already covers this job's own descendants.
                self._end(job, end_status, reason=reason, error=message, propagate=False)

    def _dependants_of(self, job_id: str) -> Iterable[str]:
        return self.dependants.get(job_id, ())


def simulate(
    scenario: Scenario, on_progress: Callable[[int], None] | None = None
) -> tuple[SimulationResult, DispatchMonitor]:
    """Run `scenario` to the end: what happened, and what the dispatch monitor saw."""
    simulation = Simulation(scenario, on_progress)
    return simulation.run(), simulation.monitor
