"""Security properties (issue 5, item 4; SPEC §12).

- API keys are held only as SHA-256 digests and compared in constant time,
  against every configured key.
- With keys set, every route the app has (enumerated from `app.routes`, so a
  route added later is covered without editing this file) refuses a missing or
  wrong key with a 401 `unauthorized` problem and WWW-Authenticate, and lets the
  right key through; `/health` and `/ready` stay open for probes. The WebSocket
  takes `?token=` and closes 1008 without it.
- Size limits hold before authentication costs anything.
- Nothing secret (API key, payload content) reaches the logs at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest
import uvicorn
from api_fixtures import Api, api_settings, assert_problem, job, running_api
from fastapi import FastAPI
from fastapi.routing import APIWebSocketRoute
from starlette.routing import WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from queue_service.api import deps
from queue_service.api.app import create_app
from queue_service.api.submission import MAX_BODY_BYTES
from queue_service.settings import Settings

pytestmark = pytest.mark.integration

KEYS = ("alpha-key-0123456789", "beta-key-9876543210")
RIGHT = {"Authorization": f"Bearer {KEYS[1]}"}
WRONG_HEADERS: tuple[dict[str, str], ...] = (
    {},
    {"Authorization": "Bearer not-a-key"},
    {"Authorization": f"Bearer {KEYS[0]}x"},  # a key with one more character
    {"Authorization": f"Bearer {KEYS[0][:-1]}"},  # a prefix of a key
    {"Authorization": f"Basic {KEYS[0]}"},
    {"Authorization": KEYS[0]},
)
OPEN_PATHS = frozenset({"/health", "/ready"})
# The documentation routes (routes/docs.py): protected like the API; see test_the_api_documentation_needs_the_key.
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# The admin page shell and its script and stylesheet are open by design (routes/admin.py): a
# browser navigation cannot send a bearer header, and they hold no data; the page asks for a key
# and everything it shows comes from the protected API. test_the_admin_shell_holds_no_data checks it.
ADMIN_SHELL = re.compile(r"^/admin(/|/jobs/\{job_id\}|/static/\{name\})?$")
CLOSE_POLICY_VIOLATION = 1008
PATH_PARAMETER = re.compile(r"\{[^}]+\}")


@pytest.fixture
async def locked(migrated_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(migrated_url, api_keys=",".join(KEYS))) as api:
        yield api


def flat_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Every route, included routers opened up (FastAPI ≥ 0.16x keeps them as lazy branches)."""
    for route in routes:
        branch = getattr(route, "effective_candidates", None)
        if callable(branch):
            yield from flat_routes(branch())
            low_priority = getattr(route, "effective_low_priority_routes", None)
            if callable(low_priority):
                yield from flat_routes(low_priority())
        else:
            yield route


def is_websocket(route: Any) -> bool:
    original = getattr(route, "original_route", route)
    return isinstance(original, WebSocketRoute | APIWebSocketRoute)


def http_endpoints(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every HTTP route the app has, HEAD left to its GET."""
    found = set()
    for route in flat_routes(app.routes):
        if not is_websocket(route) and getattr(route, "methods", None):
            found |= {(method, route.path) for method in route.methods if method != "HEAD"}
    return sorted(found)


def websocket_paths(app: FastAPI) -> list[str]:
    routes = [route for route in flat_routes(app.routes) if is_websocket(route)]
    return sorted({route.path or getattr(route, "original_route", route).path for route in routes})


def concrete(path: str) -> str:
    return PATH_PARAMETER.sub("some-id", path)


def protected(path: str) -> bool:
    return path not in OPEN_PATHS and not ADMIN_SHELL.match(path)


# -- keys at rest and compared -----------------------------------------------------------------


def test_settings_hold_only_digests_of_the_keys() -> None:
    settings = Settings(api_keys=" , ".join(KEYS))
    assert settings.api_keys == tuple(hashlib.sha256(key.encode()).digest() for key in KEYS)
    shown = " ".join([repr(settings), str(settings), repr(settings.model_dump())])
    for key in KEYS:
        assert key not in shown
        assert key.encode() not in settings.api_keys
    # A dump read back is the same settings, not digests of digests.
    assert Settings(**settings.model_dump()).api_keys == settings.api_keys


def test_the_environment_variable_is_hashed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKQUEUE_API_KEYS", ",".join(KEYS))
    assert Settings().api_keys == Settings(api_keys=KEYS).api_keys
    assert deps.api_key_matches(Settings(), KEYS[0])


def test_bytes_that_are_not_digests_are_refused() -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        Settings(api_keys=(b"raw key",))


def test_every_configured_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(api_keys=KEYS)
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)  # deps looks it up on the module per call
    for offered, expected in ((KEYS[0], True), (KEYS[1], True), ("nope", False), ("", False), ("\udcff", False)):
        compared.clear()
        assert deps.api_key_matches(settings, offered) is expected
        # No early exit on a match, and digest against digest: equal lengths whatever was offered.
        assert [b for _, b in compared] == list(settings.api_keys)
        assert all(len(a) == len(b) == hashlib.sha256().digest_size for a, b in compared)


# -- every endpoint ----------------------------------------------------------------------------


async def test_every_protected_endpoint_needs_the_key(locked: Api) -> None:
    endpoints = [(method, path) for method, path in http_endpoints(locked.app) if protected(path)]
    assert ("POST", "/jobs") in endpoints
    assert ("GET", "/metrics") in endpoints  # the list is the app's, not this file's
    for method, path in endpoints:
        url = concrete(path)
        for headers in WRONG_HEADERS:
            response = await locked.client.request(method, url, headers=headers, json=job())
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
        response = await locked.client.request(method, url, headers=RIGHT, json=job())
        assert response.status_code != 401, (method, path, response.text)
        assert response.status_code < 500, (method, path, response.text)


async def test_health_and_ready_stay_open(locked: Api) -> None:
    for path in OPEN_PATHS:
        assert (await locked.client.get(path)).status_code == 200


async def test_the_admin_shell_holds_no_data(locked: Api) -> None:
    assert (await locked.client.post("/jobs", json=job(job_id="secret-job"), headers=RIGHT)).status_code == 201
    shell = [(method, path) for method, path in http_endpoints(locked.app) if ADMIN_SHELL.match(path)]
    if not shell:
        pytest.skip("no /admin pages in this build")
    page = await locked.client.get("/admin")
    detail = await locked.client.get("/admin/jobs/secret-job")
    assert page.status_code == detail.status_code == 200
    assert page.content == detail.content  # the same static shell, whatever the job
    assert b"secret-job" not in page.content
    # The data behind it is protected.
    assert_problem(await locked.client.get("/admin/api/jobs/secret-job"), 401, "unauthorized")


async def test_the_api_documentation_needs_the_key(locked: Api) -> None:
    for path in sorted(DOC_PATHS):
        assert_problem(await locked.client.get(path), 401, "unauthorized")


async def test_auth_is_checked_before_a_body_is_read(locked: Api) -> None:
    huge = b"[" + b" " * (MAX_BODY_BYTES + 1) + b"]"
    response = await locked.client.post("/jobs/batch", content=huge, headers={"Content-Type": "application/json"})
    assert_problem(response, 401, "unauthorized")
    response = await locked.client.post(
        "/jobs/batch", content=huge, headers={**RIGHT, "Content-Type": "application/json"}
    )
    assert_problem(response, 413, "payload_too_large")


# -- the WebSocket -----------------------------------------------------------------------------


class QuietServer(uvicorn.Server):
    """uvicorn in the test's own loop, leaving the test runner's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """The app over real HTTP and WebSocket on a free loopback port; yields host:port."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = QuietServer(uvicorn.Config(app, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[listening]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"127.0.0.1:{listening.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        listening.close()


async def first_close(url: str) -> int | None:
    """The close code the server sends first, or None if it sent a frame instead."""
    async with connect(url, open_timeout=10) as websocket:
        try:
            await asyncio.wait_for(websocket.recv(), timeout=10)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None
    return None


async def test_every_websocket_needs_the_token(migrated_url: str) -> None:
    app = create_app(api_settings(migrated_url, api_keys=",".join(KEYS)), run_worker=False)
    paths = websocket_paths(app)
    if not paths:
        pytest.skip("no WebSocket route in this build")
    async with serving(app) as address:
        for path in paths:
            url = f"ws://{address}{concrete(path)}"
            assert await first_close(url) == CLOSE_POLICY_VIOLATION
            assert await first_close(f"{url}?token=not-a-key") == CLOSE_POLICY_VIOLATION
            assert await first_close(f"{url}?token={KEYS[0]}") is None  # subscribed: a frame, not a close


# -- logs --------------------------------------------------------------------------------------


async def test_no_secret_or_payload_content_is_logged_at_info(
    migrated_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret_payload = "card-4111111111111111-cvv-737"
    key = "sk_live_TOPSECRET_0123456789"
    caplog.set_level(logging.INFO)
    async with running_api(api_settings(migrated_url, api_keys=key)) as api:
        auth = {"Authorization": f"Bearer {key}"}
        body = job(job_id="logged", payload={"card": secret_payload}, idempotency_key=secret_payload[:20])
        assert (await api.client.post("/jobs", json=body, headers=auth)).status_code == 201
        assert (
            await api.client.post("/jobs/batch", json=[job(payload={"x": secret_payload})], headers=auth)
        ).is_success
        assert (await api.client.get("/jobs/logged", headers=auth)).status_code == 200
        assert (await api.client.patch("/jobs/logged/cancel", headers=auth)).status_code == 200
        await api.client.get("/jobs", headers={"Authorization": f"Bearer {key}x"})  # a failed attempt is logged?
    logged = "\n".join(f"{record.getMessage()} {record.args!r} {record.__dict__!r}" for record in caplog.records)
    assert caplog.records, "nothing was logged at all: the capture is not working"
    assert secret_payload not in logged
    assert secret_payload[:20] not in logged
    assert key not in logged
