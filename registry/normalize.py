"""Search keys and masks for the registry's people-typed fields.

Plates and frame numbers are typed from a glance at a bike in the street, so
their search keys fold what is easy to misread: case, spaces and separators,
and the look-alike pairs O/Q and 0, I/L and 1, Z and 2, S and 5, B and 8.
Characters outside ASCII (the province character of a Chinese plate) are kept.
Keys are stored beside the text and indexed; the text is what people see.
"""

from __future__ import annotations

import re

_FOLD = str.maketrans("OQILZSB", "0011258")
_SEPARATORS = re.compile(r"[\s\-_.·/\\]+")
_NOT_DIGIT = re.compile(r"\D+")


def plate_key(text: str) -> str:
    """The search key of a plate or frame number: `zj-j 12 345` and `ZJJ12345` agree."""
    return _SEPARATORS.sub("", text).upper().translate(_FOLD)


def phone_key(text: str) -> str:
    """Digits only, without a leading +86: `+86 138-0000-1234` is `13800001234`."""
    digits = _NOT_DIGIT.sub("", text)
    return digits[2:] if text.strip().startswith("+86") else digits


def mask_phone(text: str) -> str:
    """`138****1234`: the first three and last four digits, the rest starred."""
    digits = phone_key(text)
    if len(digits) <= 7:
        return "*" * len(digits)
    return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]


def mask_id_number(text: str) -> str:
    """A resident ID number as `3301**********1234`."""
    t = text.strip()
    return t[:4] + "*" * max(0, len(t) - 8) + t[-4:] if len(t) > 8 else "*" * len(t)


def mask_name(text: str) -> str:
    """`Li Lei` as `L*****`; a Chinese name `李雷` as `李*`: the first character only."""
    t = text.strip()
    return t[:1] + "*" * (len(t) - 1)
