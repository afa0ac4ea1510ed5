"""Pick the store engine: embedded SQLite by default, PostgreSQL when ``DATABASE_URL`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Union

import psycopg

from services.common import schema_version
from services.common.config import env_float
from services.common.postgres import AsyncPostgres
from services.common.schema_version import NewerTables, SchemaVersion
from services.common.sqlite import AsyncSqlite

log = logging.getLogger(__name__)
Database = Union[AsyncSqlite, AsyncPostgres]
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# What a store raises when its database cannot do the work just now, whatever the request: SQLite's full disk
# ("database or disk is full"), I/O error or lock held too long; a PostgreSQL server that is down or refuses
# connections (psycopg_pool's PoolTimeout is one too). Not a mistake in the SQL, nor a broken database file.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)


def outage_cause(exc: Exception) -> str:
    """What a client may be told of why a store could not serve it: SQLite's own words (about a local file),
    and only the kind of a PostgreSQL error, whose message can name hosts and ports (the log has it whole)."""
    return str(exc) if isinstance(exc, sqlite3.Error) else f"{type(exc).__name__}, see the log"


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def connect(location: str | Path, schema: str, sequences: tuple[str, ...] = (),
            version: SchemaVersion | None = None) -> Database:
    """A store database: ``location`` is a PostgreSQL URL or the path of a SQLite file.

    ``schema`` is written once for both engines (``DOUBLE PRECISION`` and ``BIGINT``
    mean the same to SQLite); ``sequences`` name the tables whose arrival order comes
    from a PostgreSQL sequence (with SQLite's single writer, from ``MAX(seq) + 1``);
    ``version``: the store's tables and their version, checked at open (see
    :mod:`services.common.schema_version`)."""
    if is_postgres_url(location):
        return AsyncPostgres(str(location), schema, sequences, version=version)
    return AsyncSqlite(Path(location), schema, version)


def schema_check_seconds() -> float:
    """How often a running replica looks whether a newer Callmesh upgraded its tables (SCHEMA_CHECK_SECONDS)."""
    return env_float("SCHEMA_CHECK_SECONDS", 30.0, minimum=0.1)


async def watch_schema_version(db: Database, version: SchemaVersion, stop: asyncio.Event,
                               interval: float) -> NewerTables | None:
    """Until ``stop`` is set, look every ``interval`` seconds at the version of ``db``'s tables; once a newer
    Callmesh has upgraded them, log it, set ``stop`` (the service drains and stops as on SIGTERM) and return the
    reason, which the service raises once it has stopped. A store that does not answer is looked at again next
    time (the work that needs it reports the outage)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
            return None
        try:
            row = await db.fetchone(schema_version.READ, (version.store,))
        except UNAVAILABLE_ERRORS:
            continue
        if row is not None and (newer := version.newer(row["version"], db.where)) is not None:
            log.error("%s", newer)
            stop.set()
            return newer
    return None


async def delete_in_batches(delete: Callable[[int], Awaitable[int]], batch: int = 1000) -> int:
    """Call ``delete(batch)`` (which deletes at most that many rows and says how many) until it deletes fewer:
    a backlog of expired rows goes in short transactions, with the store free for other work in between."""
    total = 0
    while True:
        deleted = await delete(batch)
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(0)


class OutageLog:
    """What a loop that keeps asking a store logs while the store cannot answer: one error when it stops
    answering, with the cause, and one line when it answers again, not a traceback on every turn."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.since: float | None = None  # when the outage began (loop time), None while the store answers

    def failed(self, exc: Exception) -> None:
        if self.since is None:
            self.since = asyncio.get_running_loop().time()
            self.log.error("%s cannot be reached (%s: %s); waiting for it, nothing is lost meanwhile", self.what,
                           type(exc).__name__, exc)

    def answered(self) -> None:
        if self.since is not None:
            self.log.warning("%s answers again, after %.0f s", self.what,
                             asyncio.get_running_loop().time() - self.since)
            self.since = None
