"""`/dispatch`: pause and resume dispatch on every node (SPEC §12).

Paused, submissions are still accepted and running attempts go on; nothing new starts.
"""

from __future__ import annotations

from fastapi import APIRouter

from queue_service.api.deps import EngineDep
from queue_service.api.schemas import DispatchState
from queue_service.db import attempts

router = APIRouter(prefix="/dispatch", tags=["dispatch control"])


@router.get("", response_model=DispatchState, summary="Whether dispatch is paused")
async def dispatch_state(engine: EngineDep) -> DispatchState:
    async with engine.begin() as conn:
        return DispatchState(paused=await attempts.is_paused(conn))


async def _set(engine: EngineDep, paused: bool) -> DispatchState:
    async with engine.begin() as conn:
        await attempts.set_paused(conn, paused)
    return DispatchState(paused=paused)


@router.post("/pause", response_model=DispatchState, summary="Stop starting new attempts on every node")
async def pause(engine: EngineDep) -> DispatchState:
    return await _set(engine, True)


@router.post("/resume", response_model=DispatchState, summary="Start dispatching again")
async def resume(engine: EngineDep) -> DispatchState:
    return await _set(engine, False)
