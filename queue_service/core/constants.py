"""Every default and limit of the job model and the policy, named once (SPEC §3, §5, §6)."""

from __future__ import annotations

from typing import Final

# Job identity and shape (SPEC §3).
JOB_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
GENERATED_JOB_ID_PREFIX: Final = "job_"
GENERATED_JOB_ID_LENGTH: Final = 12  # lowercase hex characters after the prefix
JOB_TYPE_MAX_LENGTH: Final = 64
IDEMPOTENCY_KEY_MAX_LENGTH: Final = 255
MAX_PAYLOAD_BYTES: Final = 64 * 1024  # serialized JSON; larger is 413
MAX_WHOLE_NUMBER: Final = 2**31 - 1  # cpu_units, memory_mb, attempt counts: stored as 32-bit integers

# Resources: a job's default need and a node's default capacity.
DEFAULT_CPU_UNITS: Final = 1
DEFAULT_MEMORY_MB: Final = 128
DEFAULT_NODE_CPU_UNITS: Final = 8
DEFAULT_NODE_MEMORY_MB: Final = 4096

# Retries (SPEC §3): max_attempts counts the first run.
DEFAULT_MAX_ATTEMPTS: Final = 3
DEFAULT_BACKOFF_MULTIPLIER: Final = 2.0
DEFAULT_INITIAL_DELAY_SECONDS: Final = 1.0
DEFAULT_MAX_DELAY_SECONDS: Final = 300.0
DEFAULT_JITTER: Final = 0.0
DEFAULT_TIMEOUT_SECONDS: Final = 300.0

# Policy (SPEC §5): queue order is ready_at minus a per-priority head start.
HOUR: Final = 3600.0
DEFAULT_HEADSTART_SECONDS: Final = {
    "critical": 3 * HOUR,
    "high": 2 * HOUR,
    "normal": 1 * HOUR,
    "low": 0.0,
}
DEFAULT_CANDIDATE_WINDOW: Final = 256
# A claim reads at least this many candidates first, and the whole window only when
# those leave the node room (policy.is_complete).
MIN_FIRST_READ: Final = 16

# Simulated work (SPEC §6): what a built-in handler takes when payload.simulate
# gives no duration. Shared by the live handlers and the simulator.
DEFAULT_SIMULATED_DURATION_SECONDS: Final = 1.0
SIMULATED_DURATION_BY_TYPE: Final = {
    "send_email": 0.5,
    "send_notifications": 0.5,
    "data_export": 3.0,
    "generate_report": 2.0,
    "noop": 0.0,
}
