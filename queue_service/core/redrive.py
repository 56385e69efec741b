"""Dead-letter re-drive (SPEC §4, §10): which failed descendants come back with a re-driven job.

A job re-driven from the dead-letter queue goes back to `ready` (or `blocked`,
if some dependency is not completed), with `max_attempts` more attempts. The
descendants its failure ended (`dependency_failed`) go back to `blocked` with
it, but only those that can run again: a descendant that also depends on some
other failed or cancelled job, which is not coming back, stays failed, because a
blocked job waiting on a dead parent would wait forever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from queue_service.core.model import FailureReason, JobStatus

_DEAD = (JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class Restore:
    """A descendant going back to `blocked`, and how many dependencies it waits for."""

    job_id: str
    unfinished_deps: int


@dataclass(frozen=True)
class Stored:
    """What the re-drive needs to know of a stored job."""

    status: JobStatus
    failure_reason: FailureReason | None = None


def restored_descendants(
    root: str,
    descendants: Sequence[str],
    parents: Mapping[str, Sequence[str]],
    stored: Mapping[str, Stored],
) -> list[Restore]:
    """The descendants of `root` to put back in `blocked`, in the given order.

    `parents` maps each descendant to every job it depends on; `stored` holds
    every job named in `parents` (and the descendants themselves). A descendant
    comes back when it failed with `dependency_failed` and every dependency is
    either coming back too, or not dead. Computed as a fixpoint, so a diamond
    of any depth is decided the same way whatever the order.
    """
    coming_back = {
        job_id
        for job_id in descendants
        if stored[job_id].status is JobStatus.FAILED
        and stored[job_id].failure_reason is FailureReason.DEPENDENCY_FAILED
    }
    changed = True
    while changed:
        changed = False
        for job_id in sorted(coming_back):
            alive = coming_back | {root}
            if any(p not in alive and stored[p].status in _DEAD for p in parents.get(job_id, ())):
                coming_back.discard(job_id)
                changed = True
    alive = coming_back | {root}
    return [
        Restore(
            job_id,
            sum(1 for p in parents.get(job_id, ()) if p in alive or stored[p].status is not JobStatus.COMPLETED),
        )
        for job_id in descendants
        if job_id in coming_back
    ]
