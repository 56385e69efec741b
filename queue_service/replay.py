"""`taskqueue replay`: a scenario file run against a live service in real time, and
set beside the simulator's prediction for the same file (issue #8).

Jobs are submitted over HTTP at their `submit_at` (one batch per instant, as the
simulator groups them) and cancelled at their `cancel_at`; what happened is then
read back from the API (job fields and logs), with times counted from the
scenario's time 0 on the server's clock. `simulator.agreement` does the comparing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from itertools import groupby
from typing import Any, Final, TypeVar

import httpx

from queue_service.core.model import Resources
from queue_service.core.policy import PolicyConfig
from simulator.agreement import REJECTED, Agreement, ObservedJob, attempt_overhead, compare
from simulator.runner import ScenarioRun, run_scenario
from simulator.scenario import Scenario, ScenarioJob
from simulator.transform import job_body, prefixed, scaled

T = TypeVar("T")

TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
WAITING: Final = ("blocked", "ready", "running", "retrying")
# Job log events that end an attempt; `requeued` (interrupted by shutdown) also makes it ready again.
ATTEMPT_ENDS: Final = frozenset({"succeeded", "attempt_failed", "timed_out", "worker_lost", "cancelled", "requeued"})
PAGE: Final = 500  # GET /jobs page size, the API's maximum
FETCH_CONCURRENCY: Final = 8  # requests in flight while reading results back
REPLAY_TIMEOUT_FACTOR: Final = 3.0  # a live run this many times the simulated makespan has hung
REPLAY_TIMEOUT_MARGIN: Final = 30.0  # seconds, on top: short scenarios on a busy machine
CAPACITY_METRIC: Final = re.compile(r'^taskqueue_node_(cpu_capacity_units|memory_capacity_mb)\{node="([^"]*)"\} (\S+)$')


class ReplayError(Exception):
    """The service cannot replay this scenario faithfully; the message says why."""


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class LiveRun:
    """A scenario as the live service ran it: the API's job documents and logs, and
    each job's times in seconds from the scenario's time 0."""

    scenario: Scenario  # as submitted: prefixed and scaled
    origin: datetime  # the server's clock at the scenario's time 0
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # job id -> problem code

    def seconds(self, value: str | None) -> float | None:
        return None if value is None else (parse_time(value) - self.origin).total_seconds()

    def first_event(self, job_id: str, event: str) -> float | None:
        return next((self.seconds(e["at"]) for e in self.logs.get(job_id, ()) if e["event"] == event), None)

    def attempt_spans(self, job_id: str) -> tuple[tuple[float, float, float], ...]:
        """(became ready, started, ended) of each attempt that ended, from the job's log."""
        spans, ready, started = [], None, None
        for entry in self.logs.get(job_id, ()):
            at = self.seconds(entry["at"])
            if entry["event"] == "ready":
                ready = at
            elif entry["event"] == "started":
                started = at
            elif entry["event"] in ATTEMPT_ENDS and started is not None and ready is not None and at is not None:
                spans.append((ready, started, at))
                started = None
                if entry["event"] == "requeued":
                    ready = at
        return tuple(spans)

    def observed(self) -> dict[str, ObservedJob]:
        result = {job_id: ObservedJob(job_id, REJECTED) for job_id in self.rejected}
        for job_id, job in self.jobs.items():
            result[job_id] = ObservedJob(
                job_id=job_id,
                status=job["status"],
                attempts=job["attempts"],
                first_ready=self.first_event(job_id, "ready"),
                first_start=self.first_event(job_id, "started"),
                finished=self.seconds(job["finished_at"]),
                reason=job["failure_reason"] or job["cancel_reason"],
                attempt_spans=self.attempt_spans(job_id),
            )
        return result


def prepare(scenario: Scenario, *, time_scale: float, prefix: str) -> Scenario:
    """The scenario as it will run live and be simulated: times scaled, ids prefixed."""
    if time_scale != 1:
        scenario = scaled(scenario, time_scale)
    return prefixed(scenario, prefix) if prefix else scenario


async def _gather_limited(calls: list[Callable[[], Awaitable[T]]], limit: int = FETCH_CONCURRENCY) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(call) for call in calls)))


def _checked(response: httpx.Response, *expected: int) -> httpx.Response:
    if response.status_code not in expected:
        request = response.request
        raise ReplayError(f"{request.method} {request.url.path}: {response.status_code} {response.text}")
    return response


async def preflight(client: httpx.AsyncClient, scenario: Scenario) -> None:
    """Refuse a service that would not run the scenario as simulated: paused, another
    policy, or not exactly the scenario's number of live nodes of its capacity."""
    state = _checked(await client.get("/dispatch"), 200).json()
    if state["paused"]:
        raise ReplayError("dispatch is paused on the service: POST /dispatch/resume first")
    policy = state.get("policy") or {}
    expected = scenario.policy
    live = PolicyConfig(
        headstart_seconds={k: float(v) for k, v in policy.get("headstart_seconds", {}).items()},
        candidate_window=int(policy.get("candidate_window", expected.candidate_window)),
        backfill=bool(policy.get("backfill", expected.backfill)),
    )
    if dict(live.headstart_seconds) != dict(expected.headstart_seconds) or (
        live.candidate_window,
        live.backfill,
    ) != (expected.candidate_window, expected.backfill):
        raise ReplayError(f"the service's policy {policy} is not the scenario's; configure the service to match")
    nodes = await live_nodes(client)
    want = scenario.capacity
    if list(nodes.values()) != [want] * scenario.nodes:
        shown = ", ".join(f"{n}: {r.cpu_units} CPU / {r.memory_mb} MB" for n, r in nodes.items()) or "none"
        count = "one live node" if scenario.nodes == 1 else f"{scenario.nodes} live nodes"
        raise ReplayError(
            f"the scenario needs {count} of {want.cpu_units} CPU / {want.memory_mb} MB; the service has {shown}"
        )


async def live_nodes(client: httpx.AsyncClient) -> dict[str, Resources]:
    """Each live node's capacity, from the service's Prometheus metrics."""
    text = _checked(await client.get("/metrics"), 200).text
    found: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        match = CAPACITY_METRIC.match(line)
        if match:
            found.setdefault(match[2], {})[match[1]] = int(float(match[3]))
    return {
        node: Resources(values.get("cpu_capacity_units", 0), values.get("memory_capacity_mb", 0))
        for node, values in sorted(found.items())
    }


async def _submit_all(
    client: httpx.AsyncClient,
    scenario: Scenario,
    started: float,
    run: LiveRun,
    origins: list[datetime],
    answered: Mapping[str, asyncio.Event],
) -> None:
    loop = asyncio.get_running_loop()
    ordered = sorted(scenario.jobs, key=lambda job: job.submit_at)
    for submit_at, group in groupby(ordered, key=lambda job: job.submit_at):
        batch = list(group)
        await asyncio.sleep(max(0.0, started + submit_at - loop.time()))
        response = await client.post("/jobs/batch", json=[job_body(job) for job in batch])
        for job in batch:
            if job.spec.job_id in answered:
                answered[job.spec.job_id].set()
        if response.status_code == 422:  # refused whole, as the simulator refuses it
            code = str(response.json().get("code"))
            run.rejected.update({job.spec.job_id: code for job in batch})
            continue
        accepted = _checked(response, 201).json()["jobs"]
        if not origins:
            origins.append(parse_time(accepted[0]["created_at"]) - timedelta(seconds=submit_at))


async def _cancel_at(client: httpx.AsyncClient, job: ScenarioJob, started: float, submitted: asyncio.Event) -> None:
    assert job.cancel_at is not None
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, started + job.cancel_at - loop.time()))
    await submitted.wait()  # a user cancels what they have submitted, never a request still in flight
    _checked(await client.patch(f"/jobs/{job.spec.job_id}/cancel"), 200, 404, 409)  # 404: its batch was refused


async def _unfinished(client: httpx.AsyncClient, ours: set[str], since: datetime) -> int:
    """How many of `ours` are not terminal yet (pages of waiting jobs created since the run began)."""
    params: list[tuple[str, str | int]] = [("status", s) for s in WAITING]
    params += [("limit", PAGE), ("created_after", since.isoformat())]
    count, cursor = 0, None
    while True:
        page = _checked(await client.get("/jobs", params=[*params, *([("cursor", cursor)] if cursor else [])]), 200)
        body = page.json()
        count += sum(item["job_id"] in ours for item in body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return count


async def run_live(
    client: httpx.AsyncClient,
    scenario: Scenario,
    *,
    timeout: float,
    not_before: float = 0.0,
    poll_interval: float = 0.25,
    on_wait: Callable[[int], None] | None = None,
) -> LiveRun:
    """Submit and cancel in real time, wait until every accepted job is terminal
    (at most `timeout` seconds from the start; asking first `not_before` seconds
    from the start, such as the simulated makespan), then read everything back."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    run = LiveRun(scenario, origin=datetime.min)
    origins: list[datetime] = []
    answered = {job.spec.job_id: asyncio.Event() for job in scenario.jobs if job.cancel_at is not None}
    cancels = [
        asyncio.create_task(_cancel_at(client, job, started, answered[job.spec.job_id]))
        for job in scenario.jobs
        if job.cancel_at is not None
    ]
    try:
        await _submit_all(client, scenario, started, run, origins, answered)
        ours = {job.spec.job_id for job in scenario.jobs} - set(run.rejected)
        if not origins:
            raise ReplayError("every batch of the scenario was refused; nothing ran")
        run.origin = origins[0]
        since = run.origin - timedelta(seconds=1)
        # Reading the queue costs the service too: not before the simulated end is near.
        await asyncio.sleep(max(0.0, started + not_before - loop.time()))
        while ours:
            remaining = await _unfinished(client, ours, since)
            if on_wait is not None:
                on_wait(remaining)
            if remaining == 0:
                break
            if loop.time() - started > timeout:
                raise ReplayError(f"{remaining} jobs still unfinished after {timeout:g}s")
            await asyncio.sleep(poll_interval)
        await asyncio.gather(*cancels)
    finally:
        for task in cancels:
            task.cancel()
    await _collect(client, run, sorted(ours))
    return run


async def _collect(client: httpx.AsyncClient, run: LiveRun, ids: list[str]) -> None:
    async def job(job_id: str) -> dict[str, Any]:
        return dict(_checked(await client.get(f"/jobs/{job_id}"), 200).json())

    async def log(job_id: str) -> list[dict[str, Any]]:
        return list(_checked(await client.get(f"/jobs/{job_id}/logs"), 200).json()["entries"])

    jobs = await _gather_limited([partial(job, job_id) for job_id in ids])
    logs = await _gather_limited([partial(log, job_id) for job_id in ids])
    run.jobs = dict(zip(ids, jobs, strict=True))
    run.logs = dict(zip(ids, logs, strict=True))


class _ReadsRetriedOnce(httpx.AsyncHTTPTransport):
    """Sends a GET again, once, when its connection broke before any answer.

    A replay waits idle for seconds (until the simulated end is near) and then reads;
    a server may close an idle keep-alive connection just as the read goes out on it,
    and the read fails with no answer. A GET changes nothing, so sending it again on a
    fresh connection is safe; anything else fails as it did."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            if request.method != "GET":
                raise
        return await super().handle_async_request(request)


def client_for(url: str, api_key: str | None, timeout: float = 30.0) -> httpx.AsyncClient:
    headers: Mapping[str, str] = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=url, headers=dict(headers), timeout=timeout, transport=_ReadsRetriedOnce())


@dataclass(frozen=True)
class Replay:
    """One replay: the simulator's run and the live run of the same prepared scenario, compared."""

    simulated: ScenarioRun
    live: LiveRun
    agreement: Agreement


async def replay(client: httpx.AsyncClient, scenario: Scenario, *, poll_interval: float = 0.25) -> Replay:
    """Simulate `scenario` (already prepared), run it live, measure the service's time
    per attempt beyond the handler's, and compare the live run with the simulation
    that adds that time to every attempt."""
    await preflight(client, scenario)
    ideal = run_scenario(scenario)
    makespan = ideal.result.makespan
    live = await run_live(
        client,
        scenario,
        timeout=REPLAY_TIMEOUT_FACTOR * makespan + REPLAY_TIMEOUT_MARGIN,
        not_before=makespan,
        poll_interval=poll_interval,
    )
    observed = live.observed()
    overhead = attempt_overhead(ideal.result, observed)
    simulated = run_scenario(replace(scenario, attempt_overhead_seconds=overhead))
    return Replay(simulated, live, compare(simulated.result, observed, overhead))
