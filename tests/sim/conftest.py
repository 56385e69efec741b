"""Shared helpers for simulator tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_DIR = ROOT / "scenarios"


@pytest.fixture
def scenario_dir() -> Path:
    return SCENARIO_DIR
