"""Throwaway databases for the benchmarks: one fresh database on the configured server
per measurement, dropped afterwards, so no run sees another's rows or bloat."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import asyncpg
from sqlalchemy.engine import make_url

from queue_service.db.engine import asyncpg_dsn
from queue_service.settings import render_url

DEFAULT_SERVER_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url() -> str:
    """The server's maintenance database: `DATABASE_URL`, else the local default."""
    return os.environ.get("DATABASE_URL") or DEFAULT_SERVER_URL


async def admin_execute(url: str, statement: str) -> None:
    """Run one statement (CREATE/DROP DATABASE) on its own connection: no transaction."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@asynccontextmanager
async def fresh_database(url: str, prefix: str) -> AsyncIterator[str]:
    """Create an empty database beside `url`'s, yield its plain `postgresql://` URL, drop it."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    await admin_execute(url, f'CREATE DATABASE "{name}"')
    try:
        yield render_url(make_url(url).set(drivername="postgresql", database=name))
    finally:
        await admin_execute(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
