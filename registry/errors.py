"""Errors of the registry package.

    RegistryError
    ├── Refused        a request the registry will not carry out (a closed case, a tag
    │   │              already stolen); the command line exits 1, the API answers 409
    │   ├── NotFound   the record named does not exist (API: 404)
    │   └── Invalid    the request itself is malformed (API: 400)
    └── StoreError     the database cannot be used at all; exit 2, naming BIKEWATCH_DB_URL
"""

from __future__ import annotations


class RegistryError(Exception):
    """Root of the registry errors."""


class Refused(RegistryError):
    """The registry will not do this; the message says why in one line."""


class StoreError(RegistryError):
    """The database cannot be used; the message names the setting."""


class NotFound(Refused):
    """The record the request names does not exist."""


class Invalid(Refused):
    """The request is malformed: a bad id, a missing CSV column, a bad value."""
