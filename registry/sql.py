"""The few SQL forms that differ between SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


def insert_ignore(conn: AsyncConnection, model: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING, for the connection's dialect."""
    return _insert(conn, model).on_conflict_do_nothing()


def insert_for(conn: AsyncConnection, model: Any) -> Any:
    """The dialect's INSERT, which has `on_conflict_do_update` and `excluded`."""
    return _insert(conn, model)


def _insert(conn: AsyncConnection, model: Any) -> Any:
    table = getattr(model, "__table__", model)
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
