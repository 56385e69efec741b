"""The embedded PostgreSQL (SPEC §7): starts in a folder, is reached over its socket, keeps its data.

Runs its own server in a temporary folder, so it is exercised even when the rest
of the suite uses TEST_DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from queue_service.db import migrate
from queue_service.db.embedded import PGDATA_SUBDIR, start_embedded
from queue_service.db.engine import create_engine, ping
from queue_service.settings import Settings

pytestmark = pytest.mark.integration

STARTUP_BUDGET_SECONDS = 30.0  # initdb on a slow CI disk; it takes about a second on a laptop


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: a Unix socket path is limited to ~100 bytes, and pytest's are long.
    folder = Path(tempfile.mkdtemp(prefix="tq-embedded-test-"))
    try:
        yield folder / "data"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_starts_migrates_keeps_data_and_stops(data_dir: Path) -> None:
    server = await asyncio.to_thread(start_embedded, data_dir)
    try:
        assert server.pgdata == data_dir.resolve() / PGDATA_SUBDIR
        assert server.url.startswith("postgresql://")
        assert "host=" in server.url  # a Unix socket in the data folder, no TCP port
        assert server.startup_seconds < STARTUP_BUDGET_SECONDS

        await migrate.upgrade(server.url)
        engine = create_engine(Settings(database_url=server.url, db_pool_size=1, db_max_overflow=0))
        try:
            async with engine.begin() as connection:
                version = (await connection.execute(sa.text("SHOW server_version_num"))).scalar_one()
                await connection.execute(
                    sa.text("INSERT INTO nodes (node_id, cpu_capacity, memory_capacity) VALUES ('kept', 8, 4096)")
                )
        finally:
            await engine.dispose()
        assert int(version) >= 150000
    finally:
        await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.stop)  # stopping twice is harmless

    engine = create_engine(Settings(database_url=server.url, db_pool_size=1, db_max_overflow=0))
    try:
        with pytest.raises((FileNotFoundError, ConnectionRefusedError)):  # nothing listens on the socket any more
            await ping(engine)
    finally:
        await engine.dispose()

    restarted = await asyncio.to_thread(start_embedded, data_dir)
    try:
        assert await migrate.current_revision(restarted.url) == migrate.head_revision()
        engine = create_engine(Settings(database_url=restarted.url, db_pool_size=1, db_max_overflow=0))
        try:
            async with engine.connect() as connection:
                kept = (await connection.execute(sa.text("SELECT node_id FROM nodes"))).scalars().all()
        finally:
            await engine.dispose()
        assert kept == ["kept"]
    finally:
        await asyncio.to_thread(restarted.stop)
