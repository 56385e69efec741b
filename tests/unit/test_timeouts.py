"""A loop that waits with a time limit stops when it is cancelled, even when what it
waits for arrives in the same instant: graceful shutdown awaits such loops, and a lost
cancellation would keep it waiting forever (Python 3.11's `asyncio.wait_for` loses it)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from queue_service.timeouts import event_set_within, stop_tasks


async def _wake_loop(wake: asyncio.Event) -> None:
    """The shape of the node's and the leader's loops: wait for a wake-up or a tick, work, again."""
    while True:
        await event_set_within(wake, 5.0)
        wake.clear()


async def test_a_loop_cancelled_as_its_event_is_set_stops() -> None:
    wake = asyncio.Event()
    loop = asyncio.create_task(_wake_loop(wake))
    await asyncio.sleep(0.01)  # the loop is waiting
    wake.set()
    loop.cancel()  # same instant: the wake-up and the stop meet
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1.0):
            await loop
    assert loop.cancelled()


async def test_a_loop_cancelled_while_waiting_stops() -> None:
    loop = asyncio.create_task(_wake_loop(asyncio.Event()))
    await asyncio.sleep(0.01)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop


async def test_it_answers_whether_the_event_was_set_in_time() -> None:
    event = asyncio.Event()
    started = time.monotonic()
    assert await event_set_within(event, 0.05) is False
    assert time.monotonic() - started >= 0.05
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await event_set_within(event, 5.0) is True
    assert await event_set_within(event, 0.0) is True  # already set: no wait at all


async def _swallows_one_cancellation(stopped: asyncio.Event) -> None:
    with contextlib.suppress(asyncio.CancelledError):  # the flaw stop_tasks guards against, on purpose
        await asyncio.sleep(60)
    await stopped.wait()


async def test_stopping_leaves_behind_a_task_that_ignores_its_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    stopped = asyncio.Event()
    stubborn = asyncio.create_task(_swallows_one_cancellation(stopped), name="stubborn")
    obedient = asyncio.create_task(asyncio.sleep(60), name="obedient")
    await asyncio.sleep(0.01)
    started = time.monotonic()
    assert await stop_tasks([stubborn, obedient], seconds=0.1) is False
    assert time.monotonic() - started < 1.0  # bounded: the shutdown goes on
    assert obedient.cancelled()
    assert "stubborn did not stop" in caplog.text
    stopped.set()
    await stubborn


async def test_stopping_well_behaved_tasks_says_so() -> None:
    loops = [asyncio.create_task(asyncio.sleep(60)) for _ in range(3)]
    assert await stop_tasks(loops) is True
    assert all(loop.cancelled() for loop in loops)
    assert await stop_tasks([]) is True
