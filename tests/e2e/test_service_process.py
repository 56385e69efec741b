"""The service as a process, as an operator runs it: `taskqueue serve`, then
SIGTERM with work in flight, and kill -9 mid-job. No accepted job is lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from queue_service.db import migrate

pytestmark = pytest.mark.e2e

TASKQUEUE = str(Path(sys.executable).parent / "taskqueue")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One `taskqueue serve` process on its own port."""

    def __init__(self, database_url: str, node_id: str, **env: str) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process, closed in stop()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {
            **os.environ,
            "DATABASE_URL": database_url,
            "TASKQUEUE_LEASE_SECONDS": "2",
            "TASKQUEUE_POLL_INTERVAL_SECONDS": "0.2",
            **env,
        }
        self.process = subprocess.Popen(
            [TASKQUEUE, "serve", "--port", str(self.port), "--node-id", node_id],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=self.log,  # a file, not a pipe: a full pipe would stall the service
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited early: {self.stderr()}")
            try:
                if self.client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("service never became ready")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def wait_status(self, job_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job.get("status") == status:
                return job
            time.sleep(0.1)
        raise AssertionError(f"{job_id} is {job.get('status')}, waited for {status}")

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def services(migrated_url: str) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.stop()


def submit(service: Service, job_id: str, seconds: float, **extra: Any) -> None:
    body = {"job_id": job_id, "type": "data_export", "payload": {"simulate": {"duration_seconds": seconds}}, **extra}
    response = service.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text


def test_sigterm_lets_a_running_job_finish_and_exits_zero(migrated_url: str, services: list[Service]) -> None:
    service = Service(migrated_url, "term-finish", TASKQUEUE_SHUTDOWN_GRACE_SECONDS="10")
    services.append(service)
    submit(service, "finishes-during-shutdown", 1.5)
    service.wait_status("finishes-during-shutdown", "running")
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=15) == 0
    restarted = Service(migrated_url, "term-check")
    services.append(restarted)
    job = restarted.client.get("/jobs/finishes-during-shutdown").json()
    assert job["status"] == "completed"
    assert job["attempts"] == 1


def test_sigterm_past_the_grace_period_requeues_and_nothing_is_lost(migrated_url: str, services: list[Service]) -> None:
    service = Service(migrated_url, "term-requeue", TASKQUEUE_SHUTDOWN_GRACE_SECONDS="0.5")
    services.append(service)
    submit(service, "outlives-the-grace", 30)
    service.wait_status("outlives-the-grace", "running")
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=15) == 0
    successor = Service(migrated_url, "term-successor", TASKQUEUE_SHUTDOWN_GRACE_SECONDS="0.5")
    services.append(successor)
    entries = successor.client.get("/jobs/outlives-the-grace/logs").json()["entries"]
    assert "requeued" in [entry["event"] for entry in entries]
    job = successor.wait_status("outlives-the-grace", "running")
    assert job["attempts"] == 2  # attempt 1 was interrupted, kept its number, and did not count


def test_kill_9_mid_job_is_recovered_after_the_lease(migrated_url: str, services: list[Service]) -> None:
    victim = Service(migrated_url, "victim")
    services.append(victim)
    submit(victim, "survives-a-crash", 1.0, retry_config={"max_attempts": 3, "initial_delay_seconds": 0})
    victim.wait_status("survives-a-crash", "running")
    victim.process.kill()  # SIGKILL: no shutdown code runs
    victim.process.wait()
    rescuer = Service(migrated_url, "rescuer")
    services.append(rescuer)
    job = rescuer.wait_status("survives-a-crash", "completed", timeout=20)
    assert job["attempts"] == 2
    assert job["worker_id"] == "rescuer"
    events = [entry["event"] for entry in rescuer.client.get("/jobs/survives-a-crash/logs").json()["entries"]]
    assert "worker_lost" in events


SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def test_replay_command_runs_a_scenario_against_the_service_and_compares(
    services: list[Service],
    create_database: Callable[[], Coroutine[Any, Any, str]],
    run_blocking: Callable[[Coroutine[Any, Any, Any]], Any],
    tmp_path: Path,
) -> None:
    # A database of its own: replay refuses a service with other live nodes, and the
    # services other tests kill stay registered until a leader finds them silent.
    url = run_blocking(create_database())
    run_blocking(migrate.upgrade(url))
    service = Service(url, "replay-node", TASKQUEUE_API_KEYS="replay-key")
    services.append(service)
    command = [TASKQUEUE, "replay", str(SCENARIOS / "03_complex_dag.yaml"), "--url", service.url, "--time-scale", "0.5"]
    replayed = subprocess.run(
        [*command, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TASKQUEUE_API_KEY": "replay-key"},
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "Replay agreement: complex_dag" in replayed.stdout
    assert "Result: PASS" in replayed.stdout
    assert (tmp_path / "complex_dag.agreement.txt").read_text() in replayed.stdout + "\n"
    assert "complex_dag" in (tmp_path / "complex_dag.report.txt").read_text()

    # A node of another capacity would not run it as simulated: refused before anything is submitted.
    smaller = yaml.safe_load((SCENARIOS / "01_basic_flow.yaml").read_text())
    smaller["capacity"] = {"cpu_units": 4, "memory_mb": 2048}
    (tmp_path / "smaller.yaml").write_text(yaml.safe_dump(smaller))
    arguments = ["--url", service.url, "--api-key", "replay-key"]
    refused = subprocess.run(
        [TASKQUEUE, "replay", str(tmp_path / "smaller.yaml"), *arguments], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "needs one live node of 4 CPU / 2048 MB" in refused.stderr
    assert "replay-node: 8 CPU / 4096 MB" in refused.stderr
    unauthorised = subprocess.run(
        [TASKQUEUE, "replay", str(SCENARIOS / "01_basic_flow.yaml"), "--url", service.url, "--api-key", "wrong"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unauthorised.returncode == 2
    assert "401" in unauthorised.stderr
