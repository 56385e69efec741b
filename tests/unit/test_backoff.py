"""Retry delays (SPEC §6): min(max_delay, initial × multiplier^(n−1)) × (1 − jitter × u)."""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_service.core import backoff
from queue_service.core.backoff import backoff_delay, jitter_fraction
from queue_service.core.model import RetryConfig

DEFAULTS = RetryConfig()


@pytest.mark.parametrize(
    ("config", "attempt", "expected"),
    [
        # defaults: 1, 2, 4, 8, … capped at 300
        (DEFAULTS, 1, 1.0),
        (DEFAULTS, 2, 2.0),
        (DEFAULTS, 3, 4.0),
        (DEFAULTS, 4, 8.0),
        (DEFAULTS, 9, 256.0),
        (DEFAULTS, 10, 300.0),  # 512 capped
        (DEFAULTS, 25, 300.0),
        # a custom curve and its cap
        (RetryConfig(initial_delay_seconds=0.5, backoff_multiplier=3.0, max_delay_seconds=10.0), 1, 0.5),
        (RetryConfig(initial_delay_seconds=0.5, backoff_multiplier=3.0, max_delay_seconds=10.0), 2, 1.5),
        (RetryConfig(initial_delay_seconds=0.5, backoff_multiplier=3.0, max_delay_seconds=10.0), 3, 4.5),
        (RetryConfig(initial_delay_seconds=0.5, backoff_multiplier=3.0, max_delay_seconds=10.0), 4, 10.0),
        # multiplier 1 is a constant delay
        (RetryConfig(initial_delay_seconds=7.0, backoff_multiplier=1.0), 1, 7.0),
        (RetryConfig(initial_delay_seconds=7.0, backoff_multiplier=1.0), 50, 7.0),
        # no initial delay: retry at once
        (RetryConfig(initial_delay_seconds=0.0), 1, 0.0),
        (RetryConfig(initial_delay_seconds=0.0), 8, 0.0),
        # max equal to initial: flat
        (RetryConfig(initial_delay_seconds=5.0, max_delay_seconds=5.0), 6, 5.0),
    ],
)
def test_delay_without_jitter_is_exact(config: RetryConfig, attempt: int, expected: float) -> None:
    assert backoff_delay(config, "job_a", attempt) == expected


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 9, 10, 12])
def test_jitter_shortens_the_capped_delay_by_jitter_times_u(attempt: int) -> None:
    config = RetryConfig(jitter=0.5)
    capped = min(300.0, 2.0 ** (attempt - 1))
    u = jitter_fraction("job_a", attempt)
    assert backoff_delay(config, "job_a", attempt) == pytest.approx(capped * (1 - 0.5 * u))


def test_full_jitter_delay_lies_between_zero_and_the_capped_delay() -> None:
    config = RetryConfig(jitter=1.0)
    delays = [backoff_delay(config, f"job_{i}", 4) for i in range(200)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 150  # jitter spreads a burst of failures apart


def test_jitter_fraction_is_pinned_so_live_and_simulated_delays_agree() -> None:
    # Stored next_attempt_at values and simulator replays rely on these exact numbers:
    # changing the hash (or using Python's salted hash()) would break that agreement.
    assert jitter_fraction("job_a", 1) == 0.3379361008194295
    assert jitter_fraction("job_a", 2) == 0.9373913936042301
    assert jitter_fraction("job_0123456789ab", 3) == 0.168846981246894


def test_jitter_fraction_is_stable_for_the_same_job_and_attempt() -> None:
    assert [jitter_fraction("job_x", n) for n in range(1, 20)] == [jitter_fraction("job_x", n) for n in range(1, 20)]


def test_jitter_fraction_varies_across_attempts_and_jobs() -> None:
    per_attempt = {jitter_fraction("job_x", n) for n in range(1, 51)}
    per_job = {jitter_fraction(f"job_{i}", 1) for i in range(50)}
    assert len(per_attempt) == 50
    assert len(per_job) == 50


def test_jitter_fraction_does_not_confuse_job_id_and_attempt_boundaries() -> None:
    # ("job_1", 11) and ("job_11", 1) must not hash the same text.
    assert jitter_fraction("job_1", 11) != jitter_fraction("job_11", 1)


@settings(max_examples=100, deadline=None)
@given(job_id=st.text(min_size=1, max_size=40), attempt=st.integers(1, 10**6))
def test_jitter_fraction_is_in_the_unit_interval(job_id: str, attempt: int) -> None:
    assert 0.0 <= jitter_fraction(job_id, attempt) < 1.0


@st.composite
def retry_configs(draw: st.DrawFn) -> RetryConfig:
    initial = draw(st.floats(0, 1000, allow_nan=False))
    return RetryConfig(
        max_attempts=draw(st.integers(1, 20)),
        backoff_multiplier=draw(st.floats(1, 10, allow_nan=False)),
        initial_delay_seconds=initial,
        max_delay_seconds=draw(st.floats(initial, 10_000, allow_nan=False)),
        jitter=draw(st.floats(0, 1, allow_nan=False)),
    )


@settings(max_examples=200, deadline=None)
@given(config=retry_configs(), job_id=st.from_regex(r"job_[0-9a-f]{12}", fullmatch=True), attempt=st.integers(1, 80))
def test_delay_lies_between_the_jittered_floor_and_the_capped_delay(
    config: RetryConfig, job_id: str, attempt: int
) -> None:
    capped = min(config.max_delay_seconds, config.initial_delay_seconds * config.backoff_multiplier ** (attempt - 1))
    delay = backoff_delay(config, job_id, attempt)
    slack = 1e-9 * max(1.0, capped)
    assert capped * (1 - config.jitter) - slack <= delay <= capped + slack
    assert delay <= config.max_delay_seconds + slack


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempts_are_numbered_from_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(DEFAULTS, "job_a", attempt)


@pytest.mark.parametrize("attempt", [1_025, 10_000, 10**9, 10**18])
def test_huge_attempt_numbers_are_capped_not_overflowing(attempt: int) -> None:
    assert backoff_delay(DEFAULTS, "job_a", attempt) == 300.0
    assert 0.0 < backoff_delay(RetryConfig(jitter=1.0), "job_a", attempt) <= 300.0


def test_a_huge_multiplier_is_capped_not_overflowing() -> None:
    assert backoff_delay(RetryConfig(backoff_multiplier=1e300), "job_a", 3) == 300.0


def test_zero_initial_delay_stays_zero_for_huge_attempt_numbers() -> None:
    config = RetryConfig(initial_delay_seconds=0.0, max_delay_seconds=300.0)
    assert backoff_delay(config, "job_a", 1_024) == 0.0
    assert backoff_delay(config, "job_a", 1_025) == 0.0  # 2.0**1024 overflows: 0 × ∞ must not become the cap
    assert backoff_delay(RetryConfig(initial_delay_seconds=0.0, backoff_multiplier=1e300), "job_a", 3) == 0.0


def test_jitter_fraction_stays_below_one_for_the_largest_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    # No job id is known to hash to all ones, so the digest is forced: a float division of a
    # 64-bit integer by 2**64 would round it up to exactly 1.0.
    class LargestDigest:
        def digest(self) -> bytes:
            return b"\xff" * 8

    def blake2b(data: bytes, digest_size: int) -> LargestDigest:
        return LargestDigest()

    monkeypatch.setattr(backoff, "hashlib", types.SimpleNamespace(blake2b=blake2b))
    assert jitter_fraction("job_a", 1) < 1.0
