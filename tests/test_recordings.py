"""Recordings on ingest's disk: a caller's voice is kept only while a call holds it.

A delivered call's recording is deleted with its delivery (test_end_to_end). These
tests cover what a stopped process leaves behind: a partial download, or a finished
one that no job names. Ingest removes such files when it starts and then every
``orphan_age`` seconds, once nobody has written them for that long; the recording of
a call still in the pipeline stays, and so does a failed call's, for its retry, until
its retention (RECORDING_FAILED_RETENTION_HOURS) is over.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from callmesh.standins import Recorder
from services.ingest.store import FAILED, TRANSCRIBING
from tests.ingest_harness import post, running_ingest, stored_call, wait_for

# Old enough for any setting: the harness downloads for at most 5 s and leases for 30 s.
LONG_AGO = time.time() - 24 * 3600


def leftover(directory: Path, name: str, *, written_at: float = LONG_AGO) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    os.utime(path, (written_at, written_at))
    return path


async def call_holding(tmp_path: Path, call_id: str, recording: Path, state: str) -> None:
    """A job in ``state`` whose recording is ``recording``, in the store the harness opens."""
    await stored_call(tmp_path, call_id, state, recording_path=str(recording), next_attempt_at=time.time() + 3600)


async def gone(path: Path, timeout: float = 10) -> bool:
    for _ in range(int(timeout * 20)):
        if not path.exists():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_partial_download_left_by_a_killed_process_is_removed_at_start(tmp_path: Path) -> None:
    partial = leftover(tmp_path / "recordings", "0123abcd.partial")
    async with running_ingest(tmp_path):
        assert await gone(partial)


async def test_a_recording_no_call_holds_is_removed_at_start(tmp_path: Path) -> None:
    orphan = leftover(tmp_path / "recordings", "4567abcd.audio")
    async with running_ingest(tmp_path):
        assert await gone(orphan)


async def test_the_recordings_of_calls_in_the_pipeline_or_failed_are_kept(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    working, failed = leftover(recordings, "aaaa.audio"), leftover(recordings, "bbbb.audio")
    orphan = leftover(recordings, "cccc.audio")
    await call_holding(tmp_path, "still-transcribing", working, TRANSCRIBING)
    await call_holding(tmp_path, "failed-awaiting-retry", failed, FAILED)
    async with running_ingest(tmp_path):
        assert await gone(orphan)  # the sweep ran
        assert working.exists() and failed.exists()


async def test_a_recording_written_lately_is_left_to_the_download_that_writes_it(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    fresh = leftover(recordings, "dddd.partial", written_at=time.time())
    old = leftover(recordings, "eeee.partial")
    async with running_ingest(tmp_path) as ingest:
        assert await gone(old)
        assert ingest.worker.orphan_age() > 30
        assert fresh.exists()


async def test_files_that_are_not_recordings_are_left_alone(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    other = leftover(recordings, "notes.txt")
    orphan = leftover(recordings, "ffff.audio")
    async with running_ingest(tmp_path):
        assert await gone(orphan)
        assert other.exists()


async def test_a_recording_left_while_ingest_runs_is_removed_by_a_later_sweep(tmp_path: Path) -> None:
    async with running_ingest(tmp_path, total_timeout=0.5, lease_seconds=1) as ingest:
        assert ingest.worker.orphan_age() == 1.5
        await asyncio.sleep(0.2)  # the sweep at start is over
        orphan = leftover(tmp_path / "recordings", "abab.audio")
        assert await gone(orphan, timeout=5)


async def call_status(url: str, call_id: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/calls/{call_id}") as resp:
            return await resp.json()


async def test_a_failed_call_keeps_its_recording_until_its_retention_is_over(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    expired, recent = leftover(recordings, "1111.audio"), leftover(recordings, "2222.audio")
    await call_holding(tmp_path, "failed-long-ago", expired, FAILED)
    await asyncio.sleep(1.0)
    await call_holding(tmp_path, "failed-just-now", recent, FAILED)
    async with running_ingest(tmp_path, failed_retention=0.8) as ingest:
        assert await gone(expired)
        assert (await call_status(ingest.url, "failed-long-ago"))["recording_kept"] is False
        assert recent.exists() and (await call_status(ingest.url, "failed-just-now"))["recording_kept"] is True


async def test_a_retention_of_zero_keeps_a_failed_call_recording_until_it_is_retried(tmp_path: Path) -> None:
    recording = leftover(tmp_path / "recordings", "3333.audio")
    await call_holding(tmp_path, "failed-long-ago", recording, FAILED)
    await asyncio.sleep(0.3)
    async with running_ingest(tmp_path, failed_retention=0) as ingest:
        assert await gone(leftover(tmp_path / "recordings", "4444.audio"))  # the sweep ran
        assert recording.exists() and (await call_status(ingest.url, "failed-long-ago"))["recording_kept"] is True


async def test_a_retried_call_whose_recording_was_deleted_downloads_it_again(tmp_path: Path, audio_dir: Path) -> None:
    recorder = await Recorder(audio_dir).start()
    try:
        await stored_call(tmp_path, "expired", FAILED, error_stage=TRANSCRIBING, error="transcribe: INTERNAL",
                          recording_url=recorder.url_for("es-billing-angry.wav"))
        async with running_ingest(tmp_path) as ingest:  # transcribe is not there: the call waits for it
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{ingest.url}/v1/calls/expired:retry") as resp:
                    assert resp.status == 202
            status = await wait_for(ingest.url, "expired", lambda s: "UNAVAILABLE" in (s["error"] or {}).get("message", ""))
            job = await ingest.store.get("expired")
        assert status["status"] == "transcribing", status
        assert list(status["stages"]).index("downloading") > list(status["stages"]).index("failed")
        assert job is not None and job.recording_path and Path(job.recording_path).stat().st_size > 0
    finally:
        await recorder.stop()


async def test_a_failed_call_whose_recording_was_let_go_takes_a_new_link_for_its_retry(
        tmp_path: Path, audio_dir: Path) -> None:
    recorder = await Recorder(audio_dir).start()
    try:
        await stored_call(tmp_path, "let-go", FAILED, error_stage=TRANSCRIBING, error="transcribe: INTERNAL",
                          recording_url=recorder.url_for("expired-link.wav"))  # the stored link no longer answers
        async with running_ingest(tmp_path) as ingest:
            fresh = recorder.url_for("es-billing-angry.wav")
            status, body = await post(ingest.url, json.dumps({"call_id": "let-go", "recording_url": fresh}))
            assert (status, body["status"]) == (202, "failed")  # kept for the retry, not replayed by the webhook
            assert recorder.requests == []
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{ingest.url}/v1/calls/let-go:retry") as resp:
                    assert resp.status == 202
            await wait_for(ingest.url, "let-go", lambda s: "UNAVAILABLE" in (s["error"] or {}).get("message", ""))
            job = await ingest.store.get("let-go")
        assert job is not None and job.recording_url == fresh and job.recording_path is not None
        assert recorder.requests == ["es-billing-angry.wav"]
    finally:
        await recorder.stop()


async def test_a_recordings_directory_removed_while_ingest_runs_is_made_again(
        tmp_path: Path, recorder: Recorder) -> None:
    async with running_ingest(tmp_path) as ingest:
        shutil.rmtree(tmp_path / "recordings")  # an operator clears it, or its volume is mounted anew
        status, _ = await post(ingest.url, json.dumps({"call_id": "after-rmtree",
                                                       "recording_url": recorder.url_for("es-billing-angry.wav")}))
        assert status == 202
        await wait_for(ingest.url, "after-rmtree", lambda s: s["status"] == "transcribing")
        job = await ingest.store.get("after-rmtree")
    assert job is not None and job.recording_path and Path(job.recording_path).parent == tmp_path / "recordings"


async def test_webhooks_are_answered_while_a_recording_is_synced_to_disk(
        tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording is synced to disk before its call moves on, which takes seconds for a long one on a busy disk:
    the webhooks that come meanwhile do not wait for it."""
    syncing, answered = threading.Event(), threading.Event()
    held: list[bool] = []
    sync = os.fsync

    def slow_fsync(fd: int) -> None:
        syncing.set()
        held.append(answered.wait(10))  # True: a webhook was answered while this sync was under way
        sync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    async with running_ingest(tmp_path) as ingest:
        await post(ingest.url, json.dumps({"call_id": "long-1", "recording_url": recorder.url_for("es-billing-angry.wav")}))
        assert await asyncio.to_thread(syncing.wait, 10)
        status, _ = await post(ingest.url, json.dumps({"call_id": "next-1", "recording_url": recorder.url_for("x.wav")}))
        answered.set()
        assert status == 202
        await wait_for(ingest.url, "long-1", lambda s: "transcribing" in s["stages"])
    assert held == [True]
