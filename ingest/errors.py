"""Errors of the ingest package.

    IngestError
    ├── Rejected          a payload broken at the envelope (PROTOCOL.md 2.5); carries its Reason
    └── ConfigError       a setting that cannot be used; names the setting

The `Reason` values are exactly the `reason` label values of
`bikewatch_rejected_total` and `bikewatch_rejected_reads_total`, so the error,
the metric and the reject store speak one vocabulary.
"""

from __future__ import annotations

import enum

PAYLOAD_PREFIX = 256  # bytes of a payload an error message may quote


class Reason(enum.StrEnum):
    # Whole payloads, in the precedence order of PROTOCOL.md 2.5: when several
    # apply, the first one listed here is the one counted.
    TOO_LARGE = "too_large"
    BAD_FORMAT = "bad_format"
    BAD_JSON = "bad_json"
    UNKNOWN_VERSION = "unknown_version"
    BAD_BINARY = "bad_binary"
    MISSING_FIELD = "missing_field"
    BAD_VALUE = "bad_value"
    TOO_MANY_READS = "too_many_reads"
    STATION_MISMATCH = "station_mismatch"
    # Single reads inside a good batch (bad_value is shared with the list above).
    BAD_TAG = "bad_tag"


PAYLOAD_REASONS = tuple(r for r in Reason if r is not Reason.BAD_TAG)
READ_REASONS = (Reason.BAD_TAG, Reason.BAD_VALUE)


class IngestError(Exception):
    """Root of the ingest errors."""


class Rejected(IngestError):
    """A payload rejected whole, with what an operator needs to see why."""

    def __init__(self, reason: Reason, detail: str, *, boot: int | None = None,
                 seq: int | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.boot = boot
        self.seq = seq


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


class ConfigError(IngestError):
    """A setting that cannot be used. The message names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem
