"""Alert ids: ULIDs (26 characters, Crockford base32, sortable by time).

Receivers drop repeats by `alert_id`, so it is made once, when the alert is
raised, and stored with it; every redelivery carries the same one.
"""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid(now_ms: int) -> str:
    value = (now_ms & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))
