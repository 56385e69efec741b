"""`queue_service.core` stays pure (SPEC §2): no I/O, clock, randomness or shell imports.

import-linter enforces the third-party and project contracts but does not see the
standard library, so an AST walk over core's sources covers that half.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import queue_service.core

CORE_DIR = Path(queue_service.core.__file__).resolve().parent
REPO_ROOT = CORE_DIR.parents[1]
CORE_PACKAGE = "queue_service.core"

FORBIDDEN_ROOTS = frozenset(
    {
        # I/O, clocks, concurrency and entropy from the standard library
        "asyncio",
        "threading",
        "socket",
        "time",
        "random",
        "datetime",
        "os",
        "subprocess",
        # I/O libraries
        "sqlalchemy",
        "asyncpg",
        "fastapi",
        "simpy",
        # the project's other top-level packages
        "simulator",
        "loadtest",
    }
)


def _absolute(node: ast.ImportFrom, module_name: str, is_package: bool) -> str:
    """Resolve `from .x import y` inside `module_name` to an absolute module name."""
    if node.level == 0:
        return node.module or ""
    parts = module_name.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def forbidden_imports(source: str, module_name: str, is_package: bool = False) -> list[str]:
    """Every import in `source` that core must not make, as `line: module`."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module_name, is_package)
            # `from queue_service import api` imports the module queue_service.api
            names = [f"{base}.{alias.name}" if base == "queue_service" else base for alias in node.names]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            outside_core = root == "queue_service" and not (name == CORE_PACKAGE or name.startswith(CORE_PACKAGE + "."))
            if root in FORBIDDEN_ROOTS or outside_core:
                found.append(f"{node.lineno}: {name}")
    return found


def _core_modules() -> list[Path]:
    return sorted(CORE_DIR.rglob("*.py"))


def test_core_has_the_modules_we_expect_to_check() -> None:
    names = {path.stem for path in _core_modules()}
    assert {"model", "states", "backoff", "dag", "execution", "validation", "policy"} <= names


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: p.name)
def test_core_module_imports_nothing_impure(path: Path) -> None:
    relative = path.relative_to(REPO_ROOT).with_suffix("")
    is_package = relative.name == "__init__"
    module_name = ".".join(relative.parent.parts if is_package else relative.parts)
    assert forbidden_imports(path.read_text(encoding="utf-8"), module_name, is_package) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import time as clock",
        "import os.path",
        "from datetime import datetime",
        "from random import Random",
        "def f():\n    import threading",
        "from sqlalchemy.ext.asyncio import AsyncSession",
        "import queue_service.db",
        "from queue_service.worker import runtime",
        "from queue_service import api",
        "from queue_service import core, cli",
        "from ..db import tables",
        "from .. import worker",
        "import simulator.engine",
        "from loadtest import bench_simulator",
        "import queue_service",
        "from queue_service import settings",
    ],
)
def test_the_check_catches_an_impure_import(source: str) -> None:
    assert forbidden_imports(source, "queue_service.core.policy") != []


@pytest.mark.parametrize(
    "source",
    [
        "import hashlib",
        "import networkx as nx",
        "from queue_service.core import constants as c",
        "from queue_service.core.model import Resources",
        "from queue_service import core",
        "from . import model",
        "from .errors import QueueError",
        "import timeit_is_not_time",
    ],
)
def test_the_check_allows_pure_imports(source: str) -> None:
    assert forbidden_imports(source, "queue_service.core.policy") == []


def test_import_linter_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
