"""A full disk loses no call.

The job store: the webhook answers 503 with Retry-After, and the call is taken when room is back. Its SQLite
database is given no room to grow with ``PRAGMA max_page_count`` at its current size: SQLite then fails each write
that needs another page with SQLITE_FULL, "database or disk is full", the error a full disk gives it.

The recordings: a download leaves RECORDING_MIN_FREE_BYTES free on their disk, or the call waits for room
without using up its attempts. The reserve is set against the real free space of the test's disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import shutil
import sqlite3
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web

from callcenter.v1 import crm_pb2
from callmesh.standins import CrmReceiver, signed_headers
from services.common.lifecycle import start_site
from services.common.sqlite import AsyncSqlite
from services.crm.outbox import Outbox
from services.ingest.downloader import DownloadError, write_recording
from services.ingest.store import JobStore
from tests.crm_harness import analysed_call, crm_service, record, wait_delivery
from tests.ingest_harness import SECRET, Ingest, post, running_ingest, wait_for, wait_for_state

CALLS = 200  # webhooks sent, at most, to fill the last pages of a fresh store


BIG = 64 * 1024 * 1024


def wav_header(data_bytes: int) -> bytes:
    """The 44-byte header of a 16-kHz mono WAV with ``data_bytes`` of samples."""
    audio = io.BytesIO()
    with wave.open(audio, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"")
    header = bytearray(audio.getvalue())
    header[4:8], header[40:44] = (36 + data_bytes).to_bytes(4, "little"), data_bytes.to_bytes(4, "little")
    return bytes(header)


@dataclasses.dataclass
class RecorderStandIn:
    url: str  # the base URL; the recordings are below
    gate: asyncio.Event  # /held answers once it is set


@pytest.fixture
async def recorder_stand_in() -> AsyncIterator[RecorderStandIn]:
    """A recorder over HTTP on loopback. ``/small``: a second of silence; ``/held``: the same, once the test
    sets the gate; ``/sized``: 64 MiB announced in Content-Length; ``/streamed``: 64 MiB sent chunked, its
    length unknown until the end."""
    gate = asyncio.Event()

    async def small(request: web.Request) -> web.Response:
        if request.path == "/held":
            await gate.wait()
        return web.Response(body=wav_header(32000) + bytes(32000), content_type="audio/wav")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        if request.path == "/sized":
            response.content_length = BIG
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(wav_header(BIG - 44))
        block = bytes(1024 * 1024)
        sent = 44
        with contextlib.suppress(ConnectionError):
            while sent < BIG:
                await response.write(block[: BIG - sent])
                sent += min(len(block), BIG - sent)
            await response.write_eof()
        return response

    app = web.Application()
    for path, handler in (("/small", small), ("/held", small), ("/sized", big), ("/streamed", big)):
        app.router.add_get(path, handler)
    runner, port = await start_site(app, "127.0.0.1", 0, access_log=None)
    try:
        yield RecorderStandIn(f"http://127.0.0.1:{port}", gate)
    finally:
        gate.set()
        await runner.cleanup()


async def no_room(store: JobStore | Outbox) -> None:
    """The store's database may not grow past the pages it has now."""
    await store.db.transaction(lambda c: c.execute(
        f"PRAGMA max_page_count = {c.execute('PRAGMA page_count').fetchone()[0]}"))


async def room_again(store: JobStore) -> None:
    await store.db.transaction(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))


def webhook(call_id: str) -> str:
    return json.dumps({"call_id": call_id, "recording_url": f"http://127.0.0.1:9/{call_id}.wav"})


async def first_refusal(ingest: Ingest) -> tuple[str, int, dict, list[str]]:
    """Send webhooks to a store with no room until one is refused; the refused call, its answer, and the calls
    taken before it (the pages' free space)."""
    taken = []
    for n in range(CALLS):
        call_id = f"full-{n}"
        status, body = await post(ingest.url, webhook(call_id))
        if status != 202:
            return call_id, status, body, taken
        taken.append(call_id)
    raise AssertionError(f"{CALLS} webhooks all fitted in the store's pages")


async def test_a_webhook_the_full_store_cannot_take_answers_503_with_retry_after(ingest: Ingest) -> None:
    await no_room(ingest.store)
    call_id, status, body, _ = await first_refusal(ingest)
    assert status == 503, body
    assert body["title"] == "Service Unavailable"
    assert "database or disk is full" in body["detail"] and "send the webhook again" in body["detail"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{ingest.url}/v1/calls", data=webhook(call_id).encode(), headers={
                "Content-Type": "application/json", **signed_headers(SECRET, webhook(call_id).encode())}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
            assert resp.content_type == "application/problem+json"
    assert await ingest.store.get(call_id) is None


async def test_the_refused_call_is_taken_once_the_store_has_room_again(ingest: Ingest) -> None:
    await no_room(ingest.store)
    call_id, status, _, taken = await first_refusal(ingest)
    assert status == 503
    await room_again(ingest.store)
    status, body = await post(ingest.url, webhook(call_id))  # the recorder sends it again
    assert status == 202 and body["duplicate"] is False
    assert (await ingest.store.get(call_id)) is not None
    for earlier in taken:  # and the calls taken before the disk filled are all there
        assert (await ingest.store.get(earlier)) is not None


async def test_the_status_of_known_calls_still_reads_while_the_store_is_full(ingest: Ingest) -> None:
    status, _ = await post(ingest.url, webhook("before"))
    assert status == 202
    await no_room(ingest.store)
    await first_refusal(ingest)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{ingest.url}/v1/calls/before") as resp:
            assert resp.status == 200 and (await resp.json())["call_id"] == "before"


async def test_webhooks_committed_together_are_each_refused_with_503(ingest: Ingest) -> None:
    await no_room(ingest.store)
    await first_refusal(ingest)
    answers = await asyncio.gather(*(post(ingest.url, webhook(f"burst-{n}")) for n in range(20)))
    assert [status for status, _ in answers] == [503] * 20
    assert all("database or disk is full" in body["detail"] for _, body in answers)


async def test_the_store_works_again_after_a_write_that_found_the_disk_full(tmp_path) -> None:
    db = AsyncSqlite(tmp_path / "t.db", "CREATE TABLE IF NOT EXISTS t (x TEXT);")
    await db.open()
    try:
        await db.transaction(lambda c: c.execute(
            f"PRAGMA max_page_count = {c.execute('PRAGMA page_count').fetchone()[0]}"))
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            for _ in range(100):
                await db.transaction(lambda c: c.execute("INSERT INTO t VALUES (?)", ("x" * 3000,)))
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            await asyncio.gather(*(db.grouped(lambda c: c.execute("INSERT INTO t VALUES (?)", ("y" * 3000,)))
                                   for _ in range(5)))
        await db.transaction(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        await db.grouped(lambda c: c.execute("INSERT INTO t VALUES ('after')"))
        assert (await db.fetchone("SELECT COUNT(*) FROM t WHERE x = 'after'"))[0] == 1
        assert (await db.fetchone("SELECT COUNT(*) FROM t WHERE x LIKE 'y%'"))[0] == 0
    finally:
        await db.close()


async def writes_refused(store: JobStore, refused: bool) -> None:
    """Every write to the store's database fails ("attempt to write a readonly database"), as on a disk the
    system has made read-only, until ``refused`` is False again."""
    await store.db.fetchall(f"PRAGMA query_only = {int(refused)}")


async def test_a_call_whose_progress_the_store_could_not_record_is_taken_up_again(
        tmp_path: Path, recorder_stand_in: RecorderStandIn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "services.ingest.pipeline")
    async with running_ingest(tmp_path, lease_seconds=1.0) as ingest:
        status, _ = await post(ingest.url, json.dumps({"call_id": "held",
                                                       "recording_url": f"{recorder_stand_in.url}/held"}))
        assert status == 202
        await wait_for_state(ingest.url, "held", {"downloading"})
        await writes_refused(ingest.store, True)
        recorder_stand_in.gate.set()  # the download ends; the store cannot record it
        for _ in range(100):
            failed = [r.getMessage() for r in caplog.records if "the job store failed at stage" in r.getMessage()]
            if failed:
                break
            await asyncio.sleep(0.1)
        assert failed and "downloading" in failed[0] and "taken up again" in failed[0]
        await writes_refused(ingest.store, False)
        # Its lease runs out, it is downloaded again and goes on (to a transcriber that is not there).
        status = await wait_for_state(ingest.url, "held", {"transcribing"}, timeout=20)
        assert status["error"] is None or status["error"]["stage"] == "transcribing"


# -- the recordings' disk: a download leaves RECORDING_MIN_FREE_BYTES free, or waits for room --

def recordings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "recordings").iterdir())


async def test_a_download_waits_without_using_up_attempts_while_the_disk_is_under_its_reserve(
        tmp_path: Path, recorder_stand_in: RecorderStandIn) -> None:
    reserve = shutil.disk_usage(tmp_path).free + 2**40  # a terabyte more than there is
    async with running_ingest(tmp_path, min_free_bytes=reserve) as ingest:
        status, _ = await post(ingest.url, json.dumps({"call_id": "roomless",
                                                       "recording_url": f"{recorder_stand_in.url}/small"}))
        assert status == 202
        waiting = await wait_for(ingest.url, "roomless", lambda s: s["error"] is not None)
        assert waiting["error"]["stage"] == "downloading"
        assert "no room for the recording" in waiting["error"]["message"]
        assert "RECORDING_MIN_FREE_BYTES" in waiting["error"]["message"]
        await asyncio.sleep(1.0)  # two attempts at most, 0.1 s apart: a failure would have ended the call by now
        status = await wait_for(ingest.url, "roomless", lambda s: True)
        assert status["status"] == "downloading" and status["attempts"] > 2
        # Room is made.
        ingest.worker.downloader.settings = dataclasses.replace(ingest.worker.downloader.settings, min_free_bytes=0)
        await wait_for_state(ingest.url, "roomless", {"transcribing"})


@pytest.mark.parametrize("path, spare, refusal", [
    ("sized", 16, "the recording's 67 MB would leave"),  # refused by its Content-Length, before a byte is written
    ("streamed", 8, "no room for the recording: there are"),  # its length unknown: stopped once it crosses
], ids=["announced-length", "streamed"])
async def test_a_recording_that_would_cross_the_reserve_is_not_kept(
        tmp_path: Path, recorder_stand_in: RecorderStandIn, path: str, spare: int, refusal: str) -> None:
    reserve = shutil.disk_usage(tmp_path).free - spare * 1024 * 1024  # a few MiB to spare, for 64 MiB
    async with running_ingest(tmp_path, min_free_bytes=reserve, max_bytes=2 * BIG) as ingest:
        await post(ingest.url, json.dumps({"call_id": path, "recording_url": f"{recorder_stand_in.url}/{path}"}))
        waiting = await wait_for(ingest.url, path, lambda s: s["error"] is not None)
        assert waiting["status"] == "downloading"
        assert refusal in waiting["error"]["message"]
    # Once ingest has stopped (a retry may be streaming its own partial file until then): nothing written, or
    # every attempt's partial file deleted.
    assert recordings(tmp_path) == []


async def test_a_download_waits_while_the_recordings_take_what_recording_dir_max_bytes_allows(
        tmp_path: Path, recorder_stand_in: RecorderStandIn) -> None:
    kept = tmp_path / "recordings" / "kept.audio"  # another call's recording, 20 KB
    kept.parent.mkdir(parents=True)
    kept.write_bytes(wav_header(20_000) + bytes(20_000))
    async with running_ingest(tmp_path, max_dir_bytes=50_000) as ingest:  # 20 KB + 32 KB would be over
        await post(ingest.url, json.dumps({"call_id": "capped", "recording_url": f"{recorder_stand_in.url}/small"}))
        waiting = await wait_for(ingest.url, "capped", lambda s: s["error"] is not None)
        assert waiting["status"] == "downloading"
        assert "would take more than the 50 KB RECORDING_DIR_MAX_BYTES allows (20 KB now)" in waiting["error"]["message"]
        kept.unlink()  # that call is done, its recording deleted
        await wait_for_state(ingest.url, "capped", {"transcribing"})


async def test_a_recording_larger_than_recording_dir_max_bytes_fails_at_once(
        tmp_path: Path, recorder_stand_in: RecorderStandIn) -> None:
    async with running_ingest(tmp_path, max_dir_bytes=16_000) as ingest:
        await post(ingest.url, json.dumps({"call_id": "too-big", "recording_url": f"{recorder_stand_in.url}/small"}))
        failed = await wait_for_state(ingest.url, "too-big", {"failed"})
    assert "more than all recordings may take together" in failed["error"]["message"]
    assert failed["attempts"] == 1


async def test_a_streamed_recording_that_goes_past_recording_dir_max_bytes_is_stopped_and_deleted(
        tmp_path: Path, recorder_stand_in: RecorderStandIn) -> None:
    async with running_ingest(tmp_path, max_dir_bytes=8 * 1024 * 1024, max_bytes=2 * BIG) as ingest:
        await post(ingest.url, json.dumps({"call_id": "past-cap", "recording_url": f"{recorder_stand_in.url}/streamed"}))
        waiting = await wait_for(ingest.url, "past-cap", lambda s: s["error"] is not None)
        assert waiting["status"] == "downloading"
        assert "the recordings in RECORDING_DIR would take more than" in waiting["error"]["message"]
    assert recordings(tmp_path) == []  # once ingest has stopped: no attempt left its partial file


def test_a_disk_that_fills_while_a_recording_is_written_makes_the_call_wait() -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here to answer writes with ENOSPC")
    with open("/dev/full", "wb") as full, pytest.raises(DownloadError) as refused:
        write_recording(full, b"\0" * 8192)
        write_recording(full)  # the bytes reach the device at the flush
    assert refused.value.waiting and not refused.value.permanent
    assert "the disk of RECORDING_DIR is full" in str(refused.value)


# -- crm's outbox: an outbox that cannot write answers UNAVAILABLE, which ingest waits out --

async def test_a_record_the_full_outbox_cannot_take_is_refused_with_unavailable(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    async with crm_service(tmp_path / "outbox.db", receiver) as crm:
        await no_room(crm.outbox)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            for n in range(CALLS):
                await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record(f"r-{n}")))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "database or disk is full" in refused.value.details()


async def test_a_call_waits_for_a_full_outbox_without_using_up_its_attempts(
        tmp_path: Path, receiver: CrmReceiver) -> None:
    await analysed_call(tmp_path, "c-outbox")
    async with crm_service(tmp_path / "outbox.db", receiver) as crm:
        await crm.outbox.db.fetchall("PRAGMA query_only = 1")  # nothing can be written to the outbox
        async with running_ingest(tmp_path, crm_addr=crm.server.address) as ingest:
            waiting = await wait_for(ingest.url, "c-outbox", lambda s: s["attempts"] > 3)  # two would fail it
            assert waiting["status"] == "delivering"
            assert waiting["error"]["message"].startswith("crm: UNAVAILABLE: the outbox cannot serve this now")
            await crm.outbox.db.fetchall("PRAGMA query_only = 0")
            await wait_for_state(ingest.url, "c-outbox", {"done"})
    assert [r.body["call_id"] for r in receiver.records] == ["c-outbox"]


async def test_a_store_that_stops_answering_is_logged_once_and_again_when_it_answers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "services.ingest.pipeline")
    async with running_ingest(tmp_path) as ingest:
        await writes_refused(ingest.store, True)
        ingest.worker.wake()
        await asyncio.sleep(3.0)  # the pipeline's loop asks the store every second meanwhile
        await writes_refused(ingest.store, False)
        ingest.worker.wake()
        for _ in range(50):
            if any("answers again" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.1)
    lines = [r for r in caplog.records if r.name == "services.ingest.pipeline"]
    down = [r.getMessage() for r in lines if "cannot be reached" in r.getMessage()]
    assert down == ["the job store cannot be reached (OperationalError: attempt to write a readonly database); "
                    "waiting for it, nothing is lost meanwhile"]
    assert any(r.getMessage().startswith("the job store answers again, after ") for r in lines)
    assert not [r for r in lines if r.exc_info]  # no traceback


async def test_an_outbox_that_stops_answering_is_logged_once_and_again_when_it_answers(
        tmp_path: Path, receiver: CrmReceiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "services.crm.delivery")
    async with crm_service(tmp_path / "outbox.db", receiver) as crm:
        await crm.outbox.db.fetchall("PRAGMA query_only = 1")
        crm.worker.wake()
        await asyncio.sleep(3.0)  # the delivery loop asks the outbox every second meanwhile
        await crm.outbox.db.fetchall("PRAGMA query_only = 0")
        crm.worker.wake()
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record("after")))  # and records go out again
        await wait_delivery(crm.stub, "after", lambda d: d.state == crm_pb2.DELIVERY_STATE_DELIVERED)
    lines = [r for r in caplog.records if r.name == "services.crm.delivery"]
    assert [r.getMessage() for r in lines if "cannot be reached" in r.getMessage()] == [
        "the outbox cannot be reached (OperationalError: attempt to write a readonly database); "
        "waiting for it, nothing is lost meanwhile"]
    assert any(r.getMessage().startswith("the outbox answers again, after ") for r in lines)
    assert not [r for r in lines if r.exc_info]
