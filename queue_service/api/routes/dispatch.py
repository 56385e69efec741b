"""`/dispatch`: pause and resume dispatch on every node (SPEC §12).

Paused, submissions are still accepted and running attempts go on; nothing new starts.
Every answer also carries the scheduling policy this process is configured with
(head starts per priority, which is what aging is made of; the candidate window).
"""

from __future__ import annotations

from fastapi import APIRouter

from queue_service.api.deps import EngineDep, SettingsDep
from queue_service.api.schemas import DispatchState, PolicyPublic
from queue_service.db import attempts
from queue_service.settings import Settings

router = APIRouter(prefix="/dispatch", tags=["dispatch control"])


def _policy(settings: Settings) -> PolicyPublic:
    policy = settings.policy_config()
    return PolicyPublic(
        headstart_seconds=dict(policy.headstart_seconds),
        candidate_window=policy.candidate_window,
        backfill=policy.backfill,
    )


@router.get("", response_model=DispatchState, summary="Whether dispatch is paused, and the scheduling policy")
async def dispatch_state(engine: EngineDep, settings: SettingsDep) -> DispatchState:
    async with engine.begin() as conn:
        return DispatchState(paused=await attempts.is_paused(conn), policy=_policy(settings))


async def _set(engine: EngineDep, settings: Settings, paused: bool) -> DispatchState:
    async with engine.begin() as conn:
        await attempts.set_paused(conn, paused)
    return DispatchState(paused=paused, policy=_policy(settings))


@router.post("/pause", response_model=DispatchState, summary="Stop starting new attempts on every node")
async def pause(engine: EngineDep, settings: SettingsDep) -> DispatchState:
    return await _set(engine, settings, True)


@router.post("/resume", response_model=DispatchState, summary="Start dispatching again")
async def resume(engine: EngineDep, settings: SettingsDep) -> DispatchState:
    return await _set(engine, settings, False)
