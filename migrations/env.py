"""Alembic environment: runs the migrations on a connection or URL handed over in code.

There is no alembic.ini; `queue_service.db.migrate` builds the Config and passes
either an open connection (`config.attributes["connection"]`, which migrate uses
so it can hold an advisory lock around the upgrade) or a URL
(`config.attributes["url"]`, else the `DATABASE_URL` environment variable).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from queue_service.db.tables import metadata
from queue_service.settings import normalize_database_url

config = context.config
target_metadata = metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("no database to migrate: pass a URL to queue_service.db.migrate or set DATABASE_URL")
    return normalize_database_url(str(url))


def _configure(**kwargs: Any) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, compare_server_default=True, **kwargs)


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (`alembic upgrade --sql`)."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_on_connection(connection: Connection) -> None:
    # On PostgreSQL DDL is transactional: the whole upgrade commits or none of it.
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_on_url(url: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on_connection)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
elif (given := config.attributes.get("connection")) is not None:
    run_on_connection(given)
else:
    asyncio.run(run_on_url(_url()))
