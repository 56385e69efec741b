"""Realistic users of a running service, for locust.

    taskqueue serve --port 8000          # with DATABASE_URL pointing at a fresh database
    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 60s --host http://127.0.0.1:8000 \\
        --csv out/locust --only-summary

Users, by weight: submitters of single jobs (`POST /jobs`, short simulated work,
mixed priorities and types), submitters of DAG batches (`POST /jobs/batch`, a
diamond whose members depend on each other inside the batch), pollers
(`GET /jobs/{id}` on jobs submitted in this run), listers (`GET /jobs` with
status/type/priority filters, following `next_cursor` for a few pages) and
cancellers (`PATCH /jobs/{id}/cancel` on long jobs they submitted themselves,
so a cancel never races a completion). Every answer is checked for its status
code and shape; a failure is reported as `<status> <body>` so the CSV of
failures names what went wrong. `--csv` writes per-endpoint percentiles
(`*_stats.csv`) and failures (`*_failures.csv`).
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from typing import Any, Final

from locust import HttpUser, between, task
from locust.clients import ResponseContextManager

JOB_TYPES: Final = ("send_email", "export_csv", "build_report", "resize_image")
PRIORITIES: Final = ("critical", "high", "normal", "normal", "low")  # normal twice: the common case
STATUSES: Final = ("blocked", "ready", "running", "retrying", "completed", "failed", "cancelled")
SHORT_WORK_SECONDS: Final = (0.01, 0.2)  # simulated work of submitted jobs
LONG_WORK_SECONDS: Final = 60.0  # jobs submitted to be cancelled: far longer than a cancel takes to come
MAX_LIST_PAGES: Final = 3
KNOWN_JOBS: Final = 5000  # ids remembered for the pollers

known_jobs: deque[str] = deque(maxlen=KNOWN_JOBS)  # shared by the users of this process


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def simulated(seconds: float) -> dict[str, Any]:
    return {"simulate": {"duration_seconds": round(seconds, 3)}}


def short_job(job_id: str, depends_on: list[str] | None = None) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "type": random.choice(JOB_TYPES),
        "priority": random.choice(PRIORITIES),
        "payload": simulated(random.uniform(*SHORT_WORK_SECONDS)),
        "depends_on": depends_on or [],
    }


def fail(response: ResponseContextManager, expected: str) -> None:
    body = response.text[:300] if response.text else ""
    response.failure(f"{response.status_code} (expected {expected}): {body}")  # type: ignore[no-untyped-call]


class QueueUser(HttpUser):
    abstract = True

    def post_json(self, path: str, body: Any, name: str) -> dict[str, Any] | None:
        """POST expecting 201; the decoded answer, or None after reporting a failure."""
        with self.client.post(path, json=body, name=name, catch_response=True) as response:
            if response.status_code != 201:
                fail(response, "201")
                return None
            document: dict[str, Any] = response.json()
            return document


class SingleSubmitter(QueueUser):
    weight = 4
    wait_time = between(0.2, 1.0)

    @task
    def submit(self) -> None:
        accepted = self.post_json("/jobs", short_job(new_id("single")), "POST /jobs")
        if accepted is not None:
            known_jobs.append(accepted["job_id"])


class DagSubmitter(QueueUser):
    weight = 1
    wait_time = between(1.0, 3.0)

    @task
    def submit_diamond(self) -> None:
        """extract → (transform_a, transform_b) → load, in one all-or-nothing batch."""
        dag = new_id("dag")
        extract, left, right, load = (f"{dag}.{step}" for step in ("extract", "left", "right", "load"))
        batch = [
            short_job(extract),
            short_job(left, [extract]),
            short_job(right, [extract]),
            short_job(load, [left, right]),
        ]
        accepted = self.post_json("/jobs/batch", batch, "POST /jobs/batch")
        if accepted is None:
            return
        with self.client.get(f"/jobs/{load}", name="GET /jobs/{id}", catch_response=True) as response:
            if response.status_code != 200:
                fail(response, "200")
            elif sorted(response.json()["depends_on"]) != sorted([left, right]):
                response.failure(f"depends_on of {load} is {response.json()['depends_on']}")
        known_jobs.extend(job["job_id"] for job in accepted["jobs"])


class Poller(QueueUser):
    weight = 4
    wait_time = between(0.5, 2.0)

    @task
    def poll(self) -> None:
        if not known_jobs:
            return
        job_id = random.choice(known_jobs)
        with self.client.get(f"/jobs/{job_id}", name="GET /jobs/{id}", catch_response=True) as response:
            if response.status_code != 200:
                fail(response, "200")
            elif response.json().get("status") not in STATUSES:
                response.failure(f"unknown status in {response.text[:300]}")


class Lister(QueueUser):
    weight = 2
    wait_time = between(1.0, 3.0)

    @task(3)
    def waiting_work(self) -> None:
        self.pages({"status": ["ready", "running", "blocked"], "limit": 50})

    @task(2)
    def by_type_and_priority(self) -> None:
        self.pages({"type": random.choice(JOB_TYPES), "priority": random.choice(PRIORITIES), "limit": 20})

    @task(1)
    def finished(self) -> None:
        self.pages({"status": ["completed", "failed", "cancelled"], "limit": 100})

    def pages(self, params: dict[str, Any]) -> None:
        cursor: str | None = None
        for page in range(MAX_LIST_PAGES):
            query = {**params, **({"cursor": cursor} if cursor else {})}
            name = "GET /jobs" if page == 0 else "GET /jobs?cursor"
            with self.client.get("/jobs", params=query, name=name, catch_response=True) as response:
                if response.status_code != 200:
                    fail(response, "200")
                    return
                document = response.json()
                if not isinstance(document.get("items"), list) or len(document["items"]) > params["limit"]:
                    response.failure(f"not a page of at most {params['limit']}: {response.text[:300]}")
                    return
                cursor = document.get("next_cursor")
            if cursor is None:
                return


class Canceller(QueueUser):
    weight = 1
    wait_time = between(1.0, 3.0)

    @task
    def submit_then_cancel(self) -> None:
        job = short_job(new_id("cancel")) | {"payload": simulated(LONG_WORK_SECONDS)}
        if self.post_json("/jobs", job, "POST /jobs (to cancel)") is None:
            return
        with self.client.patch(
            f"/jobs/{job['job_id']}/cancel", name="PATCH /jobs/{id}/cancel", catch_response=True
        ) as response:
            if response.status_code != 200:
                fail(response, "200")
            elif response.json().get("status") != "cancelled":
                response.failure(f"not cancelled: {response.text[:300]}")
