"""The job store, on both engines: the same behaviour on embedded SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.ingest.store import (
    ANALYZING, DELIVERING, DONE, DOWNLOADING, FAILED, RECEIVED, SCHEMA_VERSION, TRANSCRIBING, JobOptions, JobStore,
)
from services.common.config import ConfigError
from services.common.database import connect, watch_schema_version
from services.common.schema_version import NewerTables, SchemaVersion
from services.crm.outbox import Outbox


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    location = tmp_path / "ingest.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = JobStore(location)
    await s.open()
    yield s
    await s.close()


async def test_a_call_further_along_is_claimed_before_new_arrivals(store: JobStore) -> None:
    for i in range(4):
        await store.create(f"call-{i}", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    assert [j.call_id for j in await store.claim("w", 4, 60)] == ["call-0", "call-1", "call-2", "call-3"]
    await store.update("call-3", "w", state=DELIVERING, release=True)  # waits for its CRM confirmation
    await store.update("call-2", "w", state=DOWNLOADING, release=True)
    for call_id in ("call-0", "call-1"):
        await store.update(call_id, "w", release=True)
    assert [j.call_id for j in await store.claim("w", 4, 60)] == ["call-3", "call-2", "call-0", "call-1"]


async def test_a_call_id_is_stored_once_whatever_the_engine(store: JobStore) -> None:
    _, new = await store.create("call-1", "http://127.0.0.1:9/a.wav", JobOptions(language="es"), {}, "")
    again, new_again = await store.create("call-1", "http://127.0.0.1:9/b.wav", JobOptions(), {}, "")
    assert (new, new_again) == (True, False)
    assert again.recording_url.endswith("/a.wav") and again.options.language == "es"


async def test_a_claim_takes_only_the_stages_it_names(store: JobStore) -> None:
    for i in range(3):
        await store.create(f"call-{i}", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    await store.claim("w", 3, 60)
    await store.update("call-1", "w", state=ANALYZING, release=True)  # transcribed, waits for an analysis slot
    await store.update("call-2", "w", release=True)
    assert [j.call_id for j in await store.claim("w", 3, 60, (ANALYZING, DELIVERING))] == ["call-1"]
    assert [j.call_id for j in await store.claim("w", 3, 60, (RECEIVED, DOWNLOADING))] == ["call-2"]


async def test_next_due_counts_only_the_stages_it_names(store: JobStore) -> None:
    await store.create("call-0", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    assert await store.next_due_at((ANALYZING, DELIVERING)) is None
    assert await store.next_due_at((RECEIVED,)) is not None


async def test_the_recordings_in_use_are_those_of_calls_not_done(store: JobStore) -> None:
    for call_id, state in (("working", TRANSCRIBING), ("failed", FAILED), ("done", DONE), ("queued", RECEIVED)):
        await store.create(call_id, "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
        if state != RECEIVED:
            await store.update(call_id, None, state=state, recording_path=f"/data/recordings/{call_id}.audio")
    assert await store.recordings_in_use() == {"working.audio", "failed.audio"}


async def test_only_calls_failed_before_the_cutoff_let_go_of_their_recordings(store: JobStore) -> None:
    for call_id, state in (("failed-early", FAILED), ("working", TRANSCRIBING)):
        await store.create(call_id, "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
        await store.update(call_id, None, state=state, recording_path=f"/data/recordings/{call_id}.audio")
    cutoff = time.time()
    await store.create("failed-late", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    await store.update("failed-late", None, state=FAILED, recording_path="/data/recordings/failed-late.audio")
    assert await store.release_failed_recordings(cutoff) == [("failed-early", "/data/recordings/failed-early.audio")]
    assert await store.recordings_in_use() == {"working.audio", "failed-late.audio"}
    assert await store.release_failed_recordings(cutoff) == []


async def test_only_calls_done_before_the_cutoff_are_deleted_oldest_first(store: JobStore) -> None:
    for call_id, state in (("done-1", DONE), ("done-2", DONE), ("done-3", DONE), ("failed", FAILED),
                           ("working", ANALYZING)):
        await store.create(call_id, "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
        await store.update(call_id, None, state=state)
    cutoff = time.time()
    await store.create("done-late", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    await store.update("done-late", None, state=DONE)
    assert await store.delete_done(cutoff, limit=2) == 2
    assert await store.get("done-1") is None and await store.get("done-2") is None
    assert await store.delete_done(cutoff, limit=2) == 1
    assert await store.delete_done(cutoff, limit=2) == 0
    assert {call_id for call_id in ("failed", "working", "done-late") if await store.get(call_id)} == {
        "failed", "working", "done-late"}


async def test_only_a_done_or_failed_call_is_erased(store: JobStore) -> None:
    for call_id, state in (("done", DONE), ("failed", FAILED), ("working", DELIVERING)):
        await store.create(call_id, "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
        await store.update(call_id, None, state=state)
    erased = [await store.erase_finished(call_id) for call_id in ("done", "failed", "working", "unknown")]
    assert [job.state if job else None for job in erased] == [DONE, FAILED, None, None]
    assert [await store.get(c) is None for c in ("done", "failed", "working")] == [True, True, False]


async def test_erasing_a_call_forgets_the_webhook_ids_that_named_it(store: JobStore) -> None:
    for call_id, webhook_id in (("erased", "msg_erased"), ("kept", "msg_kept")):
        await store.create(call_id, "http://127.0.0.1:9/a.wav", JobOptions(), {}, "", webhook_id)
        await store.update(call_id, None, state=DONE)
    await store.erase_finished("erased")
    remembered = await store.db.fetchall("SELECT webhook_id, call_id FROM webhook_ids ORDER BY webhook_id")
    assert [tuple(row) for row in remembered] == [("msg_kept", "kept")]


NEW_LINK = "http://127.0.0.1:9/a.wav?X-Amz-Signature=fresh"


async def test_a_new_link_is_taken_only_while_the_call_has_no_recording(store: JobStore) -> None:
    cases = {  # call: (state, error_stage, recording_path)
        "queued": (RECEIVED, None, None), "retrying": (DOWNLOADING, None, None),
        "failed-download": (FAILED, DOWNLOADING, None), "downloaded": (TRANSCRIBING, None, "/r/downloaded.audio"),
        "failed-later-let-go": (FAILED, TRANSCRIBING, None), "failed-later-kept": (FAILED, ANALYZING, "/r/kept.audio"),
        "done": (DONE, None, None)}
    for call_id, (state, error_stage, path) in cases.items():
        await store.create(call_id, "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
        await store.update(call_id, None, state=state, error_stage=error_stage, recording_path=path)
    relinked = {call_id: await store.relink(call_id, NEW_LINK, JobOptions()) for call_id in [*cases, "unknown"]}
    assert {c for c, job in relinked.items() if job is not None} == {"queued", "retrying", "failed-download",
                                                                      "failed-later-let-go"}
    assert (await store.get("downloaded")).recording_url == "http://127.0.0.1:9/a.wav"
    assert (await store.get("failed-later-kept")).recording_url == "http://127.0.0.1:9/a.wav"
    assert (await store.get("queued")).recording_url == NEW_LINK


async def test_a_call_that_failed_at_its_download_goes_back_to_it_with_a_new_link(store: JobStore) -> None:
    await store.create("call-1", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    await store.update("call-1", None, state=FAILED, error="download: HTTP 403", error_stage=DOWNLOADING, attempts=1)
    job = await store.relink("call-1", NEW_LINK, JobOptions(language="es"))
    assert job is not None
    assert (job.state, job.error, job.error_stage, job.attempts) == (DOWNLOADING, None, None, 0)
    assert job.options.language == "es"
    assert [j.call_id for j in await store.claim("w", 4, 60)] == ["call-1"]


async def test_a_call_failed_past_its_download_whose_recording_was_let_go_keeps_a_new_link_and_stays_failed(
        store: JobStore) -> None:
    await store.create("call-1", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    await store.update("call-1", None, state=FAILED, error="transcribe: not audio", error_stage=TRANSCRIBING,
                       recording_path="/r/call-1.audio", attempts=2)
    await store.release_failed_recordings(time.time() + 1)  # its retention is over
    job = await store.relink("call-1", NEW_LINK, JobOptions())
    assert job is not None and job.recording_url == NEW_LINK
    assert (job.state, job.error_stage, job.error, job.attempts) == (FAILED, TRANSCRIBING, "transcribe: not audio", 2)
    assert await store.claim("w", 4, 60) == []


async def test_a_new_link_for_a_call_being_downloaded_leaves_the_download_its_lease(store: JobStore) -> None:
    await store.create("call-1", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    [claimed] = await store.claim("w", 1, 60)
    await store.update("call-1", "w", state=DOWNLOADING)
    job = await store.relink("call-1", NEW_LINK, JobOptions(), "msg_2")
    assert job is not None and job.recording_url == NEW_LINK
    assert job.lease_owner == "w" and await store.claim("other", 1, 60) == []
    again, new = await store.create("call-1", "http://127.0.0.1:9/old.wav", JobOptions(), {}, "", "msg_2")
    assert not new and again.recording_url == NEW_LINK  # the relinking webhook, sent again, is known


async def test_a_new_store_records_the_version_of_its_tables(store: JobStore) -> None:
    row = await store.db.fetchone("SELECT version FROM callmesh_schema WHERE store = ?", ("ingest.jobs",))
    assert row["version"] == SCHEMA_VERSION.version


@pytest.mark.parametrize(("written_by", "reason"), [(SCHEMA_VERSION.version + 1, "written by a newer Callmesh"),
                                                    (0, "no upgrade known")])
async def test_a_store_of_another_version_is_refused_at_open_and_left_as_it_is(
        store: JobStore, written_by: int, reason: str) -> None:
    await store.create("call-1", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    await store.db.transaction(lambda c: c.execute("UPDATE callmesh_schema SET version = ? WHERE store = ?",
                                                   (written_by, "ingest.jobs")))
    location = store.db.url if store.db.name == "postgresql" else store.db.path
    again = JobStore(location)
    with pytest.raises(ConfigError, match=reason):
        await again.open()
    await again.close()
    assert await store.get("call-1") is not None
    row = await store.db.fetchone("SELECT version FROM callmesh_schema WHERE store = ?", ("ingest.jobs",))
    assert row["version"] == written_by


async def test_a_running_store_stops_its_service_once_a_newer_callmesh_upgrades_its_tables(store: JobStore) -> None:
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_schema_version(store.db, SCHEMA_VERSION, stop, interval=0.05))
    await asyncio.sleep(0.3)  # six looks at tables of its own version
    assert not watcher.done() and not stop.is_set()
    await store.db.transaction(lambda c: c.execute("UPDATE callmesh_schema SET version = ? WHERE store = ?",
                                                   (SCHEMA_VERSION.version + 1, "ingest.jobs")))
    newer = await asyncio.wait_for(watcher, 5)
    assert stop.is_set() and isinstance(newer, NewerTables)
    assert f"upgraded to version {SCHEMA_VERSION.version + 1} by a newer Callmesh" in str(newer)


async def test_a_store_watched_until_its_service_stops_reports_nothing(store: JobStore) -> None:
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_schema_version(store.db, SCHEMA_VERSION, stop, interval=30))
    stop.set()  # SIGTERM
    assert await asyncio.wait_for(watcher, 1) is None


async def test_the_job_store_and_the_outbox_keep_their_own_versions_in_one_database(store: JobStore) -> None:
    outbox = Outbox(store.db.url if store.db.name == "postgresql" else store.db.path)
    await outbox.open()
    await outbox.close()
    rows = await store.db.fetchall("SELECT store, version FROM callmesh_schema ORDER BY store")
    assert [(r["store"], r["version"]) for r in rows] == [("crm.outbox", 1), ("ingest.jobs", SCHEMA_VERSION.version)]


async def test_calls_are_found_by_a_value_of_the_recorders_metadata(store: JobStore) -> None:
    callers = {"c-1": "+34 600 123 456", "c-2": "+34 600 999 999", "c-3": "+34 600 123 456"}
    for call_id, number in callers.items():
        await store.create(call_id, "http://127.0.0.1:9/a.wav", JobOptions(metadata={"customer.number": number}),
                           {}, "")
    await store.create("c-4", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")  # no metadata at all
    await store.update("c-3", None, state=DONE)
    found = await store.list(metadata=("customer.number", "+34 600 123 456"))
    assert [j.call_id for j in found] == ["c-3", "c-1"]  # newest first
    assert [j.call_id for j in await store.list(DONE, metadata=("customer.number", "+34 600 123 456"))] == ["c-3"]
    assert await store.list(metadata=("customer.number", "+34 600")) == []  # the whole value, not a part
    assert await store.list(metadata=("agent", "+34 600 123 456")) == []


def location_of(store: JobStore) -> str | Path:
    return store.db.url if store.db.name == "postgresql" else store.db.path


async def test_a_store_of_version_1_is_upgraded_at_open_and_its_calls_found_by_their_metadata(
        store: JobStore) -> None:
    await store.create("kept-1", "http://127.0.0.1:9/a.wav", JobOptions(metadata={"ani": "+34600123456"}), {}, "")
    await store.create("kept-2", "http://127.0.0.1:9/a.wav", JobOptions(), {}, "")
    await store.update("kept-1", None, state=DONE)

    def as_version_1(c: Any) -> None:  # the tables as version 1 left them: no call_metadata
        c.execute("DROP TABLE call_metadata")
        c.execute("UPDATE callmesh_schema SET version = 1 WHERE store = 'ingest.jobs'")

    await store.db.transaction(as_version_1)
    upgraded = JobStore(location_of(store))
    await upgraded.open()
    try:
        row = await upgraded.db.fetchone("SELECT version FROM callmesh_schema WHERE store = ?", ("ingest.jobs",))
        assert row["version"] == SCHEMA_VERSION.version == 2
        assert [j.call_id for j in await upgraded.list(metadata=("ani", "+34600123456"))] == ["kept-1"]
        assert [j.call_id for j in await upgraded.list(DONE, metadata=("ani", "+34600123456"))] == ["kept-1"]
    finally:
        await upgraded.close()


async def test_a_calls_metadata_rows_go_with_the_call(store: JobStore) -> None:
    for call_id in ("erased", "past-retention", "kept"):
        await store.create(call_id, "http://127.0.0.1:9/a.wav", JobOptions(metadata={"ani": "+1", "queue": "q"}),
                           {}, "")
        await store.update(call_id, None, state=DONE)
    assert await store.erase_finished("erased") is not None
    await asyncio.sleep(0.01)
    await store.update("kept", None, state=DONE)  # done later than "past-retention"
    kept = await store.get("kept")
    assert kept is not None and await store.delete_done(kept.updated_at) == 1  # "past-retention"
    rows = await store.db.fetchall("SELECT DISTINCT call_id FROM call_metadata")
    assert [r["call_id"] for r in rows] == ["kept"]


async def test_a_new_link_with_other_metadata_is_found_by_that_metadata(store: JobStore) -> None:
    await store.create("relinked", "http://127.0.0.1:9/a.wav", JobOptions(metadata={"ani": "+1"}), {}, "")
    assert await store.relink("relinked", NEW_LINK, JobOptions(metadata={"ani": "+2"})) is not None
    assert await store.list(metadata=("ani", "+1")) == []
    assert [j.call_id for j in await store.list(metadata=("ani", "+2"))] == ["relinked"]


async def test_a_metadata_value_too_long_for_an_index_is_found(store: JobStore) -> None:
    long_value = "\N{TELEPHONE RECEIVER}" * 1024  # the longest value a webhook may send, 3 KB of UTF-8
    await store.create("long", "http://127.0.0.1:9/a.wav", JobOptions(metadata={"note": long_value}), {}, "")
    assert [j.call_id for j in await store.list(metadata=("note", long_value))] == ["long"]


NOTES_V1 = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)"
NOTES_V2 = NOTES_V1 + "; CREATE TABLE IF NOT EXISTS note_words (word TEXT NOT NULL, id INTEGER NOT NULL)"


@pytest.fixture(params=["sqlite", "postgresql"])
def notes_location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    return tmp_path / "notes.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")


async def test_an_upgrade_that_fails_leaves_the_tables_as_they_were(notes_location: str | Path) -> None:
    old = connect(notes_location, NOTES_V1, version=SchemaVersion("test.notes", 1))
    await old.open()
    await old.transaction(lambda c: c.execute("INSERT INTO notes (id, text) VALUES (1, 'call me back')"))
    await old.close()

    def split_into_words(c: Any) -> None:
        for row in c.execute("SELECT id, text FROM notes").fetchall():
            c.executemany("INSERT INTO note_words (word, id) VALUES (?, ?)",
                          [(word, row["id"]) for word in row["text"].split()])
        raise RuntimeError("the disk filled during the upgrade")

    failing = connect(notes_location, NOTES_V2, version=SchemaVersion("test.notes", 2, upgrades={1: split_into_words}))
    with pytest.raises(RuntimeError, match="disk filled"):
        await failing.open()
    await failing.close()

    # The release before still opens them.
    again = connect(notes_location, NOTES_V1, version=SchemaVersion("test.notes", 1))
    await again.open()
    try:
        version = await again.fetchone("SELECT version FROM callmesh_schema WHERE store = ?", ("test.notes",))
        assert version["version"] == 1
        notes = await again.fetchone("SELECT COUNT(*) AS n FROM notes")
        assert notes["n"] == 1
        with pytest.raises(Exception, match="note_words"):  # not created: the upgrade's transaction held it
            await again.fetchone("SELECT COUNT(*) FROM note_words")
    finally:
        await again.close()
