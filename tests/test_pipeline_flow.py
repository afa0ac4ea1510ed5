"""How the pipeline worker spends its slots: transcription is never held up by a backlog further on.

The real transcribe and crm services run on loopback; the LLM is the Ollama stand-in,
held busy until the test lets it answer (Ollama is not part of the product).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from callmesh.standins import Recorder
from services.ingest.pipeline import BACK_STAGE_FACTOR
from tests.held_llm import HeldLlmMesh, held_llm_mesh
from tests.ingest_harness import post, running_ingest, wait_for, wait_for_state
from tests.test_transcribe import _serve, engine  # noqa: F401  (the engine fixture)

pytestmark = pytest.mark.models

CONCURRENCY = 1  # one front slot, BACK_STAGE_FACTOR back slots
CALLS = CONCURRENCY * BACK_STAGE_FACTOR + 2  # more calls than the worker may hold at analysis


@pytest_asyncio.fixture
async def busy_llm_mesh(engine, tmp_path: Path, audio_dir: Path) -> AsyncIterator[HeldLlmMesh]:
    """Ingest over real transcribe, analyze and crm services, with an LLM that answers only when told."""
    async with held_llm_mesh(engine, tmp_path, audio_dir, analyses_queued=2 * CALLS, concurrency=CONCURRENCY,
                             analyze_timeout=300, max_attempts=5) as mesh:
        yield mesh


async def post_calls(mesh: HeldLlmMesh, prefix: str) -> list[str]:
    """Post CALLS webhooks for the short English recording; their call ids."""
    ids = [f"{prefix}-{i}" for i in range(CALLS)]
    for call_id in ids:
        body = json.dumps({"call_id": call_id, "recording_url": mesh.recorder.url_for("en-internet-angry.wav")})
        assert (await post(mesh.ingest.url, body))[0] == 202
    return ids


async def test_recordings_are_transcribed_while_every_analysis_slot_waits_for_the_llm(busy_llm_mesh: HeldLlmMesh) -> None:
    ingest, ids = busy_llm_mesh.ingest, await post_calls(busy_llm_mesh, "ahead")
    for call_id in ids:  # the LLM has answered nothing yet
        status = await wait_for_state(ingest.url, call_id, {"analyzing"}, timeout=180)
        assert status["progress"]["transcript_complete"], status
    assert len(busy_llm_mesh.ollama.requests) == 1  # one analysis at the LLM, the others wait their turn


async def test_a_transcribed_call_beyond_the_analysis_slots_shows_that_it_waits_its_turn(busy_llm_mesh: HeldLlmMesh) -> None:
    ingest, ids = busy_llm_mesh.ingest, await post_calls(busy_llm_mesh, "turn")
    statuses = [await wait_for_state(ingest.url, call_id, {"analyzing"}, timeout=180) for call_id in ids]
    held = [s["call_id"] for s in statuses if s["progress"]["in_progress"]]
    assert held == ids[:CONCURRENCY * BACK_STAGE_FACTOR]  # in the analysis slots, oldest first; the rest wait


async def test_calls_that_waited_for_a_slot_reach_the_crm_once_the_llm_answers(busy_llm_mesh: HeldLlmMesh) -> None:
    ingest, ids = busy_llm_mesh.ingest, await post_calls(busy_llm_mesh, "waited")
    await wait_for_state(ingest.url, ids[-1], {"analyzing"}, timeout=180)
    busy_llm_mesh.gate.set()
    for call_id in ids:
        final = await wait_for_state(ingest.url, call_id, {"done", "failed"}, timeout=120)
        assert final["status"] == "done", final
        assert len(busy_llm_mesh.receiver.for_call(call_id)) == 1


async def test_the_status_of_a_call_being_transcribed_says_how_much_of_its_recording_is(
        engine, tmp_path: Path, audio_dir: Path) -> None:
    transcribe, _ = await _serve(engine, max_running=1, max_queued=1)
    recorder = await Recorder(audio_dir).start()
    try:  # analyze and crm are not there: the call stops at analyzing
        async with running_ingest(tmp_path, transcribe_addr=transcribe.address, max_bytes=8 << 20,
                                  transcribe_timeout=120) as ingest:
            body = json.dumps({"call_id": "long-1", "recording_url": recorder.url_for("long-en.wav")})
            assert (await post(ingest.url, body))[0] == 202
            first = (await wait_for(ingest.url, "long-1", lambda s: s["progress"]["segments"] > 0, timeout=120))
            done = (await wait_for_state(ingest.url, "long-1", {"analyzing"}, timeout=120))["progress"]
    finally:
        await recorder.stop()
        await transcribe.stop(1)
    assert first["status"] == "transcribing" and not first["progress"]["transcript_complete"], first
    audio = done["audio_seconds"]
    assert audio > 50 and first["progress"]["audio_seconds"] == audio  # known from the first segment on
    assert 0 < first["progress"]["transcribed_seconds"] < audio / 2  # the first segment of a call of about a minute
    assert done["transcript_complete"] and done["transcribed_seconds"] == audio

