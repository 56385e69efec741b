"""The plans of the statements a function runs, as auto_explain reports them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg


@asynccontextmanager
async def nested_plans(connection: asyncpg.Connection) -> AsyncIterator[list[str]]:
    """Within the block, the plan of every statement `connection` runs, functions' own
    statements included: auto_explain sends each to the client as a log message."""
    plans: list[str] = []

    def collect(_connection: Any, message: Any) -> None:
        plans.append(message.message)

    connection.add_log_listener(collect)
    await connection.execute(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
        " SET client_min_messages = log"
    )
    try:
        yield plans
    finally:
        await connection.execute("RESET client_min_messages; SET auto_explain.log_min_duration = -1")
        connection.remove_log_listener(collect)
