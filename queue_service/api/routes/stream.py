"""`WS /jobs/stream`: job status changes as JSON text frames (SPEC §4, §8).

Query filters `job_id` (repeatable), `type`, `status` (repeatable); with API keys
set, `?token=<key>` (or an `Authorization: Bearer` header). Bad filters or
credentials close the socket with 1008 and the reason. The first frame is
`{"event": "stream.subscribed", "filters": …}`, sent once the client is
registered, so a client knows from then on it misses nothing; idle streams get
`{"event": "ping", "at": …}` every `stream_heartbeat_seconds`. A client that
falls `stream_buffer` events behind, or whose socket does not take a frame within
`SEND_TIMEOUT_SECONDS`, is closed with 1013.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import Final

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from queue_service.api.deps import api_key_matches
from queue_service.db.events import iso_z
from queue_service.observability.fanout import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_TOO_SLOW,
    EventHub,
    InvalidFilter,
    StreamClient,
    StreamFilter,
)
from queue_service.settings import Settings

SEND_TIMEOUT_SECONDS: Final = 10.0  # a socket that takes no frame for this long is as good as dead
CLOSE_TIMEOUT_SECONDS: Final = 5.0  # the close handshake with a stuck client must not hold the task
CLOSE_UNAVAILABLE: Final = 1011  # the service is not running (starting or stopping)

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])


def _authorised(websocket: WebSocket, settings: Settings) -> bool:
    if not settings.api_keys:
        return True
    offered = websocket.query_params.get("token")
    header = websocket.headers.get("authorization", "")
    if offered is None and header.lower().startswith("bearer "):
        offered = header[len("bearer ") :].strip()
    return offered is not None and api_key_matches(settings, offered)


@router.websocket("/jobs/stream")
async def job_stream(websocket: WebSocket) -> None:
    # Accept first: a close before the handshake would reach the client as a bare HTTP 403,
    # and the spec promises it close code 1008 with the reason.
    await websocket.accept()
    settings: Settings = websocket.app.state.settings
    hub: EventHub | None = getattr(websocket.app.state, "stream_hub", None)
    if not _authorised(websocket, settings):
        await _close(websocket, CLOSE_POLICY, "unauthorized: pass ?token=<API key>")
        return
    params = websocket.query_params
    try:
        stream_filter = StreamFilter.parse(params.getlist("job_id"), params.getlist("type"), params.getlist("status"))
    except InvalidFilter as error:
        await _close(websocket, CLOSE_POLICY, f"invalid filter: {error}")
        return
    if hub is None:
        await _close(websocket, CLOSE_UNAVAILABLE, "the service is not running")
        return
    with hub.connect(stream_filter) as client:
        hello = {"event": "stream.subscribed", "filters": stream_filter.describe()}
        await websocket.send_text(json.dumps(hello))
        sender = asyncio.create_task(_send_loop(websocket, client, settings.stream_heartbeat_seconds))
        receiver = asyncio.create_task(_receive_loop(websocket))
        done, pending = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await task
    if sender in done and not sender.cancelled() and sender.exception() is None:
        code, reason = sender.result()
        await _close(websocket, code, reason)


async def _send_loop(websocket: WebSocket, client: StreamClient, heartbeat: float) -> tuple[int, str]:
    """Forward buffered frames until the client is dropped or the hub closes; returns the close code."""
    while True:
        if client.overrun:
            log.warning("dropping a stream client %d events behind", client.capacity)
            return CLOSE_TOO_SLOW, f"too slow: more than {client.capacity} events behind"
        if client.closing:
            return CLOSE_GOING_AWAY, "the server is shutting down"
        try:
            async with asyncio.timeout(heartbeat):
                frame = await client.queue.get()
        except TimeoutError:
            frame = json.dumps({"event": "ping", "at": iso_z(datetime.now(UTC))})
        if frame is None:  # the hub's wake-up: loop round to the closing check
            continue
        try:
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                await websocket.send_text(frame)
        except TimeoutError:
            return CLOSE_TOO_SLOW, f"too slow: a frame waited more than {SEND_TIMEOUT_SECONDS:g}s"


async def _receive_loop(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, to notice when it goes away."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    # The socket may already be gone, or stuck: closing is best effort and bounded.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
            await websocket.close(code=code, reason=reason[:120])
