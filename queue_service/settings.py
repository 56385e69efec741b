"""Service configuration (SPEC §12): environment variables read through pydantic-settings.

Every setting is `TASKQUEUE_<NAME>` except `DATABASE_URL`, which takes the plain
`postgresql://user@host:port/db` form users already have and is normalised here to
the asyncpg driver. A `Settings` is built by its callers (`create_app()`, the CLI),
never at import time, so tests and several processes can each build their own;
CLI flags override the environment by being passed as keyword arguments.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Final

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from queue_service.core import constants as c
from queue_service.core.model import Priority, Resources
from queue_service.core.policy import PolicyConfig

ASYNC_DRIVER: Final = "postgresql+asyncpg"
# Schemes users paste from Heroku, libpq, docker-compose files or SQLAlchemy docs.
_POSTGRES_SCHEMES: Final = frozenset({"postgres", "postgresql"})

DEFAULT_DATA_DIR: Final = Path(".data")
DEFAULT_LEASE_SECONDS: Final = 30.0
DEFAULT_SHUTDOWN_GRACE_SECONDS: Final = 30.0
DEFAULT_POLL_INTERVAL_SECONDS: Final = 1.0  # fallback when a NOTIFY is missed
HEARTBEATS_PER_LEASE: Final = 3  # a lease survives two lost heartbeats
DEFAULT_DB_POOL_SIZE: Final = 10
DEFAULT_DB_MAX_OVERFLOW: Final = 10


def default_node_id() -> str:
    """`<hostname>-<pid>`: unique per process, so several nodes can share one host."""
    return f"{socket.gethostname()}-{os.getpid()}"


def normalize_database_url(raw: str) -> str:
    """The SQLAlchemy asyncpg form of a PostgreSQL URL.

    `postgres://` and `postgresql://` (with or without another driver) become
    `postgresql+asyncpg://`. Query parameters are kept, so `?host=/socket/dir`
    still reaches a Unix socket; libpq's `sslmode` becomes asyncpg's `ssl`,
    because SQLAlchemy hands query parameters to `asyncpg.connect` as keywords.
    """
    try:
        url = make_url(raw.strip())
    except ArgumentError as error:
        raise ValueError(f"not a database URL: {error}") from None
    backend = url.drivername.partition("+")[0]
    if backend not in _POSTGRES_SCHEMES:
        raise ValueError(f"DATABASE_URL must be a PostgreSQL URL (postgresql://...), not {url.drivername}://")
    url = url.set(drivername=ASYNC_DRIVER)
    if "sslmode" in url.query and "ssl" not in url.query:
        url = url.update_query_dict({"ssl": url.query["sslmode"]}).difference_update_query(["sslmode"])
    return render_url(url)


def render_url(url: URL) -> str:
    """A URL as a string with its password: `str(url)` would mask it as ***."""
    return url.render_as_string(hide_password=False)


class Settings(BaseSettings):
    """Everything the service, a worker node and the CLI can be told."""

    model_config = SettingsConfigDict(
        env_prefix="TASKQUEUE_",
        extra="ignore",
        frozen=True,
        populate_by_name=True,  # Settings(database_url=...) as well as the DATABASE_URL alias
    )

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("database_url", "DATABASE_URL", "TASKQUEUE_DATABASE_URL"),
        description="PostgreSQL URL; unset starts an embedded server in data_dir",
    )
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="where the embedded PostgreSQL keeps its files")

    lease_seconds: float = Field(default=DEFAULT_LEASE_SECONDS, gt=0)
    heartbeat_seconds: float | None = Field(default=None, gt=0, description="lease renewal interval; lease/3 if unset")
    shutdown_grace_seconds: float = Field(default=DEFAULT_SHUTDOWN_GRACE_SECONDS, ge=0)
    poll_interval_seconds: float = Field(default=DEFAULT_POLL_INTERVAL_SECONDS, gt=0)

    headstart_critical_seconds: float = Field(default=c.DEFAULT_HEADSTART_SECONDS["critical"], ge=0)
    headstart_high_seconds: float = Field(default=c.DEFAULT_HEADSTART_SECONDS["high"], ge=0)
    headstart_normal_seconds: float = Field(default=c.DEFAULT_HEADSTART_SECONDS["normal"], ge=0)
    headstart_low_seconds: float = Field(default=c.DEFAULT_HEADSTART_SECONDS["low"], ge=0)
    candidate_window: int = Field(default=c.DEFAULT_CANDIDATE_WINDOW, ge=1)

    node_id: str | None = Field(default=None, min_length=1, description="unset: <hostname>-<pid>")
    node_cpu_units: int = Field(default=c.DEFAULT_NODE_CPU_UNITS, ge=1)
    node_memory_mb: int = Field(default=c.DEFAULT_NODE_MEMORY_MB, ge=1)

    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="comma-separated bearer tokens; empty leaves the API open"
    )
    strict_handlers: bool = False

    db_pool_size: int = Field(default=DEFAULT_DB_POOL_SIZE, ge=1)
    db_max_overflow: int = Field(default=DEFAULT_DB_MAX_OVERFLOW, ge=0)

    @field_validator("database_url", mode="before")
    @classmethod
    def _normalize_database_url(cls, value: object) -> object:
        if isinstance(value, str):
            # An empty DATABASE_URL= in a .env or compose file means "unset".
            return normalize_database_url(value) if value.strip() else None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_interval_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds, or the lease lapses between beats")
        return self

    @property
    def heartbeat_interval_seconds(self) -> float:
        """How often a running attempt renews its lease."""
        if self.heartbeat_seconds is not None:
            return self.heartbeat_seconds
        return self.lease_seconds / HEARTBEATS_PER_LEASE

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)

    def resolved_node_id(self) -> str:
        """The configured node id, else `<hostname>-<pid>` of the calling process."""
        return self.node_id if self.node_id is not None else default_node_id()

    def node_capacity(self) -> Resources:
        return Resources(self.node_cpu_units, self.node_memory_mb)

    def policy_config(self) -> PolicyConfig:
        """The core policy's knobs as configured here."""
        return PolicyConfig(
            headstart_seconds={
                Priority.CRITICAL: self.headstart_critical_seconds,
                Priority.HIGH: self.headstart_high_seconds,
                Priority.NORMAL: self.headstart_normal_seconds,
                Priority.LOW: self.headstart_low_seconds,
            },
            candidate_window=self.candidate_window,
        )
