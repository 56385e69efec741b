"""The request hash is stored with every job and compared on every replay, so it must
not change between versions: a client retrying across an upgrade would get a 409
for the very request it sent before."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from queue_service.api.submission import parse_one
from queue_service.core.validation import standard_json

REQUEST = {
    "job_id": "a-1",
    "type": "x",
    "priority": "high",
    "payload": {"z": [1, 2], "a": "é"},
    "retry_config": {"max_attempts": 5, "jitter": 0.5},
    "depends_on": ["b"],
    "timeout_seconds": 12.5,
    "resource_requirements": {"cpu_units": 3},
}


def test_the_hash_of_a_request_is_the_one_stored_by_earlier_versions() -> None:
    assert parse_one(REQUEST)[1] == "3c46db9d4dd5c01c84523f6adecefeb7f88f02c1306d85b36f4267bb842ec35f"
    assert parse_one({"type": "noop"})[1] == "aeadb6f3bb07a80a4b45ea1e2cdf7893f91f025568f0e8faf9f7c548709ebdda"


def test_a_replay_spelled_differently_hashes_the_same() -> None:
    spelled_out = {
        **REQUEST,
        "retry_config": {**REQUEST["retry_config"], "backoff_multiplier": 2.0},  # type: ignore[dict-item]
        "resource_requirements": {"cpu_units": 3, "memory_mb": 128},
        "payload": {"a": "é", "z": [1, 2]},
    }
    assert parse_one(spelled_out)[1] == parse_one(REQUEST)[1]
    assert parse_one({**REQUEST, "priority": "low"})[1] != parse_one(REQUEST)[1]


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**65)
    | st.floats(allow_nan=False, allow_infinity=False)  # no JSON holds them (see standard_json)
    | st.sampled_from([5e-05, -1e-300, 1e-4, 9.9e-05, 1e16, 0.0, -0.0, 1e-7, 1.5e-06])
    | st.sampled_from(["0.00001", "x0.0000y"])
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_JSON, st.booleans())
def test_the_hashed_text_is_the_standard_encoders_whatever_the_document(document: Any, sort_keys: bool) -> None:
    """Hashes and payload sizes are made of the standard encoder's text, written by the
    faster one where they agree: they must agree on every document."""
    expected = json.dumps(document, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False).encode()
    assert standard_json(document, sort_keys=sort_keys) == expected
