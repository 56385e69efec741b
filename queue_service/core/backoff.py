"""Retry timing (SPEC §6): exponential backoff with jitter derived from a hash, not a clock or RNG.

Because the jitter is a function of (job_id, attempt), the live worker and the
simulator compute the very same delay for the same failure.
"""

from __future__ import annotations

import hashlib
import math

from queue_service.core.model import RetryConfig

_MANTISSA_BITS = 53  # a double holds 53 bits exactly, so k / 2**53 is < 1 for every k < 2**53


def jitter_fraction(job_id: str, attempt: int) -> float:
    """A stable value u in [0, 1) for this job's attempt."""
    digest = hashlib.blake2b(f"{job_id}\x00{attempt}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> (64 - _MANTISSA_BITS)) / 2.0**_MANTISSA_BITS


def backoff_delay(config: RetryConfig, job_id: str, failed_attempt: int) -> float:
    """Seconds to wait after failed attempt n (1-based) before the job is ready again.

    min(max_delay, initial × multiplier^(n−1)) × (1 − jitter × u)
    """
    if failed_attempt < 1:
        raise ValueError("attempts are numbered from 1")
    try:
        growth = config.backoff_multiplier ** (failed_attempt - 1)
    except OverflowError:  # a huge exponent: unbounded growth, so the cap applies
        growth = math.inf
    # A zero initial delay stays zero however large the growth (0 × inf would be NaN).
    raw = config.initial_delay_seconds * growth if config.initial_delay_seconds else 0.0
    capped = min(config.max_delay_seconds, raw)
    return capped * (1.0 - config.jitter * jitter_fraction(job_id, failed_attempt))
