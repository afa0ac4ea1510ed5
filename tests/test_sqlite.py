"""The embedded SQLite helper: group commit shares fsyncs without mixing up writers' outcomes."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from services.common.sqlite import AsyncSqlite

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL);"


async def test_concurrent_writers_share_commits_and_all_land(tmp_path: Path, monkeypatch) -> None:
    db = AsyncSqlite(tmp_path / "g.db", SCHEMA)
    await db.open()
    commits = 0
    real = db.transaction

    async def counting(fn):
        nonlocal commits
        commits += 1
        return await real(fn)

    monkeypatch.setattr(db, "transaction", counting)
    results = await asyncio.gather(*(db.grouped(lambda c, i=i: c.execute(
        "INSERT INTO t VALUES (?, ?)", (i, f"v{i}")).rowcount) for i in range(200)))
    assert results == [1] * 200
    assert commits < 20  # writers that arrived during a commit went into the next one together
    assert (await db.fetchone("SELECT COUNT(*) FROM t"))[0] == 200
    await db.close()


async def test_a_failing_writer_is_undone_alone(tmp_path: Path) -> None:
    db = AsyncSqlite(tmp_path / "g.db", SCHEMA)
    await db.open()

    def insert(k: int):
        return lambda c: c.execute("INSERT INTO t VALUES (?, 'x')", (k,)).rowcount

    def half_then_fail(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (100, 'half')")
        c.execute("INSERT INTO t VALUES (1, 'duplicate key')")  # raises IntegrityError

    outcomes = await asyncio.gather(db.grouped(insert(1)), db.grouped(half_then_fail), db.grouped(insert(2)),
                                    return_exceptions=True)
    assert outcomes[0] == 1 and outcomes[2] == 1
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    rows = await db.fetchall("SELECT k FROM t ORDER BY k")
    assert [r[0] for r in rows] == [1, 2]  # nothing of the failed writer, not even its first insert
    await db.close()


async def test_grouped_writes_survive_reopening(tmp_path: Path) -> None:
    db = AsyncSqlite(tmp_path / "g.db", SCHEMA)
    await db.open()
    await asyncio.gather(*(db.grouped(lambda c, i=i: c.execute("INSERT INTO t VALUES (?, 'x')", (i,)))
                           for i in range(10)))
    await db.close()
    again = AsyncSqlite(tmp_path / "g.db", SCHEMA)
    await again.open()
    assert (await again.fetchone("SELECT COUNT(*) FROM t"))[0] == 10
    await again.close()

