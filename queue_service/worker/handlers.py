"""The handler registry (SPEC §6): `type` → async callable, with built-in simulated work.

    from queue_service.worker.handlers import PermanentError, handler

    @handler("send_email")
    async def send_email(job: JobContext) -> dict[str, object]:
        ...

A type without a registered handler runs the simulated handler, which reads
`payload.simulate` exactly as the simulator does (through core), unless strict
handlers are configured: then it fails at run time as a permanent error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from queue_service.core.execution import simulated_attempt
from queue_service.core.model import AttemptOutcome
from queue_service.core.validation import simulated_work


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help: the job fails at once."""


@dataclass(frozen=True)
class JobContext:
    """What a handler is given about the attempt it runs."""

    job_id: str
    type: str
    priority: str
    payload: dict[str, Any]
    attempt: int
    timeout_seconds: float


Handler = Callable[[JobContext], Awaitable[Any]]


@dataclass
class HandlerRegistry:
    handlers: dict[str, Handler] = field(default_factory=dict)

    def register(self, job_type: str, fn: Handler) -> Handler:
        if job_type in self.handlers:
            raise ValueError(f"a handler for {job_type!r} is already registered")
        self.handlers[job_type] = fn
        return fn

    def handler(self, job_type: str) -> Callable[[Handler], Handler]:
        """Decorator: `@registry.handler("send_email")`."""
        return lambda fn: self.register(job_type, fn)

    def resolve(self, job_type: str, *, strict: bool) -> Handler:
        if job_type in self.handlers:
            return self.handlers[job_type]
        return _unregistered if strict else simulated_handler


async def simulated_handler(job: JobContext) -> dict[str, Any]:
    """Built-in work: sleep for the simulated duration, and fail, overrun or give up
    on the attempts `payload.simulate` names (the same rules the simulator applies)."""
    work = simulated_work(job.payload)
    behaviour = simulated_attempt(job.type, work, job.attempt, job.timeout_seconds)
    if behaviour.outcome is AttemptOutcome.TIMED_OUT:
        await asyncio.sleep(job.timeout_seconds * 2 + 1)  # overrun: the worker's timeout stops it
    await asyncio.sleep(behaviour.run_seconds)
    if behaviour.outcome is AttemptOutcome.FAILED:
        raise RuntimeError(f"simulated failure of attempt {job.attempt}")
    if behaviour.outcome is AttemptOutcome.PERMANENT_FAILURE:
        raise PermanentError(f"simulated permanent failure of attempt {job.attempt}")
    return {"simulated": True, "duration_seconds": behaviour.run_seconds}


async def _unregistered(job: JobContext) -> Any:
    raise PermanentError(f"no handler is registered for type {job.type!r} (strict handlers)")


default_registry = HandlerRegistry()
handler = default_registry.handler
