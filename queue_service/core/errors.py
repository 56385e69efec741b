"""Domain errors. Each carries a stable machine `code`; the API maps them to problem details."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class QueueError(Exception):
    """Base of every error the domain raises on purpose."""

    code = "queue_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field: where it is (`loc`) and what is wrong with it."""

    loc: tuple[str | int, ...]
    message: str


class InvalidJob(QueueError):
    """A submission breaks the job model's rules (SPEC §3)."""

    code = "validation_error"

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        self.problems = tuple(problems)
        joined = "; ".join(f"{'.'.join(map(str, p.loc))}: {p.message}" for p in self.problems)
        super().__init__(joined)


class PayloadTooLarge(QueueError):
    code = "payload_too_large"


class IllegalTransition(QueueError):
    """A status change the state machine does not allow."""

    code = "illegal_transition"

    def __init__(self, job_id: str, current: str, target: str) -> None:
        super().__init__(f"job {job_id!r} cannot go from {current} to {target}")
        self.job_id, self.current, self.target = job_id, current, target


class UnknownDependency(QueueError):
    code = "unknown_dependency"

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__("unknown dependencies: " + ", ".join(self.missing))


class DependencyNotViable(QueueError):
    """A dependency already ended failed or cancelled, so the job could never run."""

    code = "dependency_not_viable"

    def __init__(self, dependencies: Sequence[tuple[str, str]]) -> None:
        self.dependencies = tuple(dependencies)
        named = ", ".join(f"{job_id} ({status})" for job_id, status in self.dependencies)
        super().__init__(f"dependencies that can never complete: {named}")


class DependencyCycle(QueueError):
    code = "dependency_cycle"

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        super().__init__("dependency cycle: " + " -> ".join(self.cycle))


class Unschedulable(QueueError):
    """The job needs more than any node can ever offer."""

    code = "unschedulable"

    def __init__(self, job_id: str, needed: str, largest: str) -> None:
        super().__init__(f"job {job_id!r} needs {needed}, more than the largest node ({largest})")
        self.job_id = job_id
