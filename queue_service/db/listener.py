"""LISTEN on the events channel from a dedicated connection, outside the pool,
and hand each decoded message to the subscribers. Reconnects after a failure;
while it is down, the worker's polling fallback keeps dispatch going.

A listening connection sends nothing, so a link that silently stops carrying
packets (a partition) would never be noticed: a round trip every
`CHECK_SECONDS` finds it, and every wait on the network is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import asyncpg
import orjson

from queue_service.db.engine import asyncpg_dsn
from queue_service.db.events import CHANNEL, notified_messages
from queue_service.timeouts import event_set_within, stop_tasks

RECONNECT_SECONDS: Final = 1.0
CHECK_SECONDS: Final = 5.0
NETWORK_TIMEOUT_SECONDS: Final = 5.0  # connect, the round trip, and closing
log = logging.getLogger(__name__)

Subscriber = Callable[[dict[str, Any]], None]


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _connection: event.set()


class EventListener:
    def __init__(self, database_url: str) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._subscribers: list[Subscriber] = []
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber) if subscriber in self._subscribers else None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-listener")
        await event_set_within(self.connected, 10)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])

    def _deliver(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        # orjson: every job's every change is heard by every node and API replica, and
        # the standard decoder was a twentieth of a busy node's time.
        try:
            messages = notified_messages(str(payload))
        except orjson.JSONDecodeError:
            log.warning("ignoring a malformed notification: %r", str(payload)[:200])
            return
        for message in messages:
            if not isinstance(message, dict):
                log.warning("ignoring a notification that is not an object: %r", str(message)[:200])
                continue
            for subscriber in list(self._subscribers):
                try:
                    subscriber(message)
                except Exception:  # one faulty subscriber must not silence the others
                    log.exception("event subscriber failed")

    async def _run(self) -> None:
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(self._dsn, timeout=NETWORK_TIMEOUT_SECONDS)
                lost = asyncio.Event()
                connection.add_termination_listener(_setter(lost))
                await connection.add_listener(CHANNEL, self._deliver)
                self.connected.set()
                # Whatever was announced while we were away is covered by a wake-up.
                self._deliver(None, 0, CHANNEL, '{"event": "dispatch.wake"}')
                while not lost.is_set():
                    if not await event_set_within(lost, CHECK_SECONDS):
                        await connection.fetchval("SELECT 1", timeout=NETWORK_TIMEOUT_SECONDS)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:  # TimeoutError is an OSError
                log.warning("event listener disconnected: %s: %s", type(error).__name__, error)
            finally:
                self.connected.clear()
                if connection is not None and not connection.is_closed():
                    with contextlib.suppress(Exception):  # past the timeout asyncpg terminates it: gone either way
                        await connection.close(timeout=NETWORK_TIMEOUT_SECONDS)
            await asyncio.sleep(RECONNECT_SECONDS)
