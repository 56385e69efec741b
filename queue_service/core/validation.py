"""Turning a submitted mapping into a JobSpec, with every problem named (SPEC §3).

Used by the simulator's scenario loader and by the API, so a job the simulator
accepts is exactly a job the service accepts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from queue_service.core import constants as c
from queue_service.core.dag import dependency_list_problems
from queue_service.core.errors import FieldProblem, InvalidJob, PayloadTooLarge, Unschedulable
from queue_service.core.model import JobSpec, Priority, Resources, RetryConfig, SimulatedWork

JOB_ID_RE = re.compile(c.JOB_ID_PATTERN)
JOB_FIELDS = frozenset(
    {
        "job_id",
        "type",
        "priority",
        "payload",
        "resource_requirements",
        "depends_on",
        "retry_config",
        "timeout_seconds",
        "idempotency_key",
    }
)


def generated_job_id(random_hex: str) -> str:
    """`job_` + 12 lowercase hex characters; the caller supplies the randomness."""
    return c.GENERATED_JOB_ID_PREFIX + random_hex[: c.GENERATED_JOB_ID_LENGTH].lower()


def is_valid_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


class _Checker:
    """Collects problems instead of stopping at the first, so a client fixes all at once."""

    def __init__(self) -> None:
        self.problems: list[FieldProblem] = []

    def fail(self, loc: tuple[str | int, ...], message: str) -> None:
        self.problems.append(FieldProblem(loc, message))

    def integer(self, value: object, loc: tuple[str | int, ...], minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(loc, "must be an integer")
            return minimum
        if value < minimum:
            self.fail(loc, f"must be at least {minimum}")
        elif value > c.MAX_WHOLE_NUMBER:
            self.fail(loc, f"must be at most {c.MAX_WHOLE_NUMBER}")
        return value

    def number(self, value: object, loc: tuple[str | int, ...], minimum: float, *, strict: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(loc, "must be a finite number")
            return minimum
        if value < minimum or (strict and value == minimum):
            self.fail(loc, f"must be {'greater than' if strict else 'at least'} {minimum:g}")
        return float(value)

    def mapping(self, value: object, loc: tuple[str | int, ...], allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(loc, "must be an object")
            return {}
        for key in sorted(set(value) - allowed, key=str):
            self.fail((*loc, key), "unknown field")
        return value


def _resources(check: _Checker, raw: object) -> Resources:
    data = check.mapping(raw, ("resource_requirements",), frozenset({"cpu_units", "memory_mb"}))
    cpu = check.integer(data.get("cpu_units", c.DEFAULT_CPU_UNITS), ("resource_requirements", "cpu_units"), 1)
    memory = check.integer(data.get("memory_mb", c.DEFAULT_MEMORY_MB), ("resource_requirements", "memory_mb"), 1)
    return Resources(cpu, memory)


_RETRY_FIELDS = frozenset(
    {"max_attempts", "backoff_multiplier", "initial_delay_seconds", "max_delay_seconds", "jitter"}
)


def _retry(check: _Checker, raw: object) -> RetryConfig:
    data = check.mapping(raw, ("retry_config",), _RETRY_FIELDS)
    loc = "retry_config"

    def number(name: str, default: float, minimum: float) -> float:
        return check.number(data.get(name, default), (loc, name), minimum)

    max_attempts = check.integer(data.get("max_attempts", c.DEFAULT_MAX_ATTEMPTS), (loc, "max_attempts"), 1)
    multiplier = number("backoff_multiplier", c.DEFAULT_BACKOFF_MULTIPLIER, 1)
    initial = number("initial_delay_seconds", c.DEFAULT_INITIAL_DELAY_SECONDS, 0)
    # An omitted max_delay never undercuts an explicit initial delay.
    maximum = number("max_delay_seconds", max(c.DEFAULT_MAX_DELAY_SECONDS, initial), 0)
    max_delay_valid = not any(p.loc == (loc, "max_delay_seconds") for p in check.problems)
    if max_delay_valid and maximum < initial:
        check.fail((loc, "max_delay_seconds"), "must be at least initial_delay_seconds")
    jitter = number("jitter", c.DEFAULT_JITTER, 0)
    if jitter > 1:
        check.fail((loc, "jitter"), "must be at most 1")
    return RetryConfig(max_attempts, multiplier, initial, maximum, jitter)


def _depends_on(check: _Checker, raw: object, job_id: str) -> tuple[str, ...]:
    if not isinstance(raw, list | tuple):
        check.fail(("depends_on",), "must be a list of job ids")
        return ()
    for index, dep in enumerate(raw):
        if not is_valid_job_id(dep):
            check.fail(("depends_on", index), "must be a job id matching " + c.JOB_ID_PATTERN)
    deps = tuple(str(dep) for dep in raw)
    check.problems.extend(dependency_list_problems(job_id, deps))
    return deps


def payload_size(payload: object) -> int:
    """Bytes of the compact JSON serialization, as the 64 KiB limit measures it."""
    return len(standard_json(payload))


# How orjson writes a float below 1e-4 where the standard encoder would not.
_WRITTEN_OTHERWISE: Final = re.compile(rb"0\.0000|\de-\d(?!\d)")


def standard_json(document: Any, *, sort_keys: bool = False) -> bytes:
    """`json.dumps(document, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False)`
    as UTF-8 (what payload sizes and every stored request hash are made of), written by
    orjson where its output is the same: a tenth of the time.

    They differ on integers past 64 bits (orjson refuses them), keys that are not
    strings (refused too), and floats below 1e-4, which orjson writes in full (0.00005
    for 5e-05) or with a one-digit exponent (1e-7 for 1e-07): the standard encoder
    writes those. And on NaN and the infinities (orjson writes null), which no stored
    document holds: JSON has no such numbers, read_json refuses them and jsonb cannot
    store them."""
    try:
        text = orjson.dumps(document, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except orjson.JSONEncodeError:
        text = None
    # The substring tests first: the pattern can only match where one holds, and a
    # document with neither (nearly all) then costs no regular-expression scan.
    if text is None or ((b"0.0000" in text or b"e-" in text) and _WRITTEN_OTHERWISE.search(text)):
        # A string that merely holds such text only costs its document the slower encoder.
        return json.dumps(document, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False).encode()
    return text


_RESOURCES = Resources(c.DEFAULT_CPU_UNITS, c.DEFAULT_MEMORY_MB)
_NORMAL: Final = str(Priority.NORMAL)  # the default, read once (an enum's `.value` is a slow property)


def parse_job_spec(data: Mapping[str, Any], *, default_job_id: str, default_is_generated: bool = False) -> JobSpec:
    """Validate a submitted job; raise InvalidJob listing every problem, or
    PayloadTooLarge when the payload alone is over the limit. `default_is_generated`:
    the default id was drawn at random (see JobSpec.job_id_generated)."""
    check = _Checker()
    check.mapping(data, (), JOB_FIELDS)

    job_id = data.get("job_id", default_job_id)
    if not is_valid_job_id(job_id):
        check.fail(("job_id",), "must match " + c.JOB_ID_PATTERN)
        job_id = default_job_id

    job_type = data.get("type")
    if not isinstance(job_type, str) or not 1 <= len(job_type) <= c.JOB_TYPE_MAX_LENGTH:
        check.fail(("type",), f"required: a string of 1 to {c.JOB_TYPE_MAX_LENGTH} characters")
        job_type = ""

    raw_priority = data.get("priority", _NORMAL)
    try:
        priority = Priority(raw_priority)
    except ValueError:
        check.fail(("priority",), "must be one of " + ", ".join(p.value for p in Priority))
        priority = Priority.NORMAL

    payload = data.get("payload", {})
    if not isinstance(payload, dict):
        check.fail(("payload",), "must be a JSON object")
        payload = {}
    elif "simulate" in payload:
        try:
            simulated_work(payload)
        except InvalidJob as invalid:
            check.problems.extend(invalid.problems)

    # An omitted section is its defaults, valid by construction: only what the client
    # sent is checked (most jobs send a type and a payload; checking defaults was a
    # third of parsing them).
    resources = _resources(check, data["resource_requirements"]) if "resource_requirements" in data else _RESOURCES
    depends_on = _depends_on(check, data["depends_on"], job_id) if "depends_on" in data else ()
    retry = _retry(check, data["retry_config"]) if "retry_config" in data else RetryConfig()
    timeout = (
        check.number(data["timeout_seconds"], ("timeout_seconds",), 0, strict=True)
        if "timeout_seconds" in data
        else c.DEFAULT_TIMEOUT_SECONDS
    )

    key = data.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= c.IDEMPOTENCY_KEY_MAX_LENGTH):
        check.fail(("idempotency_key",), f"must be a string of 1 to {c.IDEMPOTENCY_KEY_MAX_LENGTH} characters")
        key = None

    if check.problems:
        raise InvalidJob(check.problems)
    size = payload_size(payload)
    if size > c.MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"payload is {size} bytes serialized; the limit is {c.MAX_PAYLOAD_BYTES}")
    generated = default_is_generated and "job_id" not in data
    return JobSpec(job_id, job_type, priority, payload, resources, depends_on, retry, timeout, key, generated)


_SIMULATE_FIELDS = frozenset({"duration_seconds", "fail_attempts", "timeout_attempts", "permanent_failure"})


def simulated_work(payload: Mapping[str, Any]) -> SimulatedWork:
    """The `payload.simulate` block, validated; an absent block is plain default work."""
    raw = payload.get("simulate")
    if raw is None:
        return SimulatedWork()
    check = _Checker()
    loc = ("payload", "simulate")
    data = check.mapping(raw, loc, _SIMULATE_FIELDS)
    duration = data.get("duration_seconds")
    if duration is not None:
        duration = check.number(duration, (*loc, "duration_seconds"), 0)
    fail_attempts = check.integer(data.get("fail_attempts", 0), (*loc, "fail_attempts"), 0)
    timeout_attempts = check.integer(data.get("timeout_attempts", 0), (*loc, "timeout_attempts"), 0)
    permanent = data.get("permanent_failure", False)
    if not isinstance(permanent, bool):
        check.fail((*loc, "permanent_failure"), "must be true or false")
        permanent = False
    if check.problems:
        raise InvalidJob(check.problems)
    return SimulatedWork(duration, fail_attempts, timeout_attempts, permanent)


def check_schedulable(spec: JobSpec, largest_node: Resources) -> None:
    """A job that fits no node could never start: refuse it at the door."""
    if not spec.resources.fits_in(largest_node):
        needed = f"{spec.resources.cpu_units} CPU / {spec.resources.memory_mb} MB"
        largest = f"{largest_node.cpu_units} CPU / {largest_node.memory_mb} MB"
        raise Unschedulable(spec.job_id, needed, largest)
