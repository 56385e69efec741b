"""The admin UI in headless Chromium (Debian's `chromium`, driven by Playwright):
a job appears and completes live, its page shows the DAG and the log, a running
job is cancelled with the button, and a key is asked for when API keys are set.

Screenshots go to the test's tmp dir and are copied to /tmp/admin-shots/ for a
person to look at. Skips when /usr/bin/chromium or playwright is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service_process import Service

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SHOTS_COPY = Path("/tmp/admin-shots")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LIVE_TIMEOUT_MS = 20_000


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "shots"
    folder.mkdir()
    yield folder
    SHOTS_COPY.mkdir(exist_ok=True)
    for shot in folder.glob("*.png"):
        shutil.copy(shot, SHOTS_COPY / shot.name)


@pytest.fixture
def service(migrated_url: str) -> Iterator[Service]:
    running = Service(migrated_url, "admin-node-1")
    yield running
    running.stop()


def sim(seconds: float) -> dict[str, Any]:
    return {"simulate": {"duration_seconds": seconds}}


def submit_batch(service: Service, jobs: list[dict[str, Any]]) -> None:
    response = service.client.post("/jobs/batch", json=jobs)
    assert response.status_code == 201, response.text


def load(prefix: str, count: int) -> list[dict[str, Any]]:
    """A mixed workload: priorities, sizes, chains of dependencies, a few failures."""
    priorities = ["critical", "high", "normal", "low"]
    types = ["send_email", "data_export", "report_generation", "ledger_reconcile"]
    jobs: list[dict[str, Any]] = []
    for i in range(count):
        body: dict[str, Any] = {
            "job_id": f"{prefix}-{i:03d}",
            "type": types[i % 4],
            "priority": priorities[(i * 7) % 4],
            "resource_requirements": {"cpu_units": 1 + i % 3, "memory_mb": 256 * (1 + i % 4)},
            "payload": sim(1.0 + (i % 5) * 0.8),
        }
        if i % 6 == 5:
            body["depends_on"] = [f"{prefix}-{i - 1:03d}", f"{prefix}-{i - 3:03d}"]
        if i % 17 == 3:
            body["payload"] = {"simulate": {"duration_seconds": 0.3, "permanent_failure": True}}
        jobs.append(body)
    return jobs


def test_dashboard_live_job_page_and_cancel(browser: Any, service: Service, shots: Path) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(f"{service.url}/admin")
    page.wait_for_selector("#live.on", timeout=LIVE_TIMEOUT_MS)

    # A small DAG around `settle-payments`, submitted after the page loaded: it must appear live.
    submit_batch(
        service,
        [
            {"job_id": "fetch-rates", "type": "data_export", "priority": "high", "payload": sim(0.5)},
            {
                "job_id": "settle-payments",
                "type": "ledger_reconcile",
                "depends_on": ["fetch-rates"],
                "payload": sim(1.0),
            },
            {
                "job_id": "notify-merchants",
                "type": "send_email",
                "depends_on": ["settle-payments"],
                "payload": sim(0.3),
            },
            {
                "job_id": "daily-report",
                "type": "report_generation",
                "depends_on": ["settle-payments"],
                "payload": sim(0.3),
            },
            {
                "job_id": "archive",
                "type": "data_export",
                "depends_on": ["notify-merchants", "daily-report"],
                "payload": sim(0.2),
            },
        ],
    )
    row = page.locator('tr[data-job="settle-payments"]')
    row.wait_for(timeout=LIVE_TIMEOUT_MS)
    page.locator('tr[data-job="settle-payments"] .badge.s-completed').wait_for(timeout=LIVE_TIMEOUT_MS)
    page.locator('tr[data-job="archive"] .badge.s-completed').wait_for(timeout=LIVE_TIMEOUT_MS)

    page.locator('tr[data-job="settle-payments"] a').click()
    page.wait_for_url("**/admin/jobs/settle-payments")
    page.wait_for_selector("#dag svg a.focus")
    assert page.locator("#dag svg rect").count() == 5
    assert page.locator("#job-status").inner_text() == "completed"
    events = page.locator("#logs tbody td:nth-child(4)").all_inner_texts()
    assert events[:2] == ["submitted", "blocked"]
    assert "succeeded" in events
    page.screenshot(path=str(shots / "02-job-page-dag-and-log.png"), full_page=True)

    page.goto(f"{service.url}/admin")
    page.wait_for_selector("#live.on", timeout=LIVE_TIMEOUT_MS)
    submit_batch(service, load("load", 150))
    page.wait_for_selector("#nodes .running-list li a", timeout=LIVE_TIMEOUT_MS)
    page.wait_for_timeout(2500)  # let a few jobs finish and fail so every part of the page has data
    page.screenshot(path=str(shots / "01-dashboard-under-load.png"))  # the first screenful

    blocked = page.goto(f"{service.url}/admin/jobs/load-011")
    assert blocked is not None
    assert blocked.headers["content-security-policy"].startswith("default-src 'none'")
    page.wait_for_selector("#why")
    page.screenshot(path=str(shots / "03-job-page-waiting.png"), full_page=True)

    submit_batch(
        service, [{"job_id": "long-export", "type": "data_export", "priority": "critical", "payload": sim(120)}]
    )
    page.goto(f"{service.url}/admin/jobs/long-export")
    page.wait_for_selector("#job-status.s-running", timeout=LIVE_TIMEOUT_MS)
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    page.wait_for_selector("#job-status.s-cancelled", timeout=LIVE_TIMEOUT_MS)
    page.wait_for_selector("#attempts tbody td:text('cancelled')")
    page.screenshot(path=str(shots / "04-job-cancelled.png"), full_page=True)
    assert service.client.get("/jobs/long-export").json()["status"] == "cancelled"
    assert problems == [], problems  # no script errors, no CSP violations


def test_asks_for_the_key_when_api_keys_are_set(browser: Any, migrated_url: str, shots: Path) -> None:
    keyed = Service(migrated_url, "admin-node-keyed", TASKQUEUE_API_KEYS="opensesame")
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 700})
        page.goto(f"{keyed.url}/admin")
        page.wait_for_selector("#login:not([hidden])")
        page.screenshot(path=str(shots / "05-asks-for-key.png"))
        page.fill("#key-input", "wrong")
        page.click("#key-form button")
        page.wait_for_selector("#key-error:text('that key was refused')")
        page.fill("#key-input", "opensesame")
        page.click("#key-form button")
        page.wait_for_selector("#dashboard:not([hidden])")
        page.wait_for_selector("#live.on", timeout=LIVE_TIMEOUT_MS)
    finally:
        keyed.stop()
