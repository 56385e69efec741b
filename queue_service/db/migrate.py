"""Applying the Alembic migrations from code (`taskqueue migrate`, and the service at start).

There is no alembic.ini: the Config is built here with `script_location` pointing
at `migrations/` at the repository root (SPEC §2), found next to the
`queue_service` package, which is where an editable install or a checkout has it.

Several replicas may start at once and each apply migrations; an advisory lock
held for the upgrade's transaction makes them take turns, so the second finds
the schema at head and does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from queue_service.settings import normalize_database_url

logger = logging.getLogger(__name__)

MIGRATIONS_DIR: Final = Path(__file__).resolve().parents[2] / "migrations"
# pg_advisory_xact_lock key for "a migration is running"; any fixed 64-bit value
# unused by other advisory locks of the project ('tqmigrat' as ASCII).
MIGRATION_LOCK_KEY: Final = int.from_bytes(b"tqmigrat", "big")


def alembic_config() -> Config:
    """An Alembic Config for this project's migrations, without an ini file."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(f"migrations not found at {MIGRATIONS_DIR}; run from a checkout or an editable install")
    config = Config()
    # ConfigParser interpolates %, which a path may contain.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


def head_revision() -> str:
    """The newest revision the code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("the migrations folder holds no revision")
    return head


async def _run_locked(url: str, step: Callable[[Config], None]) -> None:
    engine = create_async_engine(normalize_database_url(url), poolclass=NullPool)

    def locked(connection: Connection) -> None:
        # Taken in the transaction Alembic then runs in (it joins an open one), so
        # the lock is released by the commit of the migrations themselves.
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config = alembic_config()
        config.attributes["connection"] = connection
        step(config)

    try:
        async with engine.connect() as connection:
            await connection.run_sync(locked)
            await connection.commit()
    finally:
        await engine.dispose()


async def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` on the database at `url` (any PostgreSQL URL form)."""
    await _run_locked(url, lambda config: command.upgrade(config, revision))
    logger.info("database schema at %s", revision)


async def downgrade(url: str, revision: str) -> None:
    """Revert migrations down to `revision` ("base" removes the whole schema)."""
    await _run_locked(url, lambda config: command.downgrade(config, revision))
    logger.info("database schema downgraded to %s", revision)


def upgrade_sync(url: str, revision: str = "head") -> None:
    """`upgrade` for callers without an event loop (the CLI); not from inside a running loop."""
    asyncio.run(upgrade(url, revision))


async def current_revision(url: str) -> str | None:
    """The revision the database is at, or None for an empty database."""
    engine = create_async_engine(normalize_database_url(url), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
    finally:
        await engine.dispose()
