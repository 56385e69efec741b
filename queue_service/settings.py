"""Service configuration (SPEC §12): environment variables read through pydantic-settings.

Every setting is `TASKQUEUE_<NAME>` except `DATABASE_URL`, which takes the plain
`postgresql://user@host:port/db` form users already have and is normalised here to
the asyncpg driver. A `Settings` is built by its callers (`create_app()`, the CLI),
never at import time, so tests and several processes can each build their own;
CLI flags override the environment by being passed as keyword arguments.
"""

from __future__ import annotations

import functools
import hashlib
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
# Connections a process keeps open. A `serve` process's node holds a few for its loops
# beside the requests in flight; a connection beyond the pool is opened for a checkout
# and closed at its return, so a pool smaller than the steady concurrency opens and
# closes one per request (measured: 16 clients' submissions 30% slower with 10).
DEFAULT_DB_POOL_SIZE: Final = 20
DEFAULT_DB_MAX_OVERFLOW: Final = 10
# A database that stops answering (a partition drops packets; TCP notices only after
# minutes) must fail a statement, not hang the node that sent it: its lease loops,
# its recorder and its dispatch retry on the next connection.
DEFAULT_DB_CONNECT_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_DB_COMMAND_TIMEOUT_SECONDS: Final = 60.0
DEFAULT_LEADER_INTERVAL_SECONDS: Final = 1.0  # the leader's tick (cron resolution) and a standby's retry (fail-over)
DEFAULT_STREAM_BUFFER: Final = 1000  # events queued for one WebSocket client before it is dropped as too slow
DEFAULT_STREAM_HEARTBEAT_SECONDS: Final = 15.0  # below common proxy idle timeouts (30-60 s)
API_KEY_DIGEST_BYTES: Final = hashlib.sha256().digest_size


def api_key_digest(key: str) -> bytes:
    """The SHA-256 of an API key: all the service keeps of a configured key, and
    what a presented one is turned into before the constant-time comparison.
    Any text hashes, even a lone surrogate a client sent: a bad key is a 401, never a 500."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


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
    retention_seconds: float | None = Field(
        default=None, gt=0, description="the leader deletes completed/cancelled jobs older than this; unset keeps all"
    )
    leader_interval_seconds: float = Field(
        default=DEFAULT_LEADER_INTERVAL_SECONDS,
        gt=0,
        description="how often the leader runs its duties, and a standby node tries to take over",
    )

    headstart_critical_seconds: float = Field(default=c.DEFAULT_HEADSTART_SECONDS["critical"], ge=0)
    headstart_high_seconds: float = Field(default=c.DEFAULT_HEADSTART_SECONDS["high"], ge=0)
    headstart_normal_seconds: float = Field(default=c.DEFAULT_HEADSTART_SECONDS["normal"], ge=0)
    headstart_low_seconds: float = Field(default=c.DEFAULT_HEADSTART_SECONDS["low"], ge=0)
    candidate_window: int = Field(default=c.DEFAULT_CANDIDATE_WINDOW, ge=1)

    node_id: str | None = Field(default=None, min_length=1, description="unset: <hostname>-<pid>")
    node_cpu_units: int = Field(default=c.DEFAULT_NODE_CPU_UNITS, ge=1)
    node_memory_mb: int = Field(default=c.DEFAULT_NODE_MEMORY_MB, ge=1)

    # Held as SHA-256 digests only: a dump, repr or core file of the settings shows no key,
    # and a presented key is hashed and compared digest to digest (api.deps.api_key_matches).
    api_keys: Annotated[tuple[bytes, ...], NoDecode] = Field(
        default=(), repr=False, description="comma-separated bearer tokens; empty leaves the API open"
    )
    strict_handlers: bool = False

    db_pool_size: int = Field(
        default=DEFAULT_DB_POOL_SIZE,
        ge=1,
        description="connections kept by each of a process's two pools (units of work; single statements)",
    )
    db_max_overflow: int = Field(default=DEFAULT_DB_MAX_OVERFLOW, ge=0)
    db_connect_timeout_seconds: float = Field(default=DEFAULT_DB_CONNECT_TIMEOUT_SECONDS, gt=0)
    db_command_timeout_seconds: float | None = Field(
        default=DEFAULT_DB_COMMAND_TIMEOUT_SECONDS, gt=0, description="a statement running longer fails; unset: none"
    )

    stream_buffer: int = Field(default=DEFAULT_STREAM_BUFFER, ge=1, description="events per WebSocket client")
    stream_heartbeat_seconds: float = Field(default=DEFAULT_STREAM_HEARTBEAT_SECONDS, gt=0)

    @field_validator("database_url", mode="before")
    @classmethod
    def _normalize_database_url(cls, value: object) -> object:
        if isinstance(value, str):
            # An empty DATABASE_URL= in a .env or compose file means "unset".
            return normalize_database_url(value) if value.strip() else None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _hash_api_keys(cls, value: object) -> object:
        """Keys given as text ("k1,k2" or a sequence of str) become digests, once, here;
        digests (bytes, as from a settings dump) are kept as they are."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            keys = (key.strip() if isinstance(key, str) else key for key in value)
            return tuple(api_key_digest(key) if isinstance(key, str) else key for key in keys if key)
        return value

    @field_validator("api_keys", mode="after")
    @classmethod
    def _only_digests(cls, value: tuple[bytes, ...]) -> tuple[bytes, ...]:
        if any(len(digest) != API_KEY_DIGEST_BYTES for digest in value):
            raise ValueError("api_keys: give keys as text; bytes are taken as SHA-256 digests")
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
        """The core policy's knobs as configured here (one instance for the same knobs:
        every submission asks, and building and checking one took 7 us)."""
        return _policy_config(
            self.headstart_critical_seconds,
            self.headstart_high_seconds,
            self.headstart_normal_seconds,
            self.headstart_low_seconds,
            self.candidate_window,
        )


@functools.lru_cache(maxsize=8)
def _policy_config(critical: float, high: float, normal: float, low: float, candidate_window: int) -> PolicyConfig:
    headstarts = {Priority.CRITICAL: critical, Priority.HIGH: high, Priority.NORMAL: normal, Priority.LOW: low}
    return PolicyConfig(headstart_seconds=headstarts, candidate_window=candidate_window)
