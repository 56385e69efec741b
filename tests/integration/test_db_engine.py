"""Settings to engine to a live connection: URL forms users have, session settings, units of work."""

from __future__ import annotations

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.db.engine import asyncpg_dsn, create_engine, create_sessionmaker, ping
from queue_service.db.tables import nodes
from queue_service.settings import Settings

pytestmark = pytest.mark.integration


async def test_connections_run_in_utc_without_jit_and_say_who_they_are(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        settings = (
            await connection.execute(
                sa.text(
                    "SELECT current_setting('timezone'), current_setting('jit'), current_setting('application_name')"
                )
            )
        ).one()
    assert tuple(settings) == ("UTC", "off", "taskqueue")


async def test_plain_database_url_from_the_environment_connects(
    migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATABASE_URL as users write it: postgres:// or postgresql://, no driver named."""
    plain = make_url(migrated_url).set(drivername="postgres").render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", plain)
    settings = Settings()
    assert settings.database_url is not None
    assert settings.database_url.startswith("postgresql+asyncpg://")

    engine = create_engine(settings, application_name="taskqueue-test")
    try:
        await ping(engine)
        async with engine.connect() as connection:
            name = (await connection.execute(sa.text("SELECT current_setting('application_name')"))).scalar_one()
        assert name == "taskqueue-test"
    finally:
        await engine.dispose()


async def test_asyncpg_dsn_reaches_the_same_database(migrated_url: str) -> None:
    """The raw DSN is what a LISTEN connection outside the pool uses."""
    dsn = asyncpg_dsn(Settings(database_url=migrated_url).database_url or "")
    assert dsn.startswith("postgresql://")
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SELECT current_database()") == make_url(migrated_url).database
    finally:
        await connection.close()


async def test_a_unit_of_work_commits_or_rolls_back_as_a_whole(engine: AsyncEngine) -> None:
    sessions = create_sessionmaker(engine)
    async with sessions.begin() as session:
        await session.execute(sa.insert(nodes).values(node_id="committed", cpu_capacity=1, memory_capacity=1))

    async def failing_unit() -> None:
        async with sessions.begin() as session:
            await session.execute(sa.insert(nodes).values(node_id="rolled-back", cpu_capacity=1, memory_capacity=1))
            raise RuntimeError("the command failed half way")

    with pytest.raises(RuntimeError):
        await failing_unit()
    async with sessions() as session:
        stored = set((await session.execute(sa.select(nodes.c.node_id))).scalars())
    assert "committed" in stored
    assert "rolled-back" not in stored


def test_engine_needs_a_url() -> None:
    with pytest.raises(ValueError, match="no database URL"):
        create_engine(Settings(database_url=None))
