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
import logging
from collections.abc import Collection
from typing import Any, Final

log = logging.getLogger(__name__)

STOP_SECONDS: Final = 10.0  # a cancelled loop ends in microseconds; this long means it never will


async def event_set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True if it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def stop_tasks(tasks: Collection[asyncio.Task[Any]], seconds: float = STOP_SECONDS) -> bool:
    """Cancel `tasks` and wait up to `seconds` for them to end. A task that outlives its
    cancellation (one swallowed somewhere below it) is logged and left behind rather than
    holding a shutdown forever; False then. A task that failed earlier is logged too."""
    if not tasks:
        return True
    for task in tasks:
        task.cancel()
    done, stuck = await asyncio.wait(tasks, timeout=seconds)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s had failed before it was stopped", task.get_name(), exc_info=task.exception())
    for task in stuck:
        log.error("%s did not stop within %gs of its cancellation: left behind", task.get_name(), seconds)
    return not stuck
