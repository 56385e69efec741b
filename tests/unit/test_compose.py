"""docker-compose.yml and the Dockerfile agree with the project (SPEC §11): every
`taskqueue` command and flag is one the real CLI accepts, every variable is a real
Settings field with a valid value, and the services start in the right order.
There is no Docker engine here to run the file, so this is what keeps it honest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer.core
import typer.main
import yaml

from queue_service.cli import app
from queue_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
TASKQUEUE_SERVICES = sorted(name for name, svc in SERVICES.items() if svc.get("command", [None])[0] == "taskqueue")
WORKERS = sorted(name for name in TASKQUEUE_SERVICES if SERVICES[name]["command"][1] == "worker")


def cli() -> typer.core.TyperGroup:
    """The CLI as click sees it (typer ships its own copy of click, so no `click` import)."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return group


def test_the_file_runs_postgres_16_migrate_api_and_two_workers() -> None:
    assert SERVICES["postgres"]["image"] == "postgres:16"
    assert [SERVICES[name]["command"][1] for name in TASKQUEUE_SERVICES].count("worker") == 2
    assert {SERVICES[name]["command"][1] for name in TASKQUEUE_SERVICES} == {"migrate", "api", "worker"}


def test_postgres_keeps_its_data_in_a_volume_and_has_a_healthcheck() -> None:
    postgres = SERVICES["postgres"]
    volume, _, target = postgres["volumes"][0].partition(":")
    assert volume in COMPOSE["volumes"]
    assert target == "/var/lib/postgresql/data"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_migrations_run_once_before_the_rest() -> None:
    migrate = SERVICES["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    for name in TASKQUEUE_SERVICES:
        if name != "migrate":
            assert SERVICES[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}


@pytest.mark.parametrize("service", TASKQUEUE_SERVICES)
def test_every_command_parses_with_the_real_cli(service: str) -> None:
    _, name, *args = SERVICES[service]["command"]
    group = cli()
    assert name in group.commands, f"taskqueue has no subcommand {name!r}"
    command = group.commands[name]
    known = {opt for param in command.params for opt in param.opts}
    assert {arg for arg in args if arg.startswith("--")} <= known
    # Parsing checks values too (an integer where one is expected, nothing left over).
    context = command.make_context(name, list(args))
    assert not context.args


@pytest.mark.parametrize("service", TASKQUEUE_SERVICES)
def test_every_variable_is_a_setting_with_a_valid_value(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    environment: dict[str, str] = SERVICES[service]["environment"]
    fields = set(Settings.model_fields)
    for variable, value in environment.items():
        name = variable.lower().removeprefix("taskqueue_")
        assert variable == "DATABASE_URL" or (variable.startswith("TASKQUEUE_") and name in fields), variable
        monkeypatch.setenv(variable, str(value))
    settings = Settings()
    assert settings.database_url is not None
    assert settings.database_url.startswith("postgresql+asyncpg://taskqueue:taskqueue@postgres:5432/")


def test_the_workers_are_distinct_nodes_with_their_own_capacities() -> None:
    parsed = []
    for name in WORKERS:
        command = cli().commands["worker"]
        context = command.make_context("worker", list(SERVICES[name]["command"][2:]))
        parsed.append((context.params["node_id"], context.params["cpu_units"], context.params["memory_mb"]))
    assert len({node for node, _, _ in parsed}) == 2
    assert len({(cpu, memory) for _, cpu, memory in parsed}) == 2


def test_the_api_is_published_and_reachable_in_the_container() -> None:
    api = SERVICES["api"]
    context = cli().commands["api"].make_context("api", list(api["command"][2:]))
    assert context.params["host"] == "0.0.0.0"
    assert f"{context.params['port']}:{context.params['port']}" in api["ports"]
    assert str(context.params["port"]) in " ".join(api["healthcheck"]["test"])


def test_the_image_is_built_from_the_dockerfile_with_what_the_service_needs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    for name in TASKQUEUE_SERVICES:
        assert SERVICES[name]["build"] == "."
    for needed in ("queue_service", "simulator", "migrations", "pyproject.toml"):
        assert f"COPY {needed}" in dockerfile or f" {needed} " in dockerfile, needed
    assert 'CMD ["taskqueue", "serve"' in dockerfile
