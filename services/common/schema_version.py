"""Which version of a store's tables a database holds, so that a Callmesh never writes tables it does not know.

One database may hold several stores (ingest's job store and crm's outbox share PostgreSQL under Compose and
Kubernetes), so each store keeps its own row in ``callmesh_schema``. A store opened on tables of another version
is refused at start, before anything is written: a rollback to an older release after a newer one changed the
tables stops with the reason instead of misreading them.

Tables of an older version are upgraded at open by the store's ``upgrades``, in the transaction that creates the
schema, so a store is either upgraded whole or left as it was.

A replica already running when a newer one upgrades the tables (a rolling update across a version change) finds
out within SCHEMA_CHECK_SECONDS (:func:`services.common.database.watch_schema_version`) and stops, as it would
have been refused at start: :class:`NewerTables`."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.config import ConfigError

log = logging.getLogger(__name__)

TABLE = "CREATE TABLE IF NOT EXISTS callmesh_schema (store TEXT PRIMARY KEY, version INTEGER NOT NULL)"
READ = "SELECT version FROM callmesh_schema WHERE store = ?"
RECORD = "INSERT INTO callmesh_schema (store, version) VALUES (?, ?) ON CONFLICT (store) DO NOTHING"
UPDATE = "UPDATE callmesh_schema SET version = ? WHERE store = ?"


def statements(schema: str) -> list[str]:
    """A schema's statements one by one, comments dropped, to be run inside the transaction that opens the store
    (a script runner would commit on its own)."""
    return [s.strip() for s in re.sub(r"--[^\n]*", "", schema).split(";") if s.strip()]


class NewerTables(Exception):
    """The store's tables were upgraded by a newer Callmesh while this one ran: it stops (exit status 3)."""


@dataclass(frozen=True)
class SchemaVersion:
    store: str  # whose tables: "ingest.jobs", "crm.outbox"
    version: int  # the version of those tables this code reads and writes
    # upgrades[n](connection) takes the store's tables from version n to n + 1. It runs after the schema's
    # CREATE … IF NOT EXISTS statements (new tables are there to be filled), in the same transaction.
    upgrades: Mapping[int, Callable[[Any], None]] = field(default_factory=dict)

    def check(self, found: int | None, where: str) -> None:
        """Raise :class:`ConfigError` unless the tables at ``where`` are new (``found`` None), of this version, or of
        an older one that ``upgrades`` take to this one."""
        if found is None or found == self.version:
            return
        if found > self.version:
            raise ConfigError(f"{where}: its {self.store} tables are at version {found}, written by a newer Callmesh; "
                              f"this one knows version {self.version}: run the newer release, or restore a backup "
                              "taken before the upgrade")
        if any(n not in self.upgrades for n in range(found, self.version)):
            raise ConfigError(f"{where}: its {self.store} tables are at version {found}, older than this Callmesh's "
                              f"{self.version}, with no upgrade known between them: upgrade through the releases "
                              "between")

    def newer(self, found: int, where: str) -> NewerTables | None:
        """What stops a running replica whose tables at ``where`` are now at version ``found`` (None: it may go on)."""
        if found <= self.version:
            return None
        return NewerTables(f"{where}: its {self.store} tables were upgraded to version {found} by a newer Callmesh while "
                           f"this one (version {self.version}) ran; it stops, so that it writes nothing the newer one "
                           "does not expect (in a rolling update the newer replicas take over)")

    def record(self, connection: Any, found: int | None, where: str) -> None:
        """Once the schema is created: upgrade the tables ``check`` found at an older version, and record the
        version they are at now (new tables: this one)."""
        if found is None:
            connection.execute(RECORD, (self.store, self.version))
            return
        for n in range(found, self.version):
            started = time.monotonic()
            self.upgrades[n](connection)
            log.info("%s: %s tables upgraded from version %d to %d in %.1f s", where, self.store, n, n + 1,
                     time.monotonic() - started)
        if found != self.version:
            connection.execute(UPDATE, (self.version, self.store))
