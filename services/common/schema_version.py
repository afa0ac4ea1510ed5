"""Which version of a store's tables a database holds, so that a Callmesh never writes tables it does not know.

One database may hold several stores (ingest's job store and crm's outbox share PostgreSQL under Compose and
Kubernetes), so each store keeps its own row in ``callmesh_schema``. A store opened on tables of another version
is refused at start, before anything is written: a rollback to an older release after a newer one changed the
tables stops with the reason instead of misreading them."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ConfigError

TABLE = "CREATE TABLE IF NOT EXISTS callmesh_schema (store TEXT PRIMARY KEY, version INTEGER NOT NULL)"
READ = "SELECT version FROM callmesh_schema WHERE store = ?"
RECORD = "INSERT INTO callmesh_schema (store, version) VALUES (?, ?) ON CONFLICT (store) DO NOTHING"


@dataclass(frozen=True)
class SchemaVersion:
    store: str  # whose tables: "ingest.jobs", "crm.outbox"
    version: int  # the version of those tables this code reads and writes

    def check(self, found: int | None, where: str) -> None:
        """Raise :class:`ConfigError` unless the tables at ``where`` are new (``found`` None) or of this version."""
        if found is None or found == self.version:
            return
        if found > self.version:
            raise ConfigError(f"{where}: its {self.store} tables are at version {found}, written by a newer Callmesh; "
                              f"this one knows version {self.version}: run the newer release, or restore a backup "
                              "taken before the upgrade")
        raise ConfigError(f"{where}: its {self.store} tables are at version {found}, older than this Callmesh's "
                          f"{self.version}, with no upgrade known between them: upgrade through the releases between")
