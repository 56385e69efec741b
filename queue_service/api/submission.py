"""From a raw request body to validated JobSpecs and their request hashes.

The body is read and parsed here rather than by FastAPI, so that the job rules
run once, in `core.validation.parse_job_spec`, reporting every problem at once,
and an oversized payload is a 413 rather than a 422. Values PostgreSQL could
not store (NUL characters, lone surrogates, infinities, integers past 32 bits)
are refused here as validation errors, so bad input never becomes a 500.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any, Final

from fastapi import Request

from queue_service.core.errors import FieldProblem, InvalidJob, PayloadTooLarge
from queue_service.core.model import JobSpec
from queue_service.core.validation import parse_job_spec, standard_json
from queue_service.db.jobs import new_job_id

MAX_BODY_BYTES: Final = 16 * 1024 * 1024  # a batch of thousands of jobs; beyond this, 413 before parsing
MAX_JSON_DEPTH: Final = 64  # nesting PostgreSQL's jsonb and our own walks take without strain

Loc = tuple[str | int, ...]


async def read_json(request: Request) -> Any:
    """The request body as JSON, refusing oversized bodies while they stream in."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        document = json.loads(b"".join(chunks), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as error:
        raise InvalidJob([FieldProblem(("body",), f"not valid JSON: {error}")]) from None
    problems = list(_unstorable(document))
    if problems:
        raise InvalidJob(problems)
    return document


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _unstorable(document: Any) -> Iterator[FieldProblem]:
    """Strings PostgreSQL refuses (NUL, lone surrogates) and nesting past the limit.

    Iterative, so a deep document cannot exhaust the Python stack either.
    """
    stack: list[tuple[Any, Loc]] = [(document, ("body",))]
    while stack:
        value, loc = stack.pop()
        if len(loc) > MAX_JSON_DEPTH:
            yield FieldProblem(loc, f"nested deeper than {MAX_JSON_DEPTH} levels")
            return
        if isinstance(value, str):
            if not _storable_text(value):
                yield FieldProblem(loc, "contains a NUL character or an unpaired surrogate")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _storable_text(key):
                    yield FieldProblem(loc, "a key contains a NUL character or an unpaired surrogate")
                stack.append((item, (*loc, key)))
        elif isinstance(value, list):
            stack.extend((item, (*loc, index)) for index, item in enumerate(value))


def _storable_text(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_one(document: Any, loc: Loc = ("body",)) -> tuple[JobSpec, str]:
    """One submitted job: its spec (job id generated unless given) and request hash."""
    if not isinstance(document, dict):
        raise InvalidJob([FieldProblem(loc, "must be a JSON object (a job)")])
    # A client's own id needs none generated (the system's randomness: a twentieth of a
    # batch's time); an invalid one fails the parse, so nothing sees the placeholder.
    client_job_id = "job_id" in document
    default_job_id = "" if client_job_id else new_job_id()
    try:
        spec = parse_job_spec(document, default_job_id=default_job_id, default_is_generated=not client_job_id)
    except InvalidJob as invalid:
        raise InvalidJob([FieldProblem((*loc, *p.loc), p.message) for p in invalid.problems]) from None
    return spec, request_hash(spec, client_job_id=client_job_id)


def parse_single(document: Any, header_key: str | None) -> tuple[JobSpec, str]:
    """POST /jobs: the body, with the Idempotency-Key header as its key."""
    spec, digest = parse_one(document)
    if header_key is not None:
        if spec.idempotency_key not in (None, header_key):
            problem = FieldProblem(("header", "Idempotency-Key"), "differs from the body's idempotency_key")
            raise InvalidJob([problem])
        spec = dataclasses.replace(spec, idempotency_key=header_key)
    return spec, digest


def parse_batch(document: Any, header_key: str | None) -> tuple[list[JobSpec], list[str]]:
    """POST /jobs/batch: every member checked, every problem reported.

    An Idempotency-Key header makes the whole request repeatable: member i
    without its own key gets `<header>:<i>`, so a replayed batch returns the
    originals, member by member.
    """
    if not isinstance(document, list):
        raise InvalidJob([FieldProblem(("body",), "must be a JSON array of jobs")])
    if not document:
        raise InvalidJob([FieldProblem(("body",), "must hold at least one job")])
    specs: list[JobSpec] = []
    hashes: list[str] = []
    problems: list[FieldProblem] = []
    too_large: PayloadTooLarge | None = None
    for index, member in enumerate(document):
        try:
            spec, digest = parse_one(member, ("body", index))
        except InvalidJob as invalid:
            problems.extend(invalid.problems)
            continue
        except PayloadTooLarge as error:
            too_large = too_large or PayloadTooLarge(f"job {index}: {error.detail}")
            continue
        if header_key is not None and spec.idempotency_key is None:
            spec = dataclasses.replace(spec, idempotency_key=f"{header_key}:{index}")
        specs.append(spec)
        hashes.append(digest)
    if problems:
        raise InvalidJob(problems)
    if too_large is not None:
        raise too_large
    return specs, hashes


def request_hash(spec: JobSpec, *, client_job_id: bool) -> str:
    """A digest of what the client asked for, defaults filled in, so that a replay
    spelled differently (`"priority": "normal"` or omitted) is still the same request.

    The idempotency key is the request's name, not its content, and a generated
    job id is ours, so neither is hashed.
    """
    canonical = {
        "job_id": spec.job_id if client_job_id else None,
        "type": spec.type,
        "priority": str(spec.priority),  # its value (a StrEnum), without the enum property's cost
        "payload": spec.payload,
        "resource_requirements": [spec.resources.cpu_units, spec.resources.memory_mb],
        "depends_on": list(spec.depends_on),
        "retry_config": spec.retry.as_json(),
        "timeout_seconds": spec.timeout_seconds,
    }
    return hashlib.sha256(standard_json(canonical, sort_keys=True)).hexdigest()


def accepted(job: dict[str, Any]) -> dict[str, Any]:
    """The submission answer of SPEC §4, cut from the full public job."""
    return {key: job[key] for key in ("job_id", "status", "created_at", "priority", "position_in_queue")}
