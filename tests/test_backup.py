"""``callmesh backup``: the job store and the CRM outbox of a one-machine install, copied while the services run.

The copy must hold what was committed, including what is still only in SQLite's write-ahead log (the services
keep their connection open, so nothing has been checkpointed), and must never half-overwrite an earlier backup.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from services.crm.outbox import Outbox
from services.ingest.store import JobOptions, JobStore
from tests.cli_mesh import CALLMESH, ROOT


def callmesh_backup(data: Path, destination: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "INGEST_DATABASE", "CRM_DATABASE")}
    return subprocess.run([*CALLMESH, "backup", str(destination)], env={**clean, "CALLMESH_DATA_DIR": str(data),
                          "COLUMNS": "200", **env}, cwd=ROOT, capture_output=True, text=True, timeout=60)


def rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


@pytest_asyncio.fixture
async def running_stores(tmp_path: Path) -> AsyncIterator[Path]:
    """The job store and the outbox as the running services hold them open, with calls in both."""
    data = tmp_path / "data"
    store, outbox = JobStore(data / "ingest.db"), Outbox(data / "crm-outbox.db")
    await store.open()
    await outbox.open()
    try:
        for n in range(3):
            await store.create(f"call-{n}", f"http://127.0.0.1:9/{n}.wav", JobOptions(), {}, "")
        await outbox.enqueue("call-0", {"call_id": "call-0", "summary": ["a", "b", "c"]}, {})
        yield data
    finally:
        await outbox.close()
        await store.close()


async def test_a_backup_taken_while_the_services_run_holds_every_committed_call(
        running_stores: Path, tmp_path: Path) -> None:
    assert (running_stores / "ingest.db-wal").stat().st_size > 0  # the calls are still in the write-ahead log
    result = callmesh_backup(running_stores, tmp_path / "backup")
    assert result.returncode == 0, result.stderr
    assert rows(tmp_path / "backup" / "ingest.db", "SELECT call_id FROM jobs ORDER BY call_id") == [
        ("call-0",), ("call-1",), ("call-2",)]
    assert rows(tmp_path / "backup" / "crm-outbox.db", "SELECT call_id, state FROM deliveries") == [
        ("call-0", "queued")]
    assert "3 jobs" in result.stdout and "1 deliveries" in result.stdout
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["crm-outbox.db", "ingest.db"]


async def test_a_backup_put_in_place_is_what_the_services_start_from(running_stores: Path, tmp_path: Path) -> None:
    assert callmesh_backup(running_stores, tmp_path / "backup").returncode == 0
    restored = JobStore(tmp_path / "backup" / "ingest.db")
    await restored.open()
    try:
        assert await restored.counts() == {"received": 3}
        job, new = await restored.create("call-3", "http://127.0.0.1:9/3.wav", JobOptions(), {}, "")
        assert new and job.call_id == "call-3"
    finally:
        await restored.close()
    outbox = Outbox(tmp_path / "backup" / "crm-outbox.db")
    await outbox.open()
    try:
        assert (await outbox.get("call-0")).state == "queued"
    finally:
        await outbox.close()


async def test_a_backup_never_overwrites_an_earlier_one(running_stores: Path, tmp_path: Path) -> None:
    earlier = tmp_path / "backup"
    earlier.mkdir()
    (earlier / "ingest.db").write_bytes(b"last night's backup")
    result = callmesh_backup(running_stores, earlier)
    assert result.returncode == 2 and "already there" in result.stderr
    assert (earlier / "ingest.db").read_bytes() == b"last night's backup"
    assert not (earlier / "crm-outbox.db").exists()


def test_with_postgresql_the_backup_points_to_pg_dump(tmp_path: Path) -> None:
    result = callmesh_backup(tmp_path, tmp_path / "backup", DATABASE_URL="postgresql://callmesh@db.example/callmesh")
    assert result.returncode == 2 and "pg_dump" in result.stderr
    assert not (tmp_path / "backup").exists()


def test_a_backup_where_there_is_no_store_says_where_it_looked(tmp_path: Path) -> None:
    result = callmesh_backup(tmp_path / "empty", tmp_path / "backup")
    assert result.returncode == 2 and "ingest.db" in result.stderr and "CALLMESH_DATA_DIR" in result.stderr
