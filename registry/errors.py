"""Errors of the registry package.

    RegistryError
    ├── Refused        a request the registry will not carry out (unknown case, tag
    │                  not registered, bad CSV rows); the command line exits 1
    └── StoreError     the database cannot be used at all; exit 2, naming BIKEWATCH_DB_URL
"""

from __future__ import annotations


class RegistryError(Exception):
    """Root of the registry errors."""


class Refused(RegistryError):
    """The registry will not do this; the message says why in one line."""


class StoreError(RegistryError):
    """The database cannot be used; the message names the setting."""
