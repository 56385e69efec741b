"""The request hash is stored with every job and compared on every replay, so it must
not change between versions: a client retrying across an upgrade would get a 409
for the very request it sent before."""

from __future__ import annotations

from queue_service.api.submission import parse_one

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
