"""The same async store interface as :class:`~services.common.sqlite.AsyncSqlite`, on PostgreSQL.

Used when ``DATABASE_URL`` is set, so several ingest and CRM replicas can share
one job store and one outbox. The stores write their SQL once, with ``?``
placeholders and the small dialect hooks below (``for_update``, ``skip_locked``,
``next_seq``); this module turns ``?`` into psycopg's ``%s`` and hands out rows
that answer to both a column index and a column name, as ``sqlite3.Row`` does.

Each statement runs on a pooled connection in a worker thread (psycopg's
synchronous API), so store code is the same for both engines: a function of a
connection, run inside one transaction. A transaction that loses a deadlock or
a serialization conflict is run again.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from services.common import schema_version
from services.common.metrics import store_write_seconds
from services.common.schema_version import SchemaVersion

T = TypeVar("T")
log = logging.getLogger(__name__)
RETRIES = 5
# How long a statement waits for a connection when the pool has none that works (the server is down or refuses
# connections), before the store counts as unavailable: ingest then answers 503 and crm UNAVAILABLE at once,
# instead of holding a recorder's webhook for longer than it waits for an answer. Opening waits connect_timeout.
CONNECTION_WAIT_SECONDS = 5.0
_SCHEMA_LOCK = 0x63616C6C6D657368  # "callmesh": one replica creates the schema at a time


class Row(tuple):
    """A result row: ``row[0]`` and ``row["call_id"]`` both work."""

    _names: dict[str, int]

    def __new__(cls, values: Sequence[Any], names: dict[str, int]) -> "Row":
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: psycopg.Cursor) -> Callable[[Sequence[Any]], Row]:
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(values, names)


def _sql(statement: str) -> str:
    """``?`` placeholders (the stores' and sqlite3's) → psycopg's ``%s``."""
    return re.sub(r"\?", "%s", statement)


class Connection:
    """What store functions see: ``execute``/``executemany`` with ``?`` placeholders, like sqlite3."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def execute(self, statement: str, params: Iterable[Any] = ()) -> psycopg.Cursor:
        return self._conn.execute(_sql(statement), tuple(params) or None)

    def executemany(self, statement: str, params: Iterable[Iterable[Any]]) -> psycopg.Cursor:
        cursor = self._conn.cursor()
        cursor.executemany(_sql(statement), [tuple(p) for p in params])
        return cursor


class AsyncPostgres:
    """A connection pool to one PostgreSQL database, for the stores of one service."""

    name = "postgresql"
    for_update = " FOR UPDATE"  # lock the rows read, until the transaction ends
    skip_locked = " FOR UPDATE SKIP LOCKED"  # take rows no other replica is taking right now

    def __init__(self, url: str, schema: str, sequences: tuple[str, ...] = (), *, pool_size: int = 4,
                 connect_timeout: float = 30.0, version: SchemaVersion | None = None) -> None:
        self.url = url
        self.where = "DATABASE_URL"  # how messages name the database (the URL may hold a password)
        self._schema = schema
        self._version = version
        self._closed = False
        self._sequences = sequences
        self._connect_timeout = connect_timeout
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="postgres")
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, name="callmesh",
                                    kwargs={"autocommit": True, "row_factory": _row_factory},
                                    timeout=CONNECTION_WAIT_SECONDS)
        self._writes = store_write_seconds()
        self._write_attributes = {"store": version.store if version else "", "engine": self.name}

    def json_text(self, column: str, *keys: str) -> tuple[str, tuple[Any, ...]]:
        """SQL (and its parameters) for the text at ``keys`` in the JSON object of ``column``."""
        return f"({column}::jsonb #>> ?::text[])", (list(keys),)

    def next_seq(self, table: str) -> str:
        """SQL giving the next arrival number of ``table`` (a sequence: safe with several writers)."""
        return f"SELECT nextval('{table}_arrival')"

    def _open(self) -> None:
        self._pool.open(wait=True, timeout=self._connect_timeout)

        def create(c: Connection) -> None:
            c.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            found = None
            if self._version is not None:  # before the schema: tables of another version are not to be touched
                c.execute(schema_version.TABLE)
                row = c.execute(schema_version.READ, (self._version.store,)).fetchone()
                found = row["version"] if row else None
                self._version.check(found, self.where)
            for table in self._sequences:
                c.execute(f"CREATE SEQUENCE IF NOT EXISTS {table}_arrival")
            for statement in schema_version.statements(self._schema):
                c.execute(statement)
            if self._version is not None:
                self._version.record(c, found, self.where)

        self._transaction(create)

    async def open(self) -> None:
        try:
            await self._run(self._open)
        except Exception:
            await self.close()
            raise

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # In the caller's context: what the store's thread logs carries the call's trace and call id.
        return await asyncio.get_running_loop().run_in_executor(self._executor, contextvars.copy_context().run, fn,
                                                                *args)

    def _transaction(self, fn: Callable[[Connection], T]) -> T:
        started = time.perf_counter()
        for attempt in range(RETRIES):
            try:
                with self._pool.connection() as conn:
                    with conn.transaction():
                        result = fn(Connection(conn))
                    self._writes.record(time.perf_counter() - started, self._write_attributes)
                    return result
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                if attempt == RETRIES - 1:
                    raise
                log.info("transaction retried after %s", type(exc).__name__)
        raise AssertionError("unreachable")

    async def transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` inside one transaction on a pooled connection."""
        return await self._run(self._transaction, fn)

    async def grouped(self, fn: Callable[[Connection], T]) -> T:
        """A transaction of its own: PostgreSQL commits concurrent writers in parallel already."""
        return await self.transaction(fn)

    async def fetchall(self, statement: str, params: Iterable[Any] = ()) -> list[Row]:
        def q() -> list[Row]:
            with self._pool.connection() as conn:
                return Connection(conn).execute(statement, params).fetchall()

        return await self._run(q)

    async def fetchone(self, statement: str, params: Iterable[Any] = ()) -> Row | None:
        rows = await self.fetchall(statement, params)
        return rows[0] if rows else None

    async def close(self) -> None:
        if self._closed:  # an open that failed has closed it already
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._pool.close)
        self._executor.shutdown(wait=True)
