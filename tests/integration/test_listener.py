"""The event listener against a real server: what it hands its subscribers."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from queue_service.db.engine import asyncpg_dsn
from queue_service.db.events import CHANNEL
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
