"""The durable outbox: a record is stored before Deliver returns, and stays until the CRM has it."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.common.sqlite import AsyncSqlite

QUEUED, DELIVERED, FAILED = "queued", "delivered", "failed"
_KEY_NAMESPACE = uuid.UUID("6f1c4f3e-8a55-4e0b-9c1e-3d7f2b8a9c10")

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    call_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    delivered_at REAL,
    next_attempt_at REAL,
    lease_until REAL NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    trace_context TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_fifo ON deliveries (state, seq);
CREATE INDEX IF NOT EXISTS deliveries_seq ON deliveries (seq);
"""


def idempotency_key(call_id: str, version: int = 1) -> str:
    """Stable per call and result version: the CRM can drop repeats of the same record."""
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
    def from_row(cls, row: sqlite3.Row) -> "DeliveryRow":
        return cls(row["call_id"], row["idempotency_key"], json.loads(row["payload"]), row["state"], row["attempts"],
                   row["last_error"], row["created_at"], row["delivered_at"], row["next_attempt_at"],
                   json.loads(row["trace_context"]))


class Outbox:
    def __init__(self, path: Path) -> None:
        self.db = AsyncSqlite(path, SCHEMA)

    async def open(self) -> None:
        await self.db.open()
        # A crash may have left leases behind: they are released at start.
        await self.db.transaction(lambda c: c.execute("UPDATE deliveries SET lease_until = 0 WHERE state = ?", (QUEUED,)))

    async def close(self) -> None:
        await self.db.close()

    async def enqueue(self, call_id: str, payload: dict, trace_context: dict[str, str]) -> tuple[DeliveryRow, bool]:
        """Store the record unless the call is already there; return the row and whether it is new."""
        now = time.time()

        def tx(c: sqlite3.Connection) -> tuple[DeliveryRow, bool]:
            seq = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM deliveries").fetchone()[0]
            cur = c.execute(
                "INSERT OR IGNORE INTO deliveries (call_id, idempotency_key, payload, state, created_at, "
                "next_attempt_at, seq, trace_context) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (call_id, idempotency_key(call_id), json.dumps(payload, ensure_ascii=False), QUEUED, now, now, seq,
                 json.dumps(trace_context)),
            )
            row = c.execute("SELECT * FROM deliveries WHERE call_id = ?", (call_id,)).fetchone()
            return DeliveryRow.from_row(row), cur.rowcount == 1

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
        overtakes the oldest record while the CRM is down."""
        now = time.time()

        def tx(c: sqlite3.Connection) -> list[DeliveryRow]:
            rows = c.execute("SELECT * FROM deliveries WHERE state = ? AND lease_until < ? ORDER BY seq LIMIT ?",
                             (QUEUED, now, limit)).fetchall()
            taken = []
            for r in rows:
                if r["next_attempt_at"] > now:
                    break
                c.execute("UPDATE deliveries SET lease_until = ? WHERE call_id = ?", (now + lease_seconds, r["call_id"]))
                taken.append(DeliveryRow.from_row(r))
            return taken

        return await self.db.transaction(tx)

    async def release(self, call_ids: list[str]) -> None:
        """Hand back claimed records without an attempt (they wait behind one that failed)."""
        await self.db.transaction(lambda c: c.executemany(
            "UPDATE deliveries SET lease_until = 0 WHERE call_id = ?", [(i,) for i in call_ids]))

    async def next_due_at(self) -> float | None:
        """When the oldest queued record may be tried again (the queue waits on it)."""
        row = await self.db.fetchone(
            "SELECT next_attempt_at FROM deliveries WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,))
        return row[0] if row else None

    async def mark_delivered(self, call_id: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE deliveries SET state = ?, attempts = attempts + 1, delivered_at = ?, last_error = '', "
            "next_attempt_at = NULL, lease_until = 0 WHERE call_id = ?", (DELIVERED, time.time(), call_id)))

    async def mark_retry(self, call_id: str, error: str, next_attempt_at: float) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, lease_until = 0 "
            "WHERE call_id = ?", (error[:1000], next_attempt_at, call_id)))

    async def mark_failed(self, call_id: str, error: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, next_attempt_at = NULL, "
            "lease_until = 0 WHERE call_id = ?", (FAILED, error[:1000], call_id)))
