"""Waiting with a time limit, without the flaw of Python 3.11's `asyncio.wait_for`.

When what `wait_for` waits on completes in the same loop iteration as a cancellation of
the waiting task, 3.11's `wait_for` returns the result and the cancellation is lost: a
loop stopped that way runs on, and whoever awaits its end (a graceful shutdown) waits
forever. `asyncio.timeout` keeps the cancellation, so the service waits with it only;
ruff bans `asyncio.wait_for` outside the tests.
"""

from __future__ import annotations

import asyncio
import contextlib


async def event_set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True if it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
