"""Aging made visible (SPEC §5): when a waiting job overtakes newer jobs of higher levels.

Queue order is `ready_at − headstart[priority]`, static. A job of priority P
that became ready at `ready_at` comes before a job of a higher level Q that
becomes ready at `t` once `t − headstart[Q] > ready_at − headstart[P]`, that is
for every job of Q that arrives more than `headstart[Q] − headstart[P]` seconds
after it. So each job "overtakes new Q jobs" from a fixed instant on; this module
names that instant per higher level. Times are epoch seconds, given by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from queue_service.core.model import Priority
from queue_service.core.policy import PolicyConfig, sort_key


@dataclass(frozen=True)
class Overtake:
    """From `at` on, this job comes before any newly ready job of `priority`."""

    priority: Priority
    at: float
    in_seconds: float  # 0 once it has happened


@dataclass(frozen=True)
class Aging:
    sort_key: float
    headstart_seconds: float
    waited_seconds: float
    overtakes: tuple[Overtake, ...]  # higher levels only, highest first


def aging(priority: Priority, ready_at: float, now: float, policy: PolicyConfig) -> Aging:
    """How a job that became ready at `ready_at` stands against newer jobs of higher levels at `now`."""
    own = policy.headstart_seconds[priority]
    overtakes = tuple(
        Overtake(level, at, max(0.0, at - now))
        for level in Priority
        if level.rank < priority.rank
        for at in [ready_at + policy.headstart_seconds[level] - own]
    )
    return Aging(sort_key(ready_at, priority, policy), own, max(0.0, now - ready_at), overtakes)
