"""The few SQL forms that differ between SQLite and PostgreSQL.

Statements the hot path runs for every group or every alert are built once, at
import, with `bindparam` for what changes: building a statement with its
values in it (and SQLAlchemy's cache key of it) cost about 300 µs of the
event loop's time each time, against about 130 µs for the whole execution of
one built before (measured on SQLite).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


def insert_ignore(conn: Connection | AsyncConnection, model: Any, *returning: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING [RETURNING ...], for the connection's dialect;
    its values are given as execute's parameters, or with `.values()` (a copy)."""
    return _insert_ignore(conn.dialect.name, getattr(model, "__table__", model), returning)


@functools.cache
def _insert_ignore(dialect: str, table: Any, returning: tuple[Any, ...]) -> Any:
    # Built once: a statement is immutable, and building one costs more than the
    # hot path's whole execution of it (see this module's note).
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table).on_conflict_do_nothing()
    return stmt.returning(*returning) if returning else stmt


def placeholders(conn: Connection, n: int) -> str:
    """n driver placeholders: `?` for sqlite3, `$1..$n` for asyncpg."""
    if conn.dialect.paramstyle == "numeric_dollar":
        return ",".join(f"${i}" for i in range(1, n + 1))
    return ",".join("?" * n)


def executemany(conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """Run one statement for many rows straight through the driver.

    On the hot path SQLAlchemy's per-row parameter processing costs ~10 µs a
    row; the drivers' own executemany costs ~1. `sql` uses `{params}` where the
    VALUES placeholders go.
    """
    if rows:
        conn.exec_driver_sql(sql.format(params=placeholders(conn, len(rows[0]))), rows)


def insert_new_keys(conn: Connection, rows: list[tuple[str, int, int, int]],
                          ) -> set[tuple[str, int, int]]:
    """Insert (station, boot, seq, received_ms) dedupe keys; return those that were new.

    PostgreSQL: one INSERT ... SELECT unnest(...) ON CONFLICT DO NOTHING RETURNING.
    SQLite: INSERT OR IGNORE for all, and only when fewer rows went in than were
    offered (a repeat, rare) a look at which stored rows carry another receive time.
    """
    if not rows:
        return set()
    if conn.dialect.name == "postgresql":
        columns = [list(c) for c in zip(*rows, strict=True)]
        result = conn.exec_driver_sql(
            "INSERT INTO seen_batches (station, boot, seq, received_ms) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) "
            "ON CONFLICT DO NOTHING RETURNING station, boot, seq",
            tuple(columns))
        inserted: Sequence[Any] = result.all()
        return {(r[0], r[1], r[2]) for r in inserted}
    result = conn.exec_driver_sql(
        "INSERT OR IGNORE INTO seen_batches (station, boot, seq, received_ms) "
        "VALUES (?,?,?,?)", rows)
    if result.rowcount == len(rows):
        return {(r[0], r[1], r[2]) for r in rows}
    new = set()
    for station, boot, seq, received_ms in rows:
        stored = (conn.exec_driver_sql(
            "SELECT received_ms FROM seen_batches WHERE station=? AND boot=? AND seq=?",
            (station, boot, seq))).scalar()
        if stored == received_ms:
            new.add((station, boot, seq))
    return new
