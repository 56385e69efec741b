"""Submissions become JobSpecs, and every broken rule of SPEC §3 is named by its location."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_service.core.errors import InvalidJob, PayloadTooLarge, Unschedulable
from queue_service.core.model import DEFAULT_NODE_CAPACITY, JobSpec, Priority, Resources, RetryConfig, SimulatedWork
from queue_service.core.validation import (
    check_schedulable,
    generated_job_id,
    is_valid_job_id,
    parse_job_spec,
    simulated_work,
)

DEFAULT_ID = "job_0123456789ab"
SPEC_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")  # SPEC §3, verbatim
Loc = tuple[str | int, ...]


def parse(data: dict[str, Any]) -> JobSpec:
    return parse_job_spec(data, default_job_id=DEFAULT_ID)


def problem_locs(data: dict[str, Any]) -> list[Loc]:
    with pytest.raises(InvalidJob) as raised:
        parse(data)
    return [problem.loc for problem in raised.value.problems]


# --- accepted submissions ------------------------------------------------------------------


def test_defaults_fill_every_omitted_field() -> None:
    assert parse({"type": "send_email"}) == JobSpec(
        job_id=DEFAULT_ID,
        type="send_email",
        priority=Priority.NORMAL,
        payload={},
        resources=Resources(cpu_units=1, memory_mb=128),
        depends_on=(),
        retry=RetryConfig(
            max_attempts=3, backoff_multiplier=2.0, initial_delay_seconds=1.0, max_delay_seconds=300.0, jitter=0.0
        ),
        timeout_seconds=300.0,
        idempotency_key=None,
    )


def test_an_omitted_section_means_the_same_as_an_empty_one() -> None:
    """Omitted sections take their defaults unchecked: they must be what the checks give."""
    empty_sections: dict[str, Any] = {"resource_requirements": {}, "retry_config": {}, "depends_on": []}
    assert parse({"type": "send_email"}) == parse({"type": "send_email", **empty_sections})


@pytest.mark.parametrize("section", ["resource_requirements", "retry_config", "depends_on", "timeout_seconds"])
def test_a_section_sent_as_null_is_refused_not_taken_for_omitted(section: str) -> None:
    assert problem_locs({"type": "send_email", section: None}) == [(section,)]


def test_every_field_given_is_kept() -> None:
    spec = parse(
        {
            "job_id": "report:2024-01.v2",
            "type": "generate_report",
            "priority": "critical",
            "payload": {"month": "2024-01", "simulate": {"duration_seconds": 1.5}},
            "resource_requirements": {"cpu_units": 4, "memory_mb": 2048},
            "depends_on": ["job_a", "job_b"],
            "retry_config": {
                "max_attempts": 5,
                "backoff_multiplier": 3,
                "initial_delay_seconds": 0,
                "max_delay_seconds": 60,
                "jitter": 1,
            },
            "timeout_seconds": 0.5,
            "idempotency_key": "k-1",
        }
    )
    assert spec == JobSpec(
        job_id="report:2024-01.v2",
        type="generate_report",
        priority=Priority.CRITICAL,
        payload={"month": "2024-01", "simulate": {"duration_seconds": 1.5}},
        resources=Resources(4, 2048),
        depends_on=("job_a", "job_b"),
        retry=RetryConfig(5, 3.0, 0.0, 60.0, 1.0),
        timeout_seconds=0.5,
        idempotency_key="k-1",
    )


def test_partial_blocks_keep_their_other_defaults() -> None:
    spec = parse({"type": "t", "resource_requirements": {"cpu_units": 2}, "retry_config": {"max_attempts": 1}})
    assert spec.resources == Resources(2, 128)
    assert spec.retry == RetryConfig(max_attempts=1)


def test_an_initial_delay_above_the_default_max_is_not_undercut_by_the_omitted_max() -> None:
    spec = parse({"type": "t", "retry_config": {"initial_delay_seconds": 500}})
    assert spec.retry.initial_delay_seconds == 500.0
    assert spec.retry.max_delay_seconds == 500.0


@pytest.mark.parametrize("job_id", ["a", "A" * 128, "0abc", "job_1.2:3-4", "Job_X"])
def test_job_ids_matching_the_pattern_are_accepted(job_id: str) -> None:
    assert parse({"job_id": job_id, "type": "t"}).job_id == job_id


@pytest.mark.parametrize("job_type", ["t", "x" * 64])
def test_type_lengths_at_the_bounds_are_accepted(job_type: str) -> None:
    assert parse({"type": job_type}).type == job_type


@pytest.mark.parametrize("key", ["k", "k" * 255])
def test_idempotency_key_lengths_at_the_bounds_are_accepted(key: str) -> None:
    assert parse({"type": "t", "idempotency_key": key}).idempotency_key == key


def test_whole_numbers_up_to_2_to_the_31_minus_1_are_accepted() -> None:
    biggest = 2**31 - 1
    spec = parse(
        {
            "type": "t",
            "resource_requirements": {"cpu_units": biggest, "memory_mb": biggest},
            "retry_config": {"max_attempts": biggest},
        }
    )
    assert spec.resources == Resources(biggest, biggest)
    assert spec.retry.max_attempts == biggest


@pytest.mark.parametrize("jitter", [0, 0.5, 1])
def test_jitter_from_zero_to_one_inclusive_is_accepted(jitter: float) -> None:
    assert parse({"type": "t", "retry_config": {"jitter": jitter}}).retry.jitter == jitter


def test_max_delay_equal_to_initial_is_accepted() -> None:
    spec = parse({"type": "t", "retry_config": {"initial_delay_seconds": 5, "max_delay_seconds": 5}})
    assert spec.retry.max_delay_seconds == 5.0


def test_numbers_from_json_become_floats() -> None:
    spec = parse({"type": "t", "timeout_seconds": 30, "retry_config": {"backoff_multiplier": 2}})
    assert isinstance(spec.timeout_seconds, float)
    assert isinstance(spec.retry.backoff_multiplier, float)


# --- rejected submissions: one rule broken, named at its location --------------------------

REJECTIONS: list[tuple[str, dict[str, Any], Loc]] = [
    # job_id
    ("job_id empty", {"job_id": ""}, ("job_id",)),
    ("job_id leading dash", {"job_id": "-abc"}, ("job_id",)),
    ("job_id leading underscore", {"job_id": "_abc"}, ("job_id",)),
    ("job_id space", {"job_id": "has space"}, ("job_id",)),
    ("job_id slash", {"job_id": "a/b"}, ("job_id",)),
    ("job_id non-ascii", {"job_id": "jöb"}, ("job_id",)),
    ("job_id 129 chars", {"job_id": "a" * 129}, ("job_id",)),
    ("job_id trailing newline", {"job_id": "abc\n"}, ("job_id",)),
    ("job_id not a string", {"job_id": 123}, ("job_id",)),
    # type
    ("type empty", {"type": ""}, ("type",)),
    ("type 65 chars", {"type": "x" * 65}, ("type",)),
    ("type not a string", {"type": 5}, ("type",)),
    # priority
    ("priority unknown", {"priority": "urgent"}, ("priority",)),
    ("priority upper case", {"priority": "HIGH"}, ("priority",)),
    ("priority number", {"priority": 1}, ("priority",)),
    ("priority null", {"priority": None}, ("priority",)),
    ("priority list", {"priority": ["high"]}, ("priority",)),
    # payload
    ("payload list", {"payload": [1, 2]}, ("payload",)),
    ("payload string", {"payload": "{}"}, ("payload",)),
    ("payload null", {"payload": None}, ("payload",)),
    # resource_requirements
    ("resources not object", {"resource_requirements": [1, 128]}, ("resource_requirements",)),
    ("cpu zero", {"resource_requirements": {"cpu_units": 0}}, ("resource_requirements", "cpu_units")),
    ("cpu negative", {"resource_requirements": {"cpu_units": -1}}, ("resource_requirements", "cpu_units")),
    ("cpu float", {"resource_requirements": {"cpu_units": 1.5}}, ("resource_requirements", "cpu_units")),
    ("cpu whole float", {"resource_requirements": {"cpu_units": 2.0}}, ("resource_requirements", "cpu_units")),
    ("cpu string", {"resource_requirements": {"cpu_units": "2"}}, ("resource_requirements", "cpu_units")),
    ("cpu bool", {"resource_requirements": {"cpu_units": True}}, ("resource_requirements", "cpu_units")),
    ("memory zero", {"resource_requirements": {"memory_mb": 0}}, ("resource_requirements", "memory_mb")),
    ("memory float", {"resource_requirements": {"memory_mb": 12.5}}, ("resource_requirements", "memory_mb")),
    ("memory bool", {"resource_requirements": {"memory_mb": True}}, ("resource_requirements", "memory_mb")),
    ("memory null", {"resource_requirements": {"memory_mb": None}}, ("resource_requirements", "memory_mb")),
    ("resources unknown field", {"resource_requirements": {"gpu": 1}}, ("resource_requirements", "gpu")),
    # whole numbers are stored as 32-bit integers
    ("cpu over 2**31-1", {"resource_requirements": {"cpu_units": 2**31}}, ("resource_requirements", "cpu_units")),
    ("memory over 2**31-1", {"resource_requirements": {"memory_mb": 2**31}}, ("resource_requirements", "memory_mb")),
    ("max_attempts over 2**31-1", {"retry_config": {"max_attempts": 2**31}}, ("retry_config", "max_attempts")),
    (
        "simulate fail_attempts over 2**31-1",
        {"payload": {"simulate": {"fail_attempts": 2**31}}},
        ("payload", "simulate", "fail_attempts"),
    ),
    # depends_on
    ("depends_on string", {"depends_on": "job_a"}, ("depends_on",)),
    ("depends_on bad entry", {"depends_on": ["job_a", "bad id"]}, ("depends_on", 1)),
    ("depends_on non-string entry", {"depends_on": [3]}, ("depends_on", 0)),
    ("depends_on duplicate", {"depends_on": ["job_a", "job_b", "job_a"]}, ("depends_on",)),
    ("depends_on itself", {"job_id": "me", "depends_on": ["job_a", "me"]}, ("depends_on",)),
    # retry_config
    ("retry not object", {"retry_config": 3}, ("retry_config",)),
    ("max_attempts zero", {"retry_config": {"max_attempts": 0}}, ("retry_config", "max_attempts")),
    ("max_attempts float", {"retry_config": {"max_attempts": 2.5}}, ("retry_config", "max_attempts")),
    ("max_attempts bool", {"retry_config": {"max_attempts": True}}, ("retry_config", "max_attempts")),
    ("multiplier below 1", {"retry_config": {"backoff_multiplier": 0.5}}, ("retry_config", "backoff_multiplier")),
    ("multiplier string", {"retry_config": {"backoff_multiplier": "2"}}, ("retry_config", "backoff_multiplier")),
    ("multiplier bool", {"retry_config": {"backoff_multiplier": True}}, ("retry_config", "backoff_multiplier")),
    ("initial negative", {"retry_config": {"initial_delay_seconds": -1}}, ("retry_config", "initial_delay_seconds")),
    (
        "initial nan",
        {"retry_config": {"initial_delay_seconds": float("nan")}},
        ("retry_config", "initial_delay_seconds"),
    ),
    (
        "max_delay below initial",
        {"retry_config": {"initial_delay_seconds": 10, "max_delay_seconds": 5}},
        ("retry_config", "max_delay_seconds"),
    ),
    (
        "max_delay below default initial",
        {"retry_config": {"max_delay_seconds": 0.5}},
        ("retry_config", "max_delay_seconds"),
    ),
    ("jitter above 1", {"retry_config": {"jitter": 1.5}}, ("retry_config", "jitter")),
    ("jitter negative", {"retry_config": {"jitter": -0.1}}, ("retry_config", "jitter")),
    ("retry unknown field", {"retry_config": {"max_retries": 3}}, ("retry_config", "max_retries")),
    # timeout_seconds
    ("timeout zero", {"timeout_seconds": 0}, ("timeout_seconds",)),
    ("timeout negative", {"timeout_seconds": -5}, ("timeout_seconds",)),
    ("timeout string", {"timeout_seconds": "300"}, ("timeout_seconds",)),
    ("timeout bool", {"timeout_seconds": True}, ("timeout_seconds",)),
    ("timeout infinite", {"timeout_seconds": float("inf")}, ("timeout_seconds",)),
    ("timeout nan", {"timeout_seconds": float("nan")}, ("timeout_seconds",)),
    # idempotency_key
    ("idempotency_key empty", {"idempotency_key": ""}, ("idempotency_key",)),
    ("idempotency_key 256 chars", {"idempotency_key": "k" * 256}, ("idempotency_key",)),
    ("idempotency_key number", {"idempotency_key": 5}, ("idempotency_key",)),
    # unknown top-level fields (a typo must not pass silently)
    ("unknown field", {"prority": "high"}, ("prority",)),
    ("read-only field", {"status": "completed"}, ("status",)),
    # payload.simulate
    ("simulate not object", {"payload": {"simulate": "fast"}}, ("payload", "simulate")),
    (
        "simulate duration negative",
        {"payload": {"simulate": {"duration_seconds": -1}}},
        ("payload", "simulate", "duration_seconds"),
    ),
    (
        "simulate duration string",
        {"payload": {"simulate": {"duration_seconds": "1"}}},
        ("payload", "simulate", "duration_seconds"),
    ),
    (
        "simulate fail_attempts negative",
        {"payload": {"simulate": {"fail_attempts": -1}}},
        ("payload", "simulate", "fail_attempts"),
    ),
    (
        "simulate fail_attempts float",
        {"payload": {"simulate": {"fail_attempts": 1.5}}},
        ("payload", "simulate", "fail_attempts"),
    ),
    (
        "simulate fail_attempts bool",
        {"payload": {"simulate": {"fail_attempts": True}}},
        ("payload", "simulate", "fail_attempts"),
    ),
    (
        "simulate timeout_attempts negative",
        {"payload": {"simulate": {"timeout_attempts": -2}}},
        ("payload", "simulate", "timeout_attempts"),
    ),
    (
        "simulate permanent_failure string",
        {"payload": {"simulate": {"permanent_failure": "yes"}}},
        ("payload", "simulate", "permanent_failure"),
    ),
    (
        "simulate permanent_failure int",
        {"payload": {"simulate": {"permanent_failure": 1}}},
        ("payload", "simulate", "permanent_failure"),
    ),
    ("simulate unknown field", {"payload": {"simulate": {"sleep": 1}}}, ("payload", "simulate", "sleep")),
]


@pytest.mark.parametrize(("overrides", "loc"), [(o, loc) for _, o, loc in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_a_broken_rule_is_rejected_at_its_location(overrides: dict[str, Any], loc: Loc) -> None:
    assert problem_locs({"type": "t", **overrides}) == [loc]


@pytest.mark.parametrize("max_delay", [float("inf"), "60", None])
def test_a_non_numeric_max_delay_is_reported_once(max_delay: object) -> None:
    # not also as "must be at least initial_delay_seconds", which would mislead
    assert problem_locs({"type": "t", "retry_config": {"max_delay_seconds": max_delay}}) == [
        ("retry_config", "max_delay_seconds")
    ]


def test_a_missing_type_is_rejected() -> None:
    assert problem_locs({"job_id": "job_a"}) == [("type",)]


def test_every_problem_is_reported_at_once() -> None:
    locs = problem_locs(
        {
            "job_id": "bad id",
            "type": "",
            "priority": "urgent",
            "payload": {"simulate": {"fail_attempts": -1, "permanent_failure": "no"}},
            "resource_requirements": {"cpu_units": 0, "memory_mb": True},
            "depends_on": ["ok", "ok"],
            "retry_config": {"max_attempts": 0, "jitter": 2},
            "timeout_seconds": 0,
            "idempotency_key": "",
            "extra": 1,
        }
    )
    assert set(locs) == {
        ("extra",),
        ("job_id",),
        ("type",),
        ("priority",),
        ("payload", "simulate", "fail_attempts"),
        ("payload", "simulate", "permanent_failure"),
        ("resource_requirements", "cpu_units"),
        ("resource_requirements", "memory_mb"),
        ("depends_on",),
        ("retry_config", "max_attempts"),
        ("retry_config", "jitter"),
        ("timeout_seconds",),
        ("idempotency_key",),
    }
    assert len(locs) == len(set(locs))


def test_invalid_job_is_a_validation_error_whose_detail_names_each_problem() -> None:
    with pytest.raises(InvalidJob) as raised:
        parse({"type": "", "timeout_seconds": -1})
    assert raised.value.code == "validation_error"
    assert "type:" in raised.value.detail
    assert "timeout_seconds:" in raised.value.detail


# --- payload size (413) -----------------------------------------------------------------------


def _payload_of_size(size: int, char: str = "x") -> dict[str, Any]:
    # {"b":"…"} is 8 bytes of framing in compact JSON
    per_char = len(char.encode())
    assert (size - 8) % per_char == 0
    return {"b": char * ((size - 8) // per_char)}


@pytest.mark.parametrize("char", ["x", "é"], ids=["ascii", "two-byte utf8"])
def test_a_payload_of_exactly_64_kib_serialized_is_accepted(char: str) -> None:
    payload = _payload_of_size(64 * 1024, char)
    assert parse({"type": "t", "payload": payload}).payload == payload


@pytest.mark.parametrize("char", ["x", "é"], ids=["ascii", "two-byte utf8"])
def test_a_payload_over_64_kib_serialized_is_too_large(char: str) -> None:
    with pytest.raises(PayloadTooLarge) as raised:
        parse({"type": "t", "payload": _payload_of_size(64 * 1024 + len(char.encode()), char)})
    assert raised.value.code == "payload_too_large"


def test_a_large_payload_is_too_large_even_with_a_simulate_block() -> None:
    with pytest.raises(PayloadTooLarge):
        parse({"type": "t", "payload": {"simulate": {"duration_seconds": 1}, "blob": "x" * 70_000}})


# --- the simulate block on its own ------------------------------------------------------------


def test_simulated_work_reads_the_block() -> None:
    payload = {
        "simulate": {"duration_seconds": 2, "fail_attempts": 1, "timeout_attempts": 2, "permanent_failure": True}
    }
    assert simulated_work(payload) == SimulatedWork(2.0, 1, 2, True)


@pytest.mark.parametrize("payload", [{}, {"other": 1}, {"simulate": None}])
def test_no_simulate_block_is_default_work(payload: dict[str, Any]) -> None:
    assert simulated_work(payload) == SimulatedWork()


def test_simulated_work_rejects_a_bad_block() -> None:
    with pytest.raises(InvalidJob) as raised:
        simulated_work({"simulate": {"fail_attempts": "3"}})
    assert [p.loc for p in raised.value.problems] == [("payload", "simulate", "fail_attempts")]


# --- schedulability (422 unschedulable) -------------------------------------------------------


@pytest.mark.parametrize("resources", [Resources(9, 128), Resources(1, 4097), Resources(16, 8192)])
def test_a_job_larger_than_the_largest_node_is_unschedulable(resources: Resources) -> None:
    spec = JobSpec("job_big", "t", resources=resources)
    with pytest.raises(Unschedulable) as raised:
        check_schedulable(spec, DEFAULT_NODE_CAPACITY)
    assert raised.value.code == "unschedulable"
    assert raised.value.job_id == "job_big"


@pytest.mark.parametrize("resources", [Resources(8, 4096), Resources(1, 1)])
def test_a_job_that_fits_the_largest_node_is_schedulable(resources: Resources) -> None:
    check_schedulable(JobSpec("job_ok", "t", resources=resources), DEFAULT_NODE_CAPACITY)


# --- job ids ----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF", min_size=12, max_size=40))
def test_generated_job_ids_match_the_specs_format(random_hex: str) -> None:
    job_id = generated_job_id(random_hex)
    assert re.fullmatch(r"job_[0-9a-f]{12}", job_id)
    assert SPEC_JOB_ID.fullmatch(job_id)
    assert is_valid_job_id(job_id)


def test_generated_job_id_uses_the_callers_randomness() -> None:
    assert generated_job_id("0123456789ABCDEF") == "job_0123456789ab"


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=140), st.from_regex(SPEC_JOB_ID)))
def test_is_valid_job_id_agrees_with_the_specs_pattern(value: str) -> None:
    # The SPEC's `$` is read as end of string: a trailing newline is not part of an id.
    assert is_valid_job_id(value) == (SPEC_JOB_ID.fullmatch(value) is not None)


@pytest.mark.parametrize("value", [None, 5, b"job_a", ["job_a"]])
def test_non_strings_are_not_job_ids(value: object) -> None:
    assert not is_valid_job_id(value)
