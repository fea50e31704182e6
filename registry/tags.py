"""Tag IDs as text: parsing and formatting (PROTOCOL.md, preamble).

Tags are unsigned 64-bit integers. In text they are 1 to 16 hex digits, any
case, no prefix. The platform writes them as lowercase hex, zero-padded to 8
digits when the value fits in 32 bits, else to 16.

The database stores a tag as a signed BIGINT holding the same 64 bits
(`to_db`/`from_db`), because neither SQLite nor PostgreSQL has an unsigned
64-bit integer and numpy reinterprets the bits for free.
"""

from __future__ import annotations

import re

_HEX_TAG = re.compile(r"[0-9A-Fa-f]{1,16}")
_TWO_63 = 1 << 63
_TWO_64 = 1 << 64


class BadTag(ValueError):
    """Text that is not 1 to 16 hex digits."""


def is_tag_text(text: object) -> bool:
    return isinstance(text, str) and _HEX_TAG.fullmatch(text) is not None


def parse_tag(text: str) -> int:
    if not is_tag_text(text):
        raise BadTag(f"bad tag {text[:40]!r}: expected 1 to 16 hex digits, no prefix")
    return int(text, 16)


def format_tag(tag: int) -> str:
    return f"{tag:08x}" if tag < (1 << 32) else f"{tag:016x}"


def to_db(tag: int) -> int:
    """The unsigned tag as the signed 64-bit value with the same bits."""
    return tag - _TWO_64 if tag >= _TWO_63 else tag


def from_db(value: int) -> int:
    return value + _TWO_64 if value < 0 else value
