"""Fan-out of job events from the process's one LISTEN connection to WebSocket clients.

Every API replica LISTENs on the events channel (db.listener), so each sees every
status change whichever process made it. The hub hands each `job.updated` event
to the clients whose filters match, through a bounded per-client buffer: the
listener callback only ever does `put_nowait`, so a slow or dead client can
neither stall the others nor the database connection. A client whose buffer
overruns is marked and dropped by its own sender task with `CLOSE_TOO_SLOW`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final

from queue_service.core import constants as c
from queue_service.core.model import JobStatus
from queue_service.core.validation import is_valid_job_id
from queue_service.db.events import JOB_UPDATED, QUEUE_ENTRY
from queue_service.db.listener import EventListener

MAX_JOB_ID_FILTERS: Final = 1000  # a filter list longer than this is a mistake, not a use
CLOSE_TOO_SLOW: Final = 1013  # RFC 6455 "try again later": the client fell behind its buffer
CLOSE_POLICY: Final = 1008  # RFC 6455 "policy violation": bad filters or credentials
CLOSE_GOING_AWAY: Final = 1001  # the server is shutting down


class InvalidFilter(ValueError):
    """A stream filter that can never match, or that is not well formed."""


@dataclass(frozen=True)
class StreamFilter:
    """Which events a client wants; an empty field matches everything."""

    job_ids: frozenset[str] = frozenset()
    type: str | None = None
    statuses: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, job_ids: Sequence[str], types: Sequence[str], statuses: Sequence[str]) -> StreamFilter:
        """The filter of a `?job_id=…&type=…&status=…` query; InvalidFilter names what is wrong."""
        if len(job_ids) > MAX_JOB_ID_FILTERS:
            raise InvalidFilter(f"at most {MAX_JOB_ID_FILTERS} job_id filters")
        bad_ids = [job_id for job_id in job_ids if not is_valid_job_id(job_id)]
        if bad_ids:
            raise InvalidFilter(f"not a job id: {bad_ids[0][:64]!r}")
        if len(types) > 1:
            raise InvalidFilter("type may be given once")
        job_type = types[0] if types else None
        if job_type is not None and not 1 <= len(job_type) <= c.JOB_TYPE_MAX_LENGTH:
            raise InvalidFilter(f"type must be 1..{c.JOB_TYPE_MAX_LENGTH} characters")
        known = {s.value for s in JobStatus}
        unknown = [s for s in statuses if s not in known]
        if unknown:
            raise InvalidFilter(f"unknown status {unknown[0][:32]!r}; one of {', '.join(sorted(known))}")
        return cls(frozenset(job_ids), job_type, frozenset(statuses))

    def matches(self, event: Mapping[str, Any]) -> bool:
        return (
            (not self.job_ids or event.get("job_id") in self.job_ids)
            and (self.type is None or event.get("type") == self.type)
            and (not self.statuses or event.get("status") in self.statuses)
        )

    def describe(self) -> dict[str, Any]:
        return {"job_id": sorted(self.job_ids), "type": self.type, "status": sorted(self.statuses)}


@dataclass(eq=False)
class StreamClient:
    """One subscriber: its filter and its bounded buffer of encoded frames.

    `None` in the buffer is a wake-up (shutdown), never sent.
    """

    filter: StreamFilter
    capacity: int
    queue: asyncio.Queue[str | None] = field(init=False)
    overrun: bool = False
    closing: bool = False

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.capacity)

    def offer(self, frame: str) -> bool:
        """Buffer a frame; False (and marked overrun, buffer left as is) if it is full."""
        if self.overrun or self.closing:
            return False
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.overrun = True
            return False
        return True

    def close(self) -> None:
        self.closing = True
        # A full buffer already wakes the sender; otherwise the sentinel does.
        with suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)


class EventHub:
    """The per-process fan-out point between the event listener and stream clients."""

    def __init__(self, listener: EventListener, buffer: int) -> None:
        self.buffer = buffer
        self._clients: set[StreamClient] = set()
        self._unsubscribe: Callable[[], None] | None = listener.subscribe(self.publish)
        self.events_published = 0
        self.clients_dropped = 0

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def publish(self, message: Mapping[str, Any]) -> None:
        """Called on the event loop by the listener for every notification; never blocks."""
        if message.get("event") != JOB_UPDATED:
            return  # dispatch wake-ups and cancel orders are internal
        self.events_published += 1
        frame: str | None = None  # encoded once, and only if some client wants it
        for client in self._clients:
            if client.filter.matches(message):
                frame = frame or json.dumps(
                    {key: value for key, value in message.items() if key != QUEUE_ENTRY}, separators=(",", ":")
                )
                if not client.offer(frame) and client.overrun and not client.closing:
                    client.closing = True  # counted once; the sender closes the socket
                    self.clients_dropped += 1

    @contextmanager
    def connect(self, stream_filter: StreamFilter) -> Iterator[StreamClient]:
        """Register a client for the duration of the block."""
        client = StreamClient(stream_filter, self.buffer)
        self._clients.add(client)
        try:
            yield client
        finally:
            self._clients.discard(client)

    def close(self) -> None:
        """Stop receiving events and ask every client's sender to close (shutdown)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for client in list(self._clients):
            client.close()
