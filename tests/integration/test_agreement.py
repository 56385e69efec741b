"""Sim-to-real agreement (issue #8): every scenario file run against the live service
in real time (`taskqueue replay`'s code: HTTP submissions at `submit_at`, cancels at
`cancel_at`, results read back from the API) and set beside `simulate` on the same
file, simulated with the service's own time per attempt as measured in the run.
Final statuses equal, start order Kendall tau ≥ 0.95, makespan within 5% + 0.5 s.

The six small files also start every pair in the simulator's order wherever the
simulator starts them further apart than the measured dispatch latency. `load_1000`
keeps ~90% of the node busy for 38 simulated minutes: there a few milliseconds of
difference decide which job a freed unit backfills, and that choice moves later
starts by seconds, so its order is judged by tau alone (the pairs are reported).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from api_fixtures import SCENARIOS, live_service

from queue_service.replay import prepare, replay
from simulator.agreement import MIN_TAU, render
from simulator.scenario import load_scenario

pytestmark = [pytest.mark.integration]

TIME_SCALE = 0.5  # every time halved: the six small files replay in about 25 s
LOAD_TIME_SCALE = 0.025  # load_1000's 38 minutes in about a minute
LOAD = "load_1000"


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda path: path.stem)
async def test_live_run_agrees_with_the_simulator(path: Path, migrated_url: str) -> None:
    scale = LOAD_TIME_SCALE if path.stem == LOAD else TIME_SCALE
    scenario = prepare(load_scenario(path), time_scale=scale, prefix=f"{path.stem}.")
    async with live_service(migrated_url, scenario, node_id=f"agree-{path.stem}") as client:
        result = await replay(client, scenario, poll_interval=0.1)
    agreement = result.agreement
    print("\n" + render(agreement))
    assert agreement.statuses_equal, agreement.status_mismatches
    assert agreement.tau >= MIN_TAU
    assert agreement.makespan_ok, (agreement.makespan_sim, agreement.makespan_live)
    if path.stem != LOAD:
        assert not agreement.order_violations
