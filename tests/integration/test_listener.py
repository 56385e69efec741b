"""The event listener against a real server: what it hands its subscribers."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.db.engine import asyncpg_dsn
from queue_service.db.events import CHANNEL, announce
from queue_service.db.listener import EventListener

pytestmark = pytest.mark.integration


async def test_a_malformed_notification_is_skipped_and_the_next_one_delivered(migrated_url: str) -> None:
    listener = EventListener(migrated_url)
    heard: list[dict[str, Any]] = []
    second = asyncio.Event()

    def subscriber(message: dict[str, Any]) -> None:
        heard.append(message)
        if message.get("job_id") == "job_after":
            second.set()

    listener.subscribe(subscriber)
    await listener.start()
    sender = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await sender.execute(f"SELECT pg_notify('{CHANNEL}', 'not json {{')")
        await sender.execute(f"""SELECT pg_notify('{CHANNEL}', '{{"event": "job.updated", "job_id": "job_after"}}')""")
        async with asyncio.timeout(10):
            await second.wait()
    finally:
        await sender.close()
        await listener.stop()
    # The connect-time wake-up, then the well-formed notification; the malformed one is dropped.
    assert heard == [{"event": "dispatch.wake"}, {"event": "job.updated", "job_id": "job_after"}]


async def test_many_announcements_of_one_transaction_arrive_grouped_whole_and_in_order(
    migrated_url: str, engine: AsyncEngine
) -> None:
    """A transaction's announcements go out a group per notification (each under
    PostgreSQL's 8000-byte limit), and subscribers still hear every message, in order."""
    messages = [{"event": "job.updated", "job_id": f"job_{index:04d}", "type": "x" * 64} for index in range(600)]
    listener = EventListener(migrated_url)
    heard: list[dict[str, Any]] = []
    notifications: list[str] = []
    all_heard = asyncio.Event()

    def subscriber(message: dict[str, Any]) -> None:
        heard.append(message)
        if message.get("job_id") == messages[-1]["job_id"]:
            all_heard.set()

    listener.subscribe(subscriber)
    await listener.start()
    raw = await asyncpg.connect(asyncpg_dsn(migrated_url))
    await raw.add_listener(CHANNEL, lambda *args: notifications.append(args[-1]))
    try:
        async with engine.begin() as conn:
            await announce(conn, messages)
        async with asyncio.timeout(10):
            await all_heard.wait()
    finally:
        await raw.close()
        await listener.stop()
    assert [m for m in heard if m["event"] == "job.updated"] == messages
    assert 1 < len(notifications) < len(messages) / 20
    assert all(len(payload.encode()) < 8000 for payload in notifications)
