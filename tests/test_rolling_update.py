"""A rolling update across a change of the stores' tables: a replica still running when a newer Callmesh has
upgraded them stops, as it would have been refused at start, instead of writing rows the newer one does not
expect (rows without the index the newer version keeps, say). It drains like on SIGTERM and exits with status 3."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.crm.outbox import SCHEMA_VERSION as OUTBOX_VERSION
from services.ingest.store import SCHEMA_VERSION as JOBS_VERSION
from tests.ingest_harness import SECRET

ROOT = Path(__file__).resolve().parents[1]

SERVICES = {  # service: (its environment, its SQLite file, its tables)
    "ingest": ({"INGEST_PORT": "0", "INGEST_METRICS_LISTEN": "", "WEBHOOK_SECRETS": SECRET,
                "TRANSCRIBE_ADDR": "127.0.0.1:9", "ANALYZE_ADDR": "127.0.0.1:9", "CRM_SYNC_ADDR": "127.0.0.1:9"},
               "ingest.db", JOBS_VERSION),
    "crm": ({"CRM_SYNC_LISTEN": "127.0.0.1:0", "CRM_SYNC_METRICS_LISTEN": "off"}, "crm-outbox.db", OUTBOX_VERSION),
}


@pytest.mark.parametrize("service", SERVICES)
def test_a_replica_stops_once_a_newer_callmesh_has_upgraded_its_tables(tmp_path: Path, service: str) -> None:
    env, database, version = SERVICES[service]
    ready = tmp_path / f"{service}.ready"
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "DATABASE_URL"))}, **env,
            "CALLMESH_DATA_DIR": str(tmp_path), "CALLMESH_READY_FILE": str(ready), "SCHEMA_CHECK_SECONDS": "0.2",
            "SHUTDOWN_GRACE_SECONDS": "1"}
    log = tmp_path / f"{service}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", f"services.{service}"], env=full, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "not ready"
        time.sleep(0.5)  # looks at tables of its own version, and goes on
        assert process.poll() is None
        with sqlite3.connect(tmp_path / database) as db:  # what a newer release's open does
            db.execute("UPDATE callmesh_schema SET version = ? WHERE store = ?", (version.version + 1, version.store))
        returncode = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        stderr = log.read_text()
    assert returncode == 3, stderr[-3000:]
    assert f"{version.store} tables were upgraded to version {version.version + 1} by a newer Callmesh" in stderr
    assert f"{service} stopped" in stderr  # drained first, as on SIGTERM
