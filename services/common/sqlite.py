"""A small async wrapper over one SQLite connection, for the embedded default stores.

Every statement runs on one dedicated thread, so the event loop never blocks on
disk and the connection is never shared between threads. WAL journaling with
``synchronous=FULL``: a write that returned is on disk. :meth:`AsyncSqlite.grouped`
lets writers that arrive while a commit is under way share the next one (group
commit): one fsync for many, each still acknowledged only once it is on disk.
"""

from __future__ import annotations

import asyncio
import contextvars
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from services.common import schema_version
from services.common.metrics import store_write_seconds
from services.common.schema_version import SchemaVersion

T = TypeVar("T")
GROUP_MAX = 256  # writers per group commit


class AsyncSqlite:
    name = "sqlite"
    for_update = ""  # BEGIN IMMEDIATE already holds the only write lock
    skip_locked = ""

    def __init__(self, path: Path, schema: str, version: SchemaVersion | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.where = str(path)  # how messages name the database
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        self._conn: sqlite3.Connection | None = None
        self._schema = schema
        self._version = version
        self._group: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = []
        self._group_task: asyncio.Task | None = None
        self._writes = store_write_seconds()
        self._write_attributes = {"store": version.store if version else path.stem, "engine": self.name}

    def next_seq(self, table: str) -> str:
        """SQL giving the next arrival number of ``table`` (one writer: the largest plus one)."""
        return f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}"

    def json_text(self, column: str, *keys: str) -> tuple[str, tuple[Any, ...]]:
        """SQL (and its parameters) for the text at ``keys`` in the JSON object of ``column``."""
        return f"json_extract({column}, ?)", ("$" + "".join(f'."{key}"' for key in keys),)

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")  # a row that belongs to another goes with it (ON DELETE CASCADE)
            conn.execute("BEGIN IMMEDIATE")  # the schema, and any upgrade of it, whole or not at all
            found = None
            if self._version is not None:  # before the schema: tables of another version are not to be touched
                conn.execute(schema_version.TABLE)
                row = conn.execute(schema_version.READ, (self._version.store,)).fetchone()
                found = row[0] if row else None
                self._version.check(found, self.where)
            for statement in schema_version.statements(self._schema):
                conn.execute(statement)
            if self._version is not None:
                self._version.record(conn, found, self.where)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            conn.close()
            raise
        self._conn = conn

    async def open(self) -> None:
        await self._run(self._open)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # In the caller's context: what the store's thread logs carries the call's trace and call id.
        return await asyncio.get_running_loop().run_in_executor(self._executor, contextvars.copy_context().run, fn,
                                                                *args)

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside BEGIN IMMEDIATE … COMMIT on the store's thread."""

        def tx() -> T:
            assert self._conn is not None, "store not opened"
            conn = self._conn
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                self._writes.record(time.perf_counter() - started, self._write_attributes)
            except BaseException:
                # SQLite may have rolled the transaction back itself (a full disk, an I/O error): a ROLLBACK
                # then fails, and its "no transaction is active" would hide the cause from the caller.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return await self._run(tx)

    async def grouped(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in a transaction shared with the other writers waiting at that moment.

        A ``fn`` that raises is undone alone and its caller gets the exception; the others commit
        together (the batch is then redone with a savepoint around each ``fn``, so a ``fn`` must touch
        nothing but the database). Returns once the commit is on disk."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._group.append((fn, future))
        if self._group_task is None:
            # Not in this writer's context: the group commits for every writer in it.
            self._group_task = asyncio.create_task(self._commit_groups(), name=f"sqlite-group-{self.path.stem}",
                                                   context=contextvars.Context())
        return await future

    async def _commit_groups(self) -> None:
        try:
            while self._group:
                batch, self._group = self._group[:GROUP_MAX], self._group[GROUP_MAX:]

                def together(c: sqlite3.Connection) -> list[tuple[bool, Any]]:
                    return [(True, fn(c)) for fn, _ in batch]

                def one_by_one(c: sqlite3.Connection) -> list[tuple[bool, Any]]:
                    out: list[tuple[bool, Any]] = []
                    for fn, _ in batch:
                        c.execute("SAVEPOINT grouped")
                        try:
                            out.append((True, fn(c)))
                        except Exception as exc:  # this writer's failure stays this writer's
                            if not c.in_transaction:  # unless it ended the transaction: see tx below
                                raise
                            c.execute("ROLLBACK TO grouped")
                            out.append((False, exc))
                        c.execute("RELEASE grouped")
                    return out

                def tx(c: sqlite3.Connection) -> list[tuple[bool, Any]]:
                    # All writers in one go; only when one of them raises is the batch redone with a
                    # savepoint around each (two more statements per writer, spent only then).
                    c.execute("SAVEPOINT batch")
                    try:
                        out = together(c)
                    except Exception:
                        if not c.in_transaction:
                            # SQLite rolled the whole transaction back (a full disk, an I/O error): every
                            # writer of the batch gets that error, none is committed.
                            raise
                        c.execute("ROLLBACK TO batch")
                        out = one_by_one(c)
                    c.execute("RELEASE batch")
                    return out

                try:
                    results = await self.transaction(tx)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (ok, value), (_, future) in zip(results, batch):
                    if future.done():  # the caller went away; its write stands
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._group_task = None

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        def q() -> list[sqlite3.Row]:
            assert self._conn is not None, "store not opened"
            return self._conn.execute(sql, tuple(params)).fetchall()

        return await self._run(q)

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def close(self) -> None:
        if self._group_task is not None:
            await self._group_task

        def c() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(c)
        self._executor.shutdown(wait=True)


def backup(source: Path, destination: Path) -> None:
    """Copy the SQLite database ``source`` to ``destination`` while its service keeps writing: SQLite's online
    backup reads one consistent state (the WAL's committed transactions included), and the copy is checked
    (``PRAGMA integrity_check``) before it is kept, as one file (no WAL beside it). ``destination`` must not
    exist yet."""
    partial = destination.with_name(destination.name + ".partial")
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        dest = sqlite3.connect(partial)
        try:
            src.backup(dest)
            dest.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, not a WAL database's three
            check = dest.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy of {source} fails its integrity check: {check}")
        finally:
            dest.close()
        partial.rename(destination)
    finally:
        src.close()
        partial.unlink(missing_ok=True)
