"""Recordings on a share mounted on ingest's machine: ``file:`` URLs, taken only under RECORDING_FILE_ROOTS.

Contact centers often record to network storage; the recorder then names the file, not an HTTP link.
The file is copied into RECORDING_DIR as a download would be (same size cap, room checks and audio
check); the original is never changed or deleted. A file the recorder is still writing is copied once it
has stopped changing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.ingest.downloader import Downloaded
from tests.ingest_harness import SECRET, Ingest, post, running_ingest, wait_for, wait_for_state
from tests.test_signatures import run_ingest_briefly

def past_the_copy(status: dict) -> bool:
    return "transcribing" in status["stages"]


async def assert_copied_whole(ingest: Ingest, call_id: str, whole: bytes) -> Path:
    """Wait until the call is past its copy; check that the copy is the whole recording, and return it."""
    await wait_for(ingest.url, call_id, past_the_copy)
    job = await ingest.store.get(call_id)
    assert job is not None and job.recording_path is not None
    assert Path(job.recording_path).read_bytes() == whole
    return Path(job.recording_path)


def begun_recording(share: Path, audio_dir: Path, name: str) -> tuple[bytes, Path]:
    """A recording (its whole bytes) of which the recorder has written the first 4 KiB to ``name`` on the share."""
    whole = (audio_dir / "es-billing-angry.wav").read_bytes()
    growing = share / "2026" / "11" / name
    growing.write_bytes(whole[:4096])
    return whole, growing


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    (root / "2026" / "11").mkdir(parents=True)
    return root


@pytest_asyncio.fixture
async def ingest_on_share(tmp_path: Path, share: Path) -> AsyncIterator[Ingest]:
    async with running_ingest(tmp_path, file_roots=(str(share),), not_ready_seconds=60) as running:
        yield running


async def test_a_recording_on_the_share_is_copied_and_the_original_left_alone(
        ingest_on_share: Ingest, share: Path, audio_dir: Path) -> None:
    original = share / "2026" / "11" / "call 7.wav"
    shutil.copy(audio_dir / "es-billing-angry.wav", original)
    status, _ = await post(ingest_on_share.url, json.dumps({"call_id": "nas-1",
                                                             "recording_url": original.as_uri()}))
    assert status == 202
    await wait_for(ingest_on_share.url, "nas-1", past_the_copy)
    job = await ingest_on_share.store.get("nas-1")
    assert job is not None and job.recording_path is not None
    copy = Path(job.recording_path)
    assert copy.parent != original.parent and copy.read_bytes() == original.read_bytes()
    assert original.read_bytes() == (audio_dir / "es-billing-angry.wav").read_bytes()  # left as it was


@pytest.mark.parametrize(("url", "reason"), [
    ("file:///etc/passwd", "/etc/passwd is not under RECORDING_FILE_ROOTS"),
    ("file://{share}/../secret.wav", "secret.wav is not under RECORDING_FILE_ROOTS"),
    ("file://{share}/2026/%2e%2e/%2e%2e/../secret.wav", "secret.wav is not under RECORDING_FILE_ROOTS"),
    ("file://recorder.example{share}/a.wav", "not on 'recorder.example'"),
    ("file:2026/a.wav", "needs an absolute path"),
])
async def test_a_file_url_outside_the_share_is_refused_at_the_webhook(ingest_on_share: Ingest, share: Path,
                                                                      url: str, reason: str) -> None:
    status, problem = await post(ingest_on_share.url, json.dumps({"call_id": "nas-2",
                                                                   "recording_url": url.format(share=share)}))
    assert status == 422 and reason in problem["detail"]
    assert await ingest_on_share.store.counts() == {}


async def test_a_link_on_the_share_that_leads_outside_it_fails_the_call(
        ingest_on_share: Ingest, share: Path, tmp_path: Path, audio_dir: Path) -> None:
    outside = tmp_path / "elsewhere.wav"
    shutil.copy(audio_dir / "es-billing-angry.wav", outside)
    (share / "link.wav").symlink_to(outside)
    await post(ingest_on_share.url, json.dumps({"call_id": "nas-3", "recording_url": (share / "link.wav").as_uri()}))
    status = await wait_for_state(ingest_on_share.url, "nas-3", {"failed"})
    assert "outside RECORDING_FILE_ROOTS" in status["error"]["message"]


async def test_a_recording_not_on_the_share_yet_is_waited_for(ingest_on_share: Ingest, share: Path,
                                                             audio_dir: Path) -> None:
    late = share / "2026" / "11" / "late.wav"
    await post(ingest_on_share.url, json.dumps({"call_id": "nas-4", "recording_url": late.as_uri()}))
    waiting = await wait_for(ingest_on_share.url, "nas-4", lambda s: s["error"] is not None)
    assert waiting["status"] == "downloading" and "there is no file" in waiting["error"]["message"]
    shutil.copy(audio_dir / "es-billing-angry.wav", late)
    status = await wait_for(ingest_on_share.url, "nas-4", past_the_copy)
    assert "failed" not in status["stages"]


@pytest.mark.parametrize(("name", "reason"), [("notes.txt", "not audio"), ("2026", "is not a file"),
                                              ("pipe.wav", "is not a file"), ("huge.wav", "over the 1048576-byte limit")])
async def test_what_is_not_a_recording_on_the_share_fails_the_call_with_the_reason(
        ingest_on_share: Ingest, share: Path, name: str, reason: str) -> None:
    (share / "notes.txt").write_text("minutes of the meeting, not a recording")
    os.mkfifo(share / "pipe.wav")  # opened as a file, it would wait for a writer that never comes
    (share / "huge.wav").write_bytes(b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(1024 * 1024))  # the harness caps at 1 MiB
    await post(ingest_on_share.url, json.dumps({"call_id": "nas-5", "recording_url": (share / name).as_uri()}))
    status = await wait_for_state(ingest_on_share.url, "nas-5", {"failed"})
    assert reason in status["error"]["message"] and status["error"]["stage"] == "downloading"


async def test_a_recording_still_being_written_is_copied_once_it_stops_changing(
        tmp_path: Path, share: Path, audio_dir: Path) -> None:
    whole, growing = begun_recording(share, audio_dir, "growing.wav")  # the webhook comes while it writes the rest
    async with running_ingest(tmp_path, file_roots=(str(share),), file_settle_seconds=0.5) as ingest:
        await post(ingest.url, json.dumps({"call_id": "nas-6", "recording_url": growing.as_uri()}))
        step = -(-(len(whole) - 4096) // 12)
        for start in range(4096, len(whole), step):  # a piece every 0.1 s for 1.2 s, each sooner than the 0.5 s
            await asyncio.sleep(0.1)
            with growing.open("ab") as out:
                out.write(whole[start:start + step])
        await assert_copied_whole(ingest, "nas-6", whole)


async def assert_slot_left_to_another_call(tmp_path: Path, share: Path, audio_dir: Path, pieces: int,
                                          message: str, dated: float | None = None) -> None:
    """With one download slot, a call whose recording the recorder writes in ``pieces`` pieces, one every 0.1 s
    (each change dated ``dated`` seconds on, if given, as a share's server that keeps another time does), waits
    with ``message`` in its status and none of its attempts used, while a second call's recording is copied; then
    the first is copied whole."""
    whole, growing = begun_recording(share, audio_dir, "growing.wav")
    done = share / "2026" / "11" / "done.wav"
    done.write_bytes(whole)
    os.utime(done, (0, 0))  # written long ago
    step = -(-(len(whole) - 4096) // pieces)
    written = 4096

    def date_it() -> None:
        if dated is not None:
            when = time.time() + dated
            os.utime(growing, (when, when))

    async def record() -> None:
        nonlocal written
        while written < len(whole):
            await asyncio.sleep(0.1)
            with growing.open("ab") as out:
                out.write(whole[written:written + step])
            written += step
            date_it()

    date_it()
    # One download slot; a copy may take 30 s, so a wait inside it would outlast the writing.
    async with running_ingest(tmp_path, file_roots=(str(share),), file_settle_seconds=0.5, total_timeout=30,
                              concurrency=1) as ingest:
        recorder = asyncio.create_task(record())
        try:
            await post(ingest.url, json.dumps({"call_id": "nas-10", "recording_url": growing.as_uri()}))
            waiting = await wait_for(ingest.url, "nas-10", lambda s: s["error"] is not None, timeout=5)
            assert waiting["status"] == "downloading" and waiting["attempts"] == 0
            assert message in waiting["error"]["message"]
            await post(ingest.url, json.dumps({"call_id": "nas-11", "recording_url": done.as_uri()}))
            await wait_for(ingest.url, "nas-11", past_the_copy, timeout=5)
            assert written < len(whole) and not recorder.done()  # while the first call's recording still grows
        finally:
            await recorder
        await assert_copied_whole(ingest, "nas-10", whole)


async def test_a_recording_still_being_written_leaves_its_download_slot_to_other_calls(
        tmp_path: Path, share: Path, audio_dir: Path) -> None:
    await assert_slot_left_to_another_call(tmp_path, share, audio_dir, 100, "is still being written")


async def test_a_recording_still_being_written_is_logged_once_and_each_look_after_at_debug(
        tmp_path: Path, share: Path, audio_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="services.ingest.pipeline")
    whole, growing = begun_recording(share, audio_dir, "chatty.wav")
    async with running_ingest(tmp_path, file_roots=(str(share),), file_settle_seconds=0.2) as ingest:
        await post(ingest.url, json.dumps({"call_id": "nas-14", "recording_url": growing.as_uri()}))
        step = -(-(len(whole) - 4096) // 15)
        for start in range(4096, len(whole), step):  # a piece every 0.1 s for 1.5 s
            await asyncio.sleep(0.1)
            with growing.open("ab") as out:
                out.write(whole[start:start + step])
        await assert_copied_whole(ingest, "nas-14", whole)
    looks = [r for r in caplog.records if "is still being written" in r.getMessage()]
    assert len(looks) >= 3 and [r.levelno for r in looks].count(logging.INFO) == 1


async def test_a_recording_dated_ahead_of_this_machines_clock_is_copied_once_it_stays_unchanged(
        tmp_path: Path, share: Path, audio_dir: Path) -> None:
    whole, recording = begun_recording(share, audio_dir, "ahead.wav")
    recording.write_bytes(whole)
    ahead = time.time() + 3600  # the share's server keeps another time
    os.utime(recording, (ahead, ahead))
    async with running_ingest(tmp_path, file_roots=(str(share),), file_settle_seconds=0.3) as ingest:
        await post(ingest.url, json.dumps({"call_id": "nas-13", "recording_url": recording.as_uri()}))
        await assert_copied_whole(ingest, "nas-13", whole)


async def test_a_recording_dated_ahead_of_the_clock_and_still_written_leaves_its_download_slot_to_other_calls(
        tmp_path: Path, share: Path, audio_dir: Path) -> None:
    await assert_slot_left_to_another_call(tmp_path, share, audio_dir, 60, "ahead of this machine's clock",
                                           dated=3600)


async def test_a_recording_dated_ahead_of_the_clock_long_after_its_webhook_is_copied_without_using_attempts(
        tmp_path: Path, share: Path, audio_dir: Path) -> None:
    whole = (audio_dir / "es-billing-angry.wav").read_bytes()
    late = share / "2026" / "11" / "late.wav"
    async with running_ingest(tmp_path, file_roots=(str(share),), file_settle_seconds=0.5, total_timeout=1,
                              not_ready_seconds=60) as ingest:
        await post(ingest.url, json.dumps({"call_id": "nas-17", "recording_url": late.as_uri()}))
        await wait_for(ingest.url, "nas-17",
                       lambda s: s["error"] is not None and "not there yet" in s["error"]["message"])
        await asyncio.sleep(1.2)  # the recording comes past RECORDING_TOTAL_TIMEOUT_SECONDS after the webhook
        late.write_bytes(whole)
        ahead = time.time() + 3600
        os.utime(late, (ahead, ahead))
        await assert_copied_whole(ingest, "nas-17", whole)  # two looks apart, neither an attempt (2 are allowed)


async def test_a_recording_still_written_long_after_its_webhook_uses_up_the_attempts(
        tmp_path: Path, share: Path, audio_dir: Path) -> None:
    whole, growing = begun_recording(share, audio_dir, "live.wav")

    async def record() -> None:  # a file that never stops changing (a live recording, not the call's)
        while True:
            await asyncio.sleep(0.05)
            os.utime(growing)

    async with running_ingest(tmp_path, file_roots=(str(share),), file_settle_seconds=0.2, total_timeout=1) as ingest:
        recorder = asyncio.create_task(record())
        try:
            await post(ingest.url, json.dumps({"call_id": "nas-12", "recording_url": growing.as_uri()}))
            status = await wait_for_state(ingest.url, "nas-12", {"failed"}, timeout=15)
        finally:
            recorder.cancel()
    assert status["error"]["stage"] == "downloading" and status["attempts"] == 2
    assert "is still being written" in status["error"]["message"]
    assert "after the webhook (RECORDING_TOTAL_TIMEOUT_SECONDS is 1)" in status["error"]["message"]


async def test_a_recording_that_changed_while_it_was_copied_is_copied_again(
        tmp_path: Path, share: Path, audio_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = (audio_dir / "es-billing-angry.wav").read_bytes()
    growing = share / "2026" / "11" / "growing.wav"
    growing.write_bytes(whole[: len(whole) // 2])
    async with running_ingest(tmp_path, file_roots=(str(share),)) as ingest:
        downloader = ingest.worker.downloader
        save = downloader._save

        async def save_while_the_recorder_writes(chunks: AsyncIterator[bytes], content_type: str) -> Downloaded:
            copied = await save(chunks, content_type)
            if growing.stat().st_size < len(whole):  # the recorder writes the rest just as the first copy ends
                with growing.open("ab") as out:
                    out.write(whole[len(whole) // 2:])
            return copied

        monkeypatch.setattr(downloader, "_save", save_while_the_recorder_writes)
        await post(ingest.url, json.dumps({"call_id": "nas-7", "recording_url": growing.as_uri()}))
        copy = await assert_copied_whole(ingest, "nas-7", whole)
        assert [p.name for p in (tmp_path / "recordings").iterdir()] == [copy.name]  # no half


async def test_a_call_waits_while_the_share_is_not_mounted_and_goes_on_once_it_is(
        tmp_path: Path, audio_dir: Path) -> None:
    mount_point = tmp_path / "mnt" / "recordings"  # the share's directory, empty without it
    mount_point.mkdir(parents=True)
    recording = mount_point / "2026" / "11" / "call-9.wav"
    async with running_ingest(tmp_path, file_roots=(str(mount_point),)) as ingest:  # no RECORDING_NOT_READY_SECONDS
        await post(ingest.url, json.dumps({"call_id": "nas-8", "recording_url": recording.as_uri()}))
        waiting = await wait_for(ingest.url, "nas-8", lambda s: s["error"] is not None)
        assert waiting["status"] == "downloading" and "is the share mounted?" in waiting["error"]["message"]
        waited = await wait_for(ingest.url, "nas-8", lambda s: s["attempts"] >= 3)  # past max_attempts=2
        assert waited["status"] == "downloading"
        recording.parent.mkdir(parents=True)  # the share is mounted again
        shutil.copy(audio_dir / "es-billing-angry.wav", recording)
        status = await wait_for(ingest.url, "nas-8", past_the_copy)
    assert "failed" not in status["stages"]


def test_ingest_warns_at_start_of_a_share_that_is_not_mounted(tmp_path: Path) -> None:
    mount_point = tmp_path / "mnt" / "recordings"
    mount_point.mkdir(parents=True)
    result = run_ingest_briefly(tmp_path, WEBHOOK_SECRETS=SECRET, RECORDING_FILE_ROOTS=str(mount_point))
    assert result.returncode == -1, result.stderr  # it serves: the share may come later
    assert "WARNING" in result.stderr and f"{mount_point} is empty (is the share mounted?)" in result.stderr
