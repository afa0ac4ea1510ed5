"""The durable outbox: a record is stored before Deliver returns, and stays until the CRM has it.

SQLite by default; PostgreSQL when ``DATABASE_URL`` is set, so several CRM replicas
share one outbox. Records reach the CRM strictly in order of arrival, whichever
replica posts them: a claim locks the head of the queue (``FOR UPDATE``) and takes
nothing while another replica's lease holds the head, so one batch is in flight
at a time, and a replica that dies mid-batch leaves a lease that expires.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.database import connect
from services.common.schema_version import SchemaVersion

QUEUED, DELIVERED, FAILED = "queued", "delivered", "failed"
SET_ASIDE, NOT_QUEUED, IN_FLIGHT = "set aside", "not queued", "in flight"  # what set_aside did
ERASED = "erased"  # what erase did (or IN_FLIGHT)
_KEY_NAMESPACE = uuid.UUID("6f1c4f3e-8a55-4e0b-9c1e-3d7f2b8a9c10")

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    call_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION,
    next_attempt_at DOUBLE PRECISION,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    seq BIGINT NOT NULL,
    trace_context TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_fifo ON deliveries (state, seq);
CREATE INDEX IF NOT EXISTS deliveries_seq ON deliveries (seq);
CREATE INDEX IF NOT EXISTS deliveries_delivered ON deliveries (state, delivered_at);  -- past their retention
"""
# The version of the tables above: raised, with a migration, whenever they change.
SCHEMA_VERSION = SchemaVersion("crm.outbox", 1)


class RevisionInFlight(Exception):
    """A record of a higher revision came while the call's earlier record is being posted."""


def idempotency_key(call_id: str, version: int = 1) -> str:
    """Stable per call and revision of its record: the CRM can drop repeats of the same record."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{call_id}#v{version}"))


@dataclass(frozen=True)
class DeliveryRow:
    call_id: str
    idempotency_key: str
    payload: dict
    state: str
    attempts: int
    last_error: str
    created_at: float
    delivered_at: float | None
    next_attempt_at: float | None
    trace_context: dict

    @classmethod
    def from_row(cls, row: Any) -> "DeliveryRow":
        return cls(row["call_id"], row["idempotency_key"], json.loads(row["payload"]), row["state"], row["attempts"],
                   row["last_error"], row["created_at"], row["delivered_at"], row["next_attempt_at"],
                   json.loads(row["trace_context"]))


class Outbox:
    def __init__(self, location: Path | str) -> None:
        """``location``: a SQLite file, or a ``postgresql://`` URL."""
        self.db = connect(location, SCHEMA, sequences=("deliveries",), version=SCHEMA_VERSION)

    async def open(self) -> None:
        await self.db.open()
        if self.db.name == "sqlite":
            # One replica owns a SQLite outbox: leases left by its crash are released at start.
            # Shared (PostgreSQL) outboxes wait for them to expire: another replica may hold them.
            await self.db.transaction(lambda c: c.execute("UPDATE deliveries SET lease_until = 0 WHERE state = ?",
                                                          (QUEUED,)))

    async def close(self) -> None:
        await self.db.close()

    async def enqueue(self, call_id: str, payload: dict, trace_context: dict[str, str],
                      requeue_failed: bool = False) -> tuple[DeliveryRow, bool]:
        """Store the record unless the call is already there; return the row and whether it was queued now.

        With ``requeue_failed``, a call whose delivery failed is queued again with this record: at the back of
        the queue, its attempts from zero, under the same idempotency key (the CRM never took it).

        A record of a higher ``revision`` (the call analysed again) replaces the one held, whatever became of it,
        at the back of the queue under a key of its own, so that a CRM that took the earlier one takes this one
        too; while the earlier one is being posted it raises :class:`RevisionInFlight` (ask again later)."""
        now = time.time()
        body, context = json.dumps(payload, ensure_ascii=False), json.dumps(trace_context)
        revision = int(payload.get("revision") or 1)

        def tx(c: Any) -> tuple[DeliveryRow, bool]:
            seq = c.execute(self.db.next_seq("deliveries")).fetchone()[0]
            cur = c.execute(
                "INSERT INTO deliveries (call_id, idempotency_key, payload, state, created_at, "
                "next_attempt_at, seq, trace_context) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (call_id) DO NOTHING",
                (call_id, idempotency_key(call_id, revision), body, QUEUED, now, now, seq, context),
            )
            queued = cur.rowcount == 1
            held = None if queued else c.execute(
                f"SELECT payload, lease_until FROM deliveries WHERE call_id = ?{self.db.for_update}", (call_id,)).fetchone()
            if held is not None and revision > int(json.loads(held["payload"]).get("revision") or 1):
                if held["lease_until"] > now:
                    raise RevisionInFlight(f"call {call_id}: its earlier record is being posted to the CRM")
                queued = c.execute(
                    "UPDATE deliveries SET idempotency_key = ?, payload = ?, state = ?, attempts = 0, last_error = '', "
                    "created_at = ?, delivered_at = NULL, next_attempt_at = ?, lease_until = 0, seq = ?, "
                    "trace_context = ? WHERE call_id = ?",
                    (idempotency_key(call_id, revision), body, QUEUED, now, now, seq, context, call_id)).rowcount == 1
            elif not queued and requeue_failed:
                queued = c.execute(
                    "UPDATE deliveries SET payload = ?, state = ?, attempts = 0, last_error = '', created_at = ?, "
                    "delivered_at = NULL, next_attempt_at = ?, lease_until = 0, seq = ?, trace_context = ? "
                    "WHERE call_id = ? AND state = ?", (body, QUEUED, now, now, seq, context, call_id, FAILED),
                ).rowcount == 1
            row = c.execute("SELECT * FROM deliveries WHERE call_id = ?", (call_id,)).fetchone()
            return DeliveryRow.from_row(row), queued

        return await self.db.transaction(tx)

    async def backlog(self) -> tuple[int, float | None]:
        """How many records wait for the CRM, and since when the oldest has waited."""
        row = await self.db.fetchone("SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE state = ?", (QUEUED,))
        return (row[0], row[1]) if row else (0, None)

    async def get(self, call_id: str) -> DeliveryRow | None:
        row = await self.db.fetchone("SELECT * FROM deliveries WHERE call_id = ?", (call_id,))
        return DeliveryRow.from_row(row) if row else None

    async def claim_due(self, limit: int, lease_seconds: float) -> list[DeliveryRow]:
        """Take up to ``limit`` queued deliveries in order of arrival, under a lease.

        Strictly FIFO: the run stops at the first record that is waiting for its retry, so nothing
        overtakes the oldest record while the CRM is down, and at the first record another
        replica holds, so replicas take turns with the head of the queue."""
        now = time.time()

        def tx(c: Any) -> list[DeliveryRow]:
            rows = c.execute(f"SELECT * FROM deliveries WHERE state = ? ORDER BY seq LIMIT ?{self.db.for_update}",
                             (QUEUED, limit)).fetchall()
            taken = []
            for r in rows:
                if r["next_attempt_at"] > now or r["lease_until"] >= now:
                    break
                c.execute("UPDATE deliveries SET lease_until = ? WHERE call_id = ?", (now + lease_seconds, r["call_id"]))
                taken.append(DeliveryRow.from_row(r))
            return taken

        return await self.db.transaction(tx)

    async def release(self, call_ids: list[str]) -> None:
        """Hand back claimed records without an attempt (they wait behind one that failed)."""
        await self.db.transaction(lambda c: c.executemany(
            "UPDATE deliveries SET lease_until = 0 WHERE call_id = ?", [(i,) for i in call_ids]))

    async def extend_lease(self, call_ids: list[str], lease_seconds: float) -> None:
        """Keep holding claimed records that are still to be posted."""
        until = time.time() + lease_seconds
        await self.db.transaction(lambda c: c.executemany(
            "UPDATE deliveries SET lease_until = ? WHERE call_id = ? AND state = ?",
            [(until, i, QUEUED) for i in call_ids]))

    async def next_due_at(self) -> float | None:
        """When the oldest queued record may be tried again (the queue waits on it, and on its lease)."""
        row = await self.db.fetchone(
            "SELECT CASE WHEN next_attempt_at > lease_until THEN next_attempt_at ELSE lease_until END "
            "FROM deliveries WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,))
        return row[0] if row else None

    async def set_aside(self, call_id: str, reason: str) -> tuple[DeliveryRow | None, str]:
        """Take a queued record out of the queue as failed, so the records behind it go on.

        Returns the row (None when the call is unknown) and what happened: ``SET_ASIDE``, ``NOT_QUEUED``
        (delivered or failed already: left as it is) or ``IN_FLIGHT`` (a POST of it holds its lease: the
        CRM may be taking it right now, so it is left queued)."""
        now = time.time()

        def tx(c: Any) -> tuple[DeliveryRow | None, str]:
            row = c.execute(f"SELECT * FROM deliveries WHERE call_id = ?{self.db.for_update}", (call_id,)).fetchone()
            if row is None:
                return None, NOT_QUEUED
            if row["state"] != QUEUED:
                return DeliveryRow.from_row(row), NOT_QUEUED
            if row["lease_until"] >= now:
                return DeliveryRow.from_row(row), IN_FLIGHT
            c.execute("UPDATE deliveries SET state = ?, last_error = ?, next_attempt_at = NULL, lease_until = 0 "
                      "WHERE call_id = ?", (FAILED, f"set aside: {reason}"[:1000], call_id))
            return DeliveryRow.from_row(c.execute("SELECT * FROM deliveries WHERE call_id = ?",
                                                  (call_id,)).fetchone()), SET_ASIDE

        return await self.db.transaction(tx)

    async def erase(self, call_id: str) -> tuple[DeliveryRow | None, str]:
        """Delete the call's record, whatever its state, unless a POST of it holds its lease (the CRM may be
        taking it right now). Returns the row as it was (None when the call is unknown) and ``ERASED`` or
        ``IN_FLIGHT``."""
        now = time.time()

        def tx(c: Any) -> tuple[DeliveryRow | None, str]:
            row = c.execute(f"SELECT * FROM deliveries WHERE call_id = ?{self.db.for_update}", (call_id,)).fetchone()
            if row is None:
                return None, ERASED
            if row["state"] == QUEUED and row["lease_until"] >= now:
                return DeliveryRow.from_row(row), IN_FLIGHT
            c.execute("DELETE FROM deliveries WHERE call_id = ?", (call_id,))
            return DeliveryRow.from_row(row), ERASED

        return await self.db.transaction(tx)

    async def mark_delivered(self, call_id: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE deliveries SET state = ?, attempts = attempts + 1, delivered_at = ?, last_error = '', "
            "next_attempt_at = NULL, lease_until = 0 WHERE call_id = ? AND state = ?",
            (DELIVERED, time.time(), call_id, QUEUED)))

    async def delete_delivered(self, delivered_before: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` records the CRM took before ``delivered_before`` (their retention is over), the
        oldest first; return how many. Queued and failed records stay."""
        return await self.db.transaction(lambda c: c.execute(
            "DELETE FROM deliveries WHERE call_id IN (SELECT call_id FROM deliveries WHERE state = ? AND "
            "delivered_at < ? ORDER BY delivered_at LIMIT ?)", (DELIVERED, delivered_before, limit)).rowcount)

    async def mark_retry(self, call_id: str, error: str, next_attempt_at: float) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, lease_until = 0 "
            "WHERE call_id = ? AND state = ?", (error[:1000], next_attempt_at, call_id, QUEUED)))

    async def mark_failed(self, call_id: str, error: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, next_attempt_at = NULL, "
            "lease_until = 0 WHERE call_id = ? AND state = ?", (FAILED, error[:1000], call_id, QUEUED)))
