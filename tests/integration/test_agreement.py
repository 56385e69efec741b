"""Sim-to-real agreement (issue #8): every scenario file run against the live service
in real time (`taskqueue replay`'s code: HTTP submissions at `submit_at`, cancels at
`cancel_at`, results read back from the API) and set beside `simulate` on the same
file. Final statuses equal, start order Kendall tau ≥ 0.95 (and no pair the
simulator starts further apart than the measured dispatch latency started the
other way round), makespan within 5% + 0.5 s.

`load_1000` simulates 38 minutes of traffic; `make evaluate` replays it time-scaled.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from api_fixtures import SCENARIOS, live_service

from queue_service.replay import prepare, replay
from simulator.agreement import MIN_TAU, render
from simulator.scenario import load_scenario

pytestmark = [pytest.mark.integration]

SHORT_SCENARIOS = sorted(path for path in SCENARIOS.glob("*.yaml") if path.stem != "load_1000")
TIME_SCALE = 0.5  # every time halved: the six files replay in about 25 s


@pytest.mark.parametrize("path", SHORT_SCENARIOS, ids=lambda path: path.stem)
async def test_live_run_agrees_with_the_simulator(path: Path, migrated_url: str) -> None:
    scenario = prepare(load_scenario(path), time_scale=TIME_SCALE, prefix=f"{path.stem}.")
    async with live_service(migrated_url, scenario, node_id=f"agree-{path.stem}") as client:
        result = await replay(client, scenario, poll_interval=0.1)
    agreement = result.agreement
    print("\n" + render(agreement))
    assert agreement.statuses_equal, agreement.status_mismatches
    assert agreement.tau >= MIN_TAU
    assert not agreement.order_violations
    assert agreement.makespan_ok, (agreement.makespan_sim, agreement.makespan_live)
