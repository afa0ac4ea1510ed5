"""Where the English text comes from: the LLM line by line (default), or Whisper's translate task.

The pipeline runs for real against the real transcribe and crm services on loopback;
only Ollama, which is not part of the product, is a stand-in speaking /api/chat
(it answers whatever schema it is asked, and records what it was asked).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from callcenter.v1 import analyze_pb2_grpc
from callmesh.standins import CrmReceiver, Recorder
from services.analyze.analyzer import Analyzer
from services.analyze.backends import OllamaBackend
from services.analyze.config import DEFAULT_EMOTIONS, DEFAULT_TOPICS
from services.analyze.servicer import AnalysisServicer
from services.common.grpc_server import RunningServer, ServiceBinding, start_server
from services.common.limits import AdmissionLimiter
from tests.ingest_harness import post, running_ingest, wait_for_state
from tests.test_analyze import FakeOllama, settings
from tests.crm_harness import start_crm
from tests.test_transcribe import _serve, engine  # noqa: F401  (the engine fixture)

pytestmark = pytest.mark.models


@pytest_asyncio.fixture
async def services(engine, tmp_path: Path) -> AsyncIterator[dict]:
    ollama = await FakeOllama([], by_schema=True).start()
    analyzer = Analyzer(OllamaBackend(settings(ollama.url)), DEFAULT_TOPICS, DEFAULT_EMOTIONS, 4096, 512)
    servicer = AnalysisServicer(analyzer, AdmissionLimiter(1, 4))
    analyze: RunningServer = await start_server("127.0.0.1:0", [ServiceBinding(
        "callcenter.v1.AnalysisService", lambda s: analyze_pb2_grpc.add_AnalysisServiceServicer_to_server(servicer, s))])
    transcribe, _ = await _serve(engine, max_running=1, max_queued=4)
    receiver = await CrmReceiver().start()
    crm = await start_crm(tmp_path / "outbox.db", receiver)
    yield {"ollama": ollama, "analyze": analyze, "transcribe": transcribe, "crm": crm, "receiver": receiver}
    await crm.close()
    await receiver.stop()
    await transcribe.stop(1)
    await analyze.stop(1)
    await ollama.stop()


async def run_call(services: dict, tmp_path: Path, audio_dir: Path, source: str) -> dict:
    recorder = await Recorder(audio_dir).start()
    try:
        async with running_ingest(tmp_path, transcribe_addr=services["transcribe"].address,
                                  analyze_addr=services["analyze"].address, crm_addr=services["crm"].server.address,
                                  transcribe_timeout=120, analyze_timeout=60, translation_source=source) as ingest:
            body = json.dumps({"call_id": f"tr-{source}", "recording_url": recorder.url_for("es-billing-angry.wav")})
            status, _ = await post(ingest.url, body)
            assert status == 202
            final = await wait_for_state(ingest.url, f"tr-{source}", {"done", "failed"}, timeout=240)
            assert final["status"] == "done", final
        return services["receiver"].for_call(f"tr-{source}")[0].body
    finally:
        await recorder.stop()


async def test_by_default_the_llm_translates_each_segment(services: dict, tmp_path: Path, audio_dir: Path) -> None:
    record = await run_call(services, tmp_path, audio_dir, "llm")
    asked = [r for r in services["ollama"].requests if "lines" in r["format"]["properties"]]
    assert len(asked) == 1 and record["translation_source"] == "llm"
    assert [s["index"] for s in record["translated_segments"]] == [s["index"] for s in record["segments"]]


async def test_whisper_can_translate_instead_and_the_record_says_so(services: dict, tmp_path: Path,
                                                                     audio_dir: Path) -> None:
    record = await run_call(services, tmp_path, audio_dir, "whisper")
    asked = [r for r in services["ollama"].requests if "lines" in r["format"]["properties"]]
    assert asked == []  # the LLM was not asked to translate
    assert record["translation_source"] == "whisper" and record["language"] == "es"
    english = " ".join(s["text"] for s in record["translated_segments"]).lower()
    assert "hello" in english and "factura" not in english
    assert record["translated_transcript"].lower().count("hello") >= 1


async def test_the_records_translation_reads_like_its_transcript(services: dict, tmp_path: Path,
                                                                audio_dir: Path) -> None:
    record = await run_call(services, tmp_path, audio_dir, "llm")
    assert record["transcript"] == " ".join(s["text"].strip() for s in record["segments"])
    assert record["translated_transcript"] == " ".join(s["text"].strip() for s in record["translated_segments"])
    assert "Speaker:" not in record["translated_transcript"]
