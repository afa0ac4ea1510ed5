"""The ``callmesh`` command line against a mesh it started itself (``callmesh up``), real models."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli_mesh import CALLMESH, ROOT, UpMesh
from tests.ingest_harness import Ingest, post

pytestmark = pytest.mark.models


def test_up_prints_each_service_with_its_address_and_health(up_mesh: UpMesh) -> None:
    lines = up_mesh.output.read_text().splitlines()
    for service in ("transcribe", "analyze", "crm", "ingest"):
        line = next(line for line in lines if line.strip().startswith(service))
        assert "127.0.0.1:" in line and "SERVING" in line, line


def test_submit_serves_a_local_file_and_prints_the_record(stereo_call) -> None:
    result, record = stereo_call
    assert result.returncode == 0, result.stderr
    for stage in ("received", "downloading", "transcribing", "analyzing", "delivering", "done"):
        assert stage in result.stdout
    assert record["call_id"] == "cli-stereo" and len(record["summary"]) == 3
    assert record["speakers"] == ["agent", "customer"]
    assert set(record["sentiment_by_speaker"]) == {"agent", "customer"}  # speakers known: a sentiment each
    assert '"topic"' in result.stdout  # the record is printed too
    assert record["metadata"] == {"agent_id": "A-42", "queue": "sales=EU"}  # from --meta


def test_the_local_crm_stand_in_received_the_record(up_mesh: UpMesh, stereo_call) -> None:
    saved = json.loads((up_mesh.data / "crm-received" / "cli-stereo.json").read_text())
    assert saved == stereo_call[1]


def test_submit_of_a_file_that_is_not_audio_exits_1_with_the_reason(up_mesh: UpMesh, audio_dir: Path) -> None:
    result = up_mesh.run("submit", str(audio_dir / "not-audio.txt"), "--call-id", "cli-text")
    assert result.returncode == 1
    assert "failed at downloading" in result.stderr and "not audio" in result.stderr


def test_submit_of_a_url_ingest_will_not_fetch_exits_4(up_mesh: UpMesh) -> None:
    result = up_mesh.run("submit", "http://169.254.169.254/latest/meta-data", "--call-id", "cli-ssrf")
    assert result.returncode == 4
    assert "refused" in result.stderr and "169.254.169.254" in result.stderr


def test_submit_of_a_missing_file_exits_4_saying_there_is_no_such_file(up_mesh: UpMesh) -> None:
    result = up_mesh.run("submit", "no/such/file.wav")
    assert result.returncode == 4 and "no/such/file.wav: no such file" in result.stderr


def test_submit_of_a_directory_exits_4(up_mesh: UpMesh, audio_dir: Path) -> None:
    result = up_mesh.run("submit", str(audio_dir))
    assert result.returncode == 4 and "is neither a file nor a URL" in result.stderr


def test_bad_stereo_option_is_a_usage_error(up_mesh: UpMesh, audio_dir: Path) -> None:
    result = up_mesh.run("submit", str(audio_dir / "stereo-agent-left.wav"), "--stereo", "left")
    assert result.returncode == 2 and "agent=left" in result.stderr


def test_bad_meta_option_is_a_usage_error(up_mesh: UpMesh, audio_dir: Path) -> None:
    result = up_mesh.run("submit", str(audio_dir / "stereo-agent-left.wav"), "--meta", "agent_id")
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr


def test_status_of_a_call_shows_its_stages_and_result(up_mesh: UpMesh, stereo_call) -> None:
    result = up_mesh.run("status", "cli-stereo")
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout and "topic" in result.stdout and "trace" in result.stdout


def test_status_json_parses_when_a_value_is_longer_than_the_terminal_is_wide(up_mesh: UpMesh, stereo_call) -> None:
    result = subprocess.run([*CALLMESH, "status", "cli-stereo", "--json"], env={**up_mesh.env, "COLUMNS": "60"},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    status = json.loads(result.stdout)
    assert len(status["result"]["transcript"]) > 60


async def test_status_of_a_call_being_transcribed_says_how_much_of_it_is(ingest: Ingest) -> None:
    await ingest.worker.stop(1)  # the test stores the transcript as the pipeline does
    assert (await post(ingest.url, '{"call_id": "long-1", "recording_url": "http://127.0.0.1:9/a.wav"}'))[0] == 202
    await ingest.store.update("long-1", None, state="transcribing", transcript={
        "language": "en", "audio_duration": 600.0, "complete": False, "segments": [
            {"index": 0, "start": 70.0, "end": 75.2, "speaker": "unknown", "channel": 0, "text": " Hello."}]})
    # Not subprocess.run: this event loop serves the status API the command reads.
    cli = await asyncio.create_subprocess_exec(*CALLMESH, "status", "long-1", "--url", ingest.url, cwd=ROOT,
                                               stdout=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
    out, _ = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0 and re.search(r"transcribed\s+01:15.2 of 10:00.0 \(1 segment\)", out.decode()), out


def test_status_of_an_unknown_call_exits_4(up_mesh: UpMesh) -> None:
    result = up_mesh.run("status", "never-seen")
    assert result.returncode == 4 and "never-seen" in result.stderr


def test_calls_lists_the_failed_ones(up_mesh: UpMesh, audio_dir: Path) -> None:
    up_mesh.run("submit", str(audio_dir / "not-audio.txt"), "--call-id", "cli-text-2")
    result = up_mesh.run("calls", "--status", "failed", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert "cli-text-2" in [c["call_id"] for c in listed["calls"]]
    assert all(c["status"] == "failed" for c in listed["calls"])


def test_retry_requeues_a_failed_call_and_refuses_a_done_one(up_mesh: UpMesh, audio_dir: Path, stereo_call) -> None:
    up_mesh.run("submit", str(audio_dir / "not-audio.txt"), "--call-id", "cli-text-3")
    again = up_mesh.run("retry", "cli-text-3")
    assert again.returncode == 0 and "queued again at downloading" in again.stdout
    done = up_mesh.run("retry", "cli-stereo")
    assert done.returncode == 4 and "only failed calls" in done.stderr


def failed_time(up_mesh: UpMesh, call_id: str) -> str | None:
    status = json.loads(up_mesh.run("status", call_id, "--json").stdout)
    return status["stages"].get("failed") if status["status"] == "failed" else None


def test_retry_failed_at_a_stage_replays_every_call_that_failed_there(up_mesh: UpMesh, audio_dir: Path) -> None:
    for call_id in ("cli-bulk-1", "cli-bulk-2"):
        up_mesh.run("submit", str(audio_dir / "not-audio.txt"), "--call-id", call_id)
    before = {c: failed_time(up_mesh, c) for c in ("cli-bulk-1", "cli-bulk-2")}
    assert all(before.values()), before
    result = up_mesh.run("retry", "--failed-at", "downloading")
    assert result.returncode == 0, result.stderr
    assert int(re.search(r"(\d+) call\(s\) that failed at downloading queued again", result.stdout)[1]) >= 2
    for call_id, first in before.items():  # each went through its download again and failed anew
        deadline = time.monotonic() + 20
        while (again := failed_time(up_mesh, call_id)) in (None, first) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert again is not None and again > first, (call_id, first, again)


def test_retry_failed_at_a_stage_where_none_failed_queues_nothing(up_mesh: UpMesh) -> None:
    result = up_mesh.run("retry", "--failed-at", "delivering")
    assert result.returncode == 0 and "0 call(s) that failed at delivering queued again" in result.stdout


def test_set_aside_refuses_a_call_that_is_not_waiting_for_the_crm(up_mesh: UpMesh, stereo_call) -> None:
    result = up_mesh.run("set-aside", "cli-stereo", "--reason", "stuck")
    assert result.returncode == 4 and "only a call waiting for the CRM" in result.stderr, result


def test_retry_needs_one_call_or_a_stage(up_mesh: UpMesh) -> None:
    assert up_mesh.run("retry").returncode == 2
    assert up_mesh.run("retry", "some-call", "--failed-at", "delivering").returncode == 2
    assert up_mesh.run("retry", "--failed-at", "nowhere").returncode == 2


def test_transcribe_prints_language_and_segments(up_mesh: UpMesh, audio_dir: Path) -> None:
    result = up_mesh.run("transcribe", str(audio_dir / "es-billing-angry.wav"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("language es")
    assert any("factura" in line.lower() for line in lines[1:])
    assert "s of audio" in lines[-1]


def test_transcribe_says_a_recording_without_speech_has_no_language(up_mesh: UpMesh, audio_dir: Path) -> None:
    result = up_mesh.run("transcribe", str(audio_dir / "silence-30s.wav"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "language none: no speech in the recording" and "s of audio" in lines[1]


def test_transcribe_of_a_file_that_is_not_audio_exits_4(up_mesh: UpMesh, audio_dir: Path) -> None:
    result = up_mesh.run("transcribe", str(audio_dir / "broken.wav"))
    assert result.returncode == 4 and "not audio" in result.stderr


def test_commands_exit_3_when_the_service_is_down(up_mesh: UpMesh, audio_dir: Path) -> None:
    status = up_mesh.run("status", "--url", "http://127.0.0.1:9")
    assert status.returncode == 3 and "not reachable" in status.stderr and "callmesh up" in status.stderr
    transcribe = up_mesh.run("transcribe", str(audio_dir / "es-billing-angry.wav"), "--addr", "127.0.0.1:9")
    assert transcribe.returncode == 3 and "not reachable" in transcribe.stderr


def test_ctrl_c_stops_the_mesh_gracefully(tmp_path: Path, whisper_dir: Path, llm_small: Path, up_mesh: UpMesh) -> None:
    # A second `callmesh up` of its own, stopped with SIGINT as Ctrl-C would.
    env = {**up_mesh.env, "CALLMESH_DATA_DIR": str(tmp_path)}
    process = subprocess.Popen([*CALLMESH, "up"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            if "Ctrl-C" in line:
                break
        assert (tmp_path / "mesh.json").exists()
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, rest
    assert "Stopped." in rest and not (tmp_path / "mesh.json").exists()
    for service in ("transcribe", "analyze", "crm"):
        assert f"{service} stopped" in (tmp_path / "logs" / f"{service}.log").read_text()
    assert "ingest stopped" in (tmp_path / "logs" / "ingest.log").read_text()


def test_demo_runs_the_spanish_sample_through_a_private_mesh(up_mesh: UpMesh, tmp_path: Path) -> None:
    env = {**up_mesh.env, "CALLMESH_DATA_DIR": str(tmp_path)}
    out = tmp_path / "record.json"
    result = subprocess.run([*CALLMESH, "demo", "--out", str(out)], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["language"] == "es" and record["translated_transcript"] and len(record["summary"]) == 3
    assert "SERVING" in result.stdout and "done" in result.stdout and "Trace id:" in result.stdout
    assert (tmp_path / "demo" / "ingest.db").exists()  # its own store, not the one `callmesh up` uses
