"""The service's processes run on uvloop where it is installed (it comes with
uvicorn[standard]); `Server.serve()` called directly would otherwise get the
standard loop, whatever uvicorn's own choice would have been."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from queue_service.cli import run_on_fastest_loop


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed here")
def test_the_service_loop_is_uvloop_when_installed() -> None:
    assert run_on_fastest_loop(_loop_module()).startswith("uvloop")


def test_the_coroutine_result_is_returned_and_errors_propagate() -> None:
    async def fails() -> None:
        raise LookupError("from the coroutine")

    async def answers() -> int:
        return 42

    assert run_on_fastest_loop(answers()) == 42
    with pytest.raises(LookupError, match="from the coroutine"):
        run_on_fastest_loop(fails())
