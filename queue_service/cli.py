"""The `taskqueue` command (SPEC §12): serve, api, worker, migrate, purge; and
`replay` / `export-trace` (issue #8), the simulator set beside the live service.

Settings come from the environment (`DATABASE_URL`, `TASKQUEUE_*`); a flag given
on the command line overrides its variable. Logs are JSON lines on stderr.

Shutdown on SIGTERM/SIGINT is the service's own: uvicorn, left to itself,
re-raises a caught signal after its shutdown so the process dies of it (exit
status 130/143). Here uvicorn's `Server` runs with its signal capture turned
off and our asyncio handlers asking it to exit instead, so the lifespan shutdown
(the worker's graceful stop) runs to the end and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import httpx
import typer
import uvicorn
from pydantic import ValidationError

from queue_service.api.app import create_app
from queue_service.db import migrate as migrations
from queue_service.db import retention
from queue_service.db.engine import create_engine
from queue_service.replay import Replay, ReplayError, client_for, prepare
from queue_service.replay import replay as run_replay
from queue_service.runtime import database_url, open_runtime
from queue_service.settings import Settings
from simulator import agreement
from simulator.report import render as render_simulation
from simulator.scenario import ScenarioError, load_scenario

HANDLED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
HTTP_DRAIN_SECONDS: Final = 10  # open HTTP connections get this long to finish before the lifespan stops
LOG_RECORD_EXTRAS: Final = ("job_id", "attempt", "node_id")

log = logging.getLogger("queue_service.cli")
T = TypeVar("T")
app = typer.Typer(help="Smart Task Queue: a PostgreSQL-backed job queue.", no_args_is_help=True)

Host = Annotated[str, typer.Option(help="interface to listen on")]
Port = Annotated[int, typer.Option(help="TCP port")]
CpuUnits = Annotated[int | None, typer.Option(min=1, help="this node's CPU units (default: 8)")]
MemoryMb = Annotated[int | None, typer.Option(min=1, help="this node's memory in MB (default: 4096)")]
NodeId = Annotated[str | None, typer.Option(help="this node's id (default: <hostname>-<pid>)")]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning or error")]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and job context if given."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in LOG_RECORD_EXTRAS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def load_settings(**flags: Any) -> Settings:
    """Environment settings, with every flag that was given taking precedence."""
    try:
        return Settings(**{name: value for name, value in flags.items() if value is not None})
    except ValidationError as error:
        typer.echo(f"invalid configuration:\n{error}", err=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def on_signals(handler: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to `handler` on the running loop for the duration."""
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)


def run_on_fastest_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop where it is installed (uvicorn[standard] brings it on
    Linux and macOS): calling `Server.serve()` ourselves skips uvicorn's own loop
    choice, and the default loop cost a fifth of a request's time in its
    selector and transports."""
    try:
        import uvloop
    except ImportError:  # e.g. Windows: the standard loop
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling (see the module docstring)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_http(server: _Server) -> None:
    def stop(sig: signal.Signals) -> None:
        if server.should_exit:
            log.info("%s received again; graceful shutdown is under way", sig.name)
            return
        log.info("%s received: shutting down gracefully", sig.name)
        server.should_exit = True

    with on_signals(stop):
        await server.serve()


def _run_http(settings: Settings, host: str, port: int, *, run_worker: bool) -> None:
    config = uvicorn.Config(
        create_app(settings, run_worker=run_worker),
        host=host,
        port=port,
        lifespan="on",
        log_config=None,  # keep our JSON logging; uvicorn's loggers propagate to it
        timeout_graceful_shutdown=HTTP_DRAIN_SECONDS,
    )
    freeze_startup_objects()
    run_on_fastest_loop(_serve_http(_Server(config)))


def freeze_startup_objects() -> None:
    """What is built by now (every module, an app and its schemas) lives as long as the
    process: kept out of the collector's view, a full collection no longer walks it on a
    request's or a job's time (in a node draining short jobs, a twentieth of the time
    went to walking it)."""
    gc.collect()
    gc.freeze()


async def _run_worker(settings: Settings) -> None:
    stopping = asyncio.Event()

    def stop(sig: signal.Signals) -> None:
        log.info("%s received: shutting down gracefully", sig.name)
        stopping.set()

    with on_signals(stop):
        async with open_runtime(settings, run_worker=True):
            await stopping.wait()


async def _migrate(settings: Settings) -> str:
    async with AsyncExitStack() as stack:
        url = await database_url(settings, stack)
        await migrations.upgrade(url)
        return migrations.head_revision()


@app.command()
def serve(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    cpu_units: CpuUnits = None,
    memory_mb: MemoryMb = None,
    node_id: NodeId = None,
    log_level: LogLevel = "info",
) -> None:
    """The API and one worker node in one process (embedded PostgreSQL when DATABASE_URL is unset)."""
    configure_logging(log_level)
    settings = load_settings(node_cpu_units=cpu_units, node_memory_mb=memory_mb, node_id=node_id)
    _run_http(settings, host, port, run_worker=True)


@app.command()
def api(host: Host = "127.0.0.1", port: Port = 8000, log_level: LogLevel = "info") -> None:
    """The API only: add `taskqueue worker` processes to run the jobs."""
    configure_logging(log_level)
    _run_http(load_settings(), host, port, run_worker=False)


@app.command()
def worker(
    cpu_units: CpuUnits = None, memory_mb: MemoryMb = None, node_id: NodeId = None, log_level: LogLevel = "info"
) -> None:
    """One worker node only. Without DATABASE_URL it joins the embedded server in the data folder."""
    configure_logging(log_level)
    settings = load_settings(node_cpu_units=cpu_units, node_memory_mb=memory_mb, node_id=node_id)
    freeze_startup_objects()
    run_on_fastest_loop(_run_worker(settings))


def parse_duration(text: str) -> timedelta:
    """`90`, `90s`, `15m`, `12h` or `7d` as a duration."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 3600, 90m, 12h or 7d") from None
    if seconds <= 0:
        raise typer.BadParameter("the duration must be positive")
    return timedelta(seconds=seconds)


async def _purge(settings: Settings, older_than: timedelta) -> int:
    async with AsyncExitStack() as stack:
        url = await database_url(settings, stack)
        engine = create_engine(settings, url)
        stack.push_async_callback(engine.dispose)
        total = 0
        while True:
            async with engine.begin() as conn:
                purged = await retention.purge_finished(conn, datetime.now(UTC) - older_than)
            total += purged
            if purged < retention.PURGE_BATCH:
                return total


@app.command()
def purge(
    older_than: Annotated[str, typer.Option(help="age of finished jobs to delete: 3600, 90m, 12h, 7d")],
    log_level: LogLevel = "info",
) -> None:
    """Delete completed and cancelled jobs finished longer ago than --older-than (failed jobs stay)."""
    configure_logging(log_level)
    purged = asyncio.run(_purge(load_settings(), parse_duration(older_than)))
    typer.echo(f"purged {purged} finished jobs")


@app.command()
def migrate(log_level: LogLevel = "info") -> None:
    """Apply the database migrations."""
    configure_logging(log_level)
    revision = asyncio.run(_migrate(load_settings()))
    typer.echo(f"database schema at revision {revision}")


async def _replay(path: Path, url: str, api_key: str | None, time_scale: float, prefix: str) -> Replay:
    scenario = prepare(load_scenario(path), time_scale=time_scale, prefix=prefix)
    async with client_for(url, api_key) as client:
        return await run_replay(client, scenario)


@app.command()
def replay(
    scenario: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="scenario YAML file")],
    url: Annotated[str, typer.Option(help="the live service, e.g. http://127.0.0.1:8000")],
    time_scale: Annotated[
        float, typer.Option(min=0.001, help="multiply every time of the scenario (0.25: four times faster)")
    ] = 1.0,
    prefix: Annotated[
        str | None, typer.Option(help="put before every job id (default: replay-<UTC time>.), so runs never clash")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TASKQUEUE_API_KEY", help="bearer key of the service")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for the simulator's report and the agreement")] = None,
) -> None:
    """Run a scenario against a live service in real time and compare it with `simulate`
    on the same file: final statuses, start order (Kendall tau), start-time and makespan
    errors. Exit 1 if they disagree, 2 if the scenario or the service cannot be replayed."""
    run_prefix = f"replay-{datetime.now(UTC):%Y%m%dT%H%M%S}." if prefix is None else prefix
    try:
        result = asyncio.run(_replay(scenario, url, api_key, time_scale, run_prefix))
    except (ScenarioError, ReplayError, httpx.HTTPError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    report = agreement.render(result.agreement)
    typer.echo(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        name = result.simulated.scenario.name
        (out / f"{name}.report.txt").write_text(render_simulation(result.simulated, full_timeline=True), "utf-8")
        (out / f"{name}.agreement.txt").write_text(report, "utf-8")
    if not result.agreement.passed:
        raise typer.Exit(1)
