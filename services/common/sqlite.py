"""A small async wrapper over one SQLite connection, for the embedded default stores.

Every statement runs on one dedicated thread, so the event loop never blocks on
disk and the connection is never shared between threads. WAL journaling with
``synchronous=FULL``: a write that returned is on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class AsyncSqlite:
    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        self._conn: sqlite3.Connection | None = None
        self._schema = schema

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(self._schema)
        self._conn = conn

    async def open(self) -> None:
        await self._run(self._open)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside BEGIN IMMEDIATE … COMMIT on the store's thread."""

        def tx() -> T:
            assert self._conn is not None, "store not opened"
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

        return await self._run(tx)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        def q() -> list[sqlite3.Row]:
            assert self._conn is not None, "store not opened"
            return self._conn.execute(sql, tuple(params)).fetchall()

        return await self._run(q)

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def close(self) -> None:
        def c() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(c)
        self._executor.shutdown(wait=True)
