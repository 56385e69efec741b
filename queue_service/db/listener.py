"""LISTEN on the events channel from a dedicated connection, outside the pool,
and hand each decoded message to the subscribers. Reconnects after a failure;
while it is down, the worker's polling fallback keeps dispatch going."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, Final

import asyncpg

from queue_service.db.engine import asyncpg_dsn
from queue_service.db.events import CHANNEL

RECONNECT_SECONDS: Final = 1.0
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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _deliver(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            message = json.loads(str(payload))
        except ValueError:
            log.warning("ignoring a malformed notification: %r", str(payload)[:200])
            return
        for subscriber in list(self._subscribers):
            try:
                subscriber(message)
            except Exception:  # one faulty subscriber must not silence the others
                log.exception("event subscriber failed")

    async def _run(self) -> None:
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()
                connection.add_termination_listener(_setter(lost))
                await connection.add_listener(CHANNEL, self._deliver)
                self.connected.set()
                # Whatever was announced while we were away is covered by a wake-up.
                self._deliver(None, 0, CHANNEL, '{"event": "dispatch.wake"}')
                await lost.wait()
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("event listener disconnected: %s", error)
            finally:
                self.connected.clear()
                if connection is not None and not connection.is_closed():
                    await connection.close()
            await asyncio.sleep(RECONNECT_SECONDS)
