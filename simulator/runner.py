"""One scenario end to end: simulate, measure, check invariants and expectations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from simulator import metrics as metrics_module
from simulator.engine import simulate
from simulator.expectations import check_expectations
from simulator.invariants import Check, check_all
from simulator.metrics import Metrics
from simulator.records import SimulationResult
from simulator.scenario import Scenario


@dataclass(frozen=True)
class ScenarioRun:
    scenario: Scenario
    result: SimulationResult
    metrics: Metrics
    invariants: tuple[Check, ...]
    expectations: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in (*self.invariants, *self.expectations))


def run_scenario(scenario: Scenario, on_progress: Callable[[int], None] | None = None) -> ScenarioRun:
    result, monitor = simulate(scenario, on_progress)
    measured = metrics_module.compute(result)
    return ScenarioRun(
        scenario=scenario,
        result=result,
        metrics=measured,
        invariants=tuple(check_all(result, monitor)),
        expectations=tuple(check_expectations(scenario.expect, result, measured, monitor)),
    )
