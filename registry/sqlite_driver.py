"""aiosqlite as SQLAlchemy drives it, in one trip to the connection's thread a statement.

aiosqlite runs each sqlite3 call in a thread of its own, and SQLAlchemy's
adapter makes a call, and a trip there and back, for each step of a
statement: make a cursor, execute, fetch the rows, close the cursor. Each
trip back waits for the interpreter's lock, which paho's network thread holds
much of the time under load: a group transaction of the hot path with an alert
(BEGIN, the dedupe keys, the visit log, the stolen visits, the alert's five
statements, COMMIT) made three or four trips for each statement where one
will do.

Here a statement is one function run in that thread: cursor, execute, fetch,
close. A transaction's BEGIN goes in the same trip as its first statement
(`begin_with_next`), and a COMMIT or ROLLBACK with no transaction open makes
no trip: the pool's rollback of every connection given back after a commit
did, and SQLite had nothing to roll back. A group of the hot path was five
trips (BEGIN, the dedupe keys, the visit log, COMMIT, that rollback); it is
three. (The hot path's groups and the materializer's upserts now go further:
`registry.db.in_transaction` runs each whole transaction in a thread of its
own, one trip; this driver serves everything else.) Everything else (the
pool, COMMIT, errors) is SQLAlchemy's aiosqlite dialect, unchanged;
`registry.db.create_engine` passes `DBAPI` as the engine's module. It leans
on two names that are not public: `aiosqlite.Connection._execute` (how
aiosqlite's own cursor runs its calls) and the adapter's `_cursor_cls`;
tests/registry/test_sqlite_driver.py fails if either stops being used.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT


def _run(conn: sqlite3.Connection, method: str, operation: Any, parameters: Any,
         begin: str | None) -> tuple[Any, list[Any], int, int | None]:
    """A whole statement, in the connection's thread; `begin` first, where given."""
    cur = conn.cursor()
    try:
        if begin is not None:
            cur.execute(begin)
        if parameters is None:
            getattr(cur, method)(operation)
        else:
            getattr(cur, method)(operation, parameters)
        description = cur.description
        return description, cur.fetchall() if description else [], cur.rowcount, cur.lastrowid
    finally:
        cur.close()


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """Holds a statement's results, fetched in the same trip as its execution."""

    __slots__ = ("_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: AsyncAdapt_aiosqlite_connection) -> None:
        # No driver cursor is made here (the base class makes one: a trip).
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int:
        return self._lastrowid  # type: ignore[return-value]

    @property
    def arraysize(self) -> int:
        return 1

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        pass  # the rows are all fetched at once

    async def _async_soft_close(self) -> None:
        return None  # nothing is open: the rows are here already

    def close(self) -> None:
        self._rows.clear()

    async def _statement(self, method: str, operation: Any, parameters: Any) -> None:
        conn: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        adapt: _Connection = self._adapt_connection  # type: ignore[assignment]
        async with adapt._execute_mutex:
            begin, adapt.begin = adapt.begin, None
            description, rows, self._rowcount, self._lastrowid = await conn._execute(  # type: ignore[no-untyped-call]
                _run, conn._conn, method, operation, parameters, begin)
        self._description = description
        self._rows = collections.deque(rows)

    async def _execute_async(self, operation: Any, parameters: Any) -> None:
        await self._statement("execute", operation, parameters)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> None:
        await self._statement("executemany", operation, seq_of_parameters)


class _Connection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ("begin",)
    _cursor_cls = OneTripCursor  # type: ignore[assignment]

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        self.begin: str | None = None  # run before the next statement, in its trip

    def _open(self) -> bool:
        """Whether SQLite has a transaction open on this connection (it knows without
        a trip: sqlite3 reads its autocommit flag)."""
        sqlite = self._connection._connection  # None once closed
        try:
            return sqlite is not None and sqlite.in_transaction
        except sqlite3.ProgrammingError:  # a Python that checks the thread here: ask SQLite
            return True

    def rollback(self) -> None:
        self.begin = None  # a BEGIN not run yet began nothing
        if self._open():
            super().rollback()

    def commit(self) -> None:
        self.begin = None
        if self._open():
            super().commit()


def begin_with_next(dbapi_connection: Any, begin: str) -> None:
    """Run `begin` (BEGIN or BEGIN IMMEDIATE) in the same trip as the connection's
    next statement. SQLAlchemy's "begin" event calls this."""
    dbapi_connection.begin = begin


class _DBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        return _Connection(self, super().connect(*arg, **kw)._connection)


DBAPI = _DBAPI(aiosqlite, sqlite3)
