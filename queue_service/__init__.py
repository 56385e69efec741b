"""Smart Task Queue: a PostgreSQL-backed job system whose scheduling policy is a pure function."""

__version__ = "0.1.0"
