"""What a node knows of the whole ready queue without reading it.

A claim reads the ready queue's head, plans, then starts: two round trips. When
its read reached the end of the queue (fewer rows than it asked for), the node
knew every ready job; from then on, each announcement of a job becoming ready
(with its QUEUE_ENTRY) or leaving ready keeps that knowledge whole, since every
change of status is announced at its commit, in commit order. An idle node woken
by a submission can then plan over what it knows and start at once: one round
trip, the start itself, which re-checks in the database that each job is still
ready, the node active and dispatch running.

The view forgets (and the next claim reads) whenever it cannot be sure: an
announcement of a job becoming ready without its entry, more ready jobs than a
claim's window, a wake-up (`dispatch.wake`: a batch, or a listener that
reconnected and may have missed announcements) or a resume of dispatch, a claim
that did not start what it planned, or one that failed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from queue_service.db.attempts import Queued
from queue_service.db.events import QUEUE_ENTRY

_READY: Final = "ready"
_UNKNOWN: Final = "unknown"  # ready, but announced without what a plan needs


def queued_from(message: Mapping[str, Any]) -> Queued | str | None:
    """An announcement as the view takes it: the job now ready (Queued), ready
    without its entry (_UNKNOWN), or no longer ready (None)."""
    if message.get("status") != _READY:
        return None
    entry = message.get(QUEUE_ENTRY)
    if not isinstance(entry, Mapping):
        return _UNKNOWN
    try:
        return Queued(
            str(message["job_id"]),
            str(message["type"]),
            str(message["priority"]),
            int(entry["attempts"]),
            float(entry["sort_key"]),
            int(entry["cpu_units"]),
            int(entry["memory_mb"]),
            float(entry["timeout_seconds"]),
            datetime.fromisoformat(str(message["at"])),
        )
    except (KeyError, TypeError, ValueError):
        return _UNKNOWN


class ReadyView:
    """The ready jobs a node knows of, or None when it does not know them all.

    `limit` bounds what is kept: beyond a claim's window, reading is what serves."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._jobs: dict[str, Queued] | None = None
        self._heard: dict[str, Queued | str | None] | None = None  # since the read in flight began
        self._doubted = False  # told to forget since the read in flight began

    @property
    def ready(self) -> Mapping[str, Queued] | None:
        return self._jobs

    def forget(self) -> None:
        """Not sure any more; a read in flight may not have seen the change either."""
        self._jobs = None
        self._doubted = self._heard is not None

    def announced(self, message: Mapping[str, Any]) -> None:
        """A job.updated announcement, in commit order."""
        job_id = str(message.get("job_id"))
        state = queued_from(message)
        if self._heard is not None:
            self._heard[job_id] = state
        if self._jobs is not None:
            self._jobs = _apply(self._jobs, job_id, state, self.limit)

    def reading(self) -> None:
        """A claim is about to read: what is announced from now on may postdate the
        read's snapshot, and is applied over it."""
        self._heard = {}
        self._doubted = False

    def read(self, window: Sequence[Any], whole_queue: bool, started: Collection[str]) -> None:
        """The claim's window (rows with Queued's fields), whether it held every ready
        job, and what the claim started."""
        heard, self._heard = self._heard, None
        if heard is None or self._doubted or not whole_queue or len(window) > self.limit:
            self._jobs = None
            return
        jobs: dict[str, Queued] | None = {
            row.job_id: Queued(
                row.job_id,
                row.type,
                row.priority,
                row.attempts,
                row.sort_key,
                row.cpu_units,
                row.memory_mb,
                row.timeout_seconds,
                row.ready_at,
            )
            for row in window
        }
        for job_id, state in heard.items():
            if jobs is None:
                break
            jobs = _apply(jobs, job_id, state, self.limit)
        if jobs is not None:
            for job_id in started:
                jobs.pop(job_id, None)
        self._jobs = jobs

    def read_failed(self) -> None:
        self._heard = None
        self.forget()

    def started(self, planned: Collection[str], started: Collection[str]) -> bool:
        """A start from the view; False (and forgotten) when some planned job did not
        start: another node took it, or dispatch or the node stopped."""
        if len(started) < len(planned):
            self._jobs = None
            return False
        if self._jobs is not None:
            for job_id in started:
                self._jobs.pop(job_id, None)
        return True


def _apply(jobs: dict[str, Queued], job_id: str, state: Queued | str | None, limit: int) -> dict[str, Queued] | None:
    if state is None:
        jobs.pop(job_id, None)
        return jobs
    if isinstance(state, str) or (job_id not in jobs and len(jobs) >= limit):
        return None
    jobs[job_id] = state
    return jobs
