"""`/schedules`: cron schedules that create jobs (SPEC §10).

`POST /schedules` validates the expression and zone with croniter and the job
template with the same rules as a submission; the answers carry the next fire
times. Firing itself is the leader's duty (`worker.leader`), not the API's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Response

from queue_service import cron
from queue_service.api.deps import RuntimeDep
from queue_service.api.schemas import Problem, ScheduleCreate, SchedulePage, SchedulePublic, ScheduleUpdate
from queue_service.core.validation import check_schedulable
from queue_service.db import schedules
from queue_service.runtime import Runtime

router = APIRouter(prefix="/schedules", tags=["schedules"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "schedule_not_found"}}
_INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "description": "invalid_schedule (bad cron, zone or job template), unschedulable"}
}


def _now() -> datetime:
    return datetime.now(UTC)


async def _check(
    runtime: Runtime, name: str, cron_expr: str | None, zone: str | None, template: Any, *, new: bool
) -> None:
    """Every problem of the fields being set, at once; then the template must fit some node."""
    problems = cron.schedule_problems(name if new else None, cron_expr, zone)
    if template is not None:
        try:
            label = name if not cron.schedule_problems(name, None, None) else "schedule"
            spec = cron.template_spec(template, label, _now())
        except cron.InvalidSchedule as invalid:
            problems += invalid.problems
        else:
            if not problems:
                async with runtime.engine.begin() as conn:
                    capacities = await runtime.capacities.get(conn) or [runtime.settings.node_capacity()]
                check_schedulable(spec, max(capacities))
    if problems:
        raise cron.InvalidSchedule(problems)


@router.post("", status_code=201, response_model=SchedulePublic, summary="Create a cron schedule", responses=_INVALID)
async def create_schedule(body: ScheduleCreate, runtime: RuntimeDep, response: Response) -> dict[str, Any]:
    await _check(runtime, body.name, body.cron, body.timezone, body.job_template, new=True)
    async with runtime.engine.begin() as conn:
        created = await schedules.create_schedule(conn, body.model_dump(), _now())
    response.headers["Location"] = f"/schedules/{body.name}"
    return created


@router.get("", response_model=SchedulePage, summary="Every schedule, by name, with its next fire times")
async def list_schedules(runtime: RuntimeDep) -> dict[str, Any]:
    async with runtime.engine.begin() as conn:
        return {"items": await schedules.list_schedules(conn, _now())}


@router.get(
    "/{name}", response_model=SchedulePublic, summary="A schedule and its next fire times", responses=_NOT_FOUND
)
async def get_schedule(name: str, runtime: RuntimeDep) -> dict[str, Any]:
    async with runtime.engine.begin() as conn:
        return await schedules.get_schedule(conn, name, _now())


@router.patch(
    "/{name}",
    response_model=SchedulePublic,
    summary="Change a schedule: enable or disable it, or its expression, zone, template or misfire policy",
    responses={**_NOT_FOUND, **_INVALID},
)
async def update_schedule(name: str, body: ScheduleUpdate, runtime: RuntimeDep) -> dict[str, Any]:
    changes = {key: value for key, value in body.model_dump(exclude_unset=True).items() if value is not None}
    template = changes.get("job_template")
    await _check(runtime, name, changes.get("cron"), changes.get("timezone"), template, new=False)
    async with runtime.engine.begin() as conn:
        return await schedules.update_schedule(conn, name, changes, _now())


@router.delete("/{name}", status_code=204, summary="Delete a schedule (its jobs stay)", responses=_NOT_FOUND)
async def delete_schedule(name: str, runtime: RuntimeDep) -> Response:
    async with runtime.engine.begin() as conn:
        await schedules.delete_schedule(conn, name)
    return Response(status_code=204)
