"""One call through the four services, each its own process, on the real Whisper and LLM weights.

The stand-in recorder serves audio generated with espeak-ng and signs the
webhooks; the stand-in CRM receives the records; an OTLP receiver on loopback
collects every service's spans. The services talk gRPC over mutual TLS with
certificates from a CA made for this run.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import grpc
import pytest
import pytest_asyncio

from callmesh.mesh import Mesh, new_mesh
from callmesh.samples import SAMPLES
from callmesh.standins import CrmReceiver, Recorder, post_webhook
from services.common.config import PLAINTEXT, TlsSettings
from services.common.grpc_server import client_channel
from tests.otlp_receiver import OtlpReceiver
from tests.prometheus import metric
from tests.tls import Authority, mtls_env
from tests.tools import system_tool

pytestmark = pytest.mark.models
SERVICES = {"ingest", "transcribe", "analyze", "crm"}


@dataclass
class World:
    mesh: Mesh
    recorder: Recorder
    crm: CrmReceiver
    otlp: OtlpReceiver

    @property
    def tls(self) -> TlsSettings:
        """What a client inside the mesh presents (the services' own GRPC_TLS_* settings)."""
        with mock.patch.dict(os.environ, {k: v for k, v in self.mesh.env.items() if k.startswith("GRPC_TLS_")}):
            return TlsSettings.from_env()

    async def post(self, call_id: str, recording: str, **extra: Any) -> dict:
        body = {"call_id": call_id, "recording_url": self.recorder.url_for(recording), **extra}
        async with aiohttp.ClientSession() as session:
            status, ack = await post_webhook(session, self.mesh.ingest_url, body, self.mesh.webhook_secret)
        assert status == 202, ack
        return ack

    async def wait_for_state(self, call_id: str, state: str, timeout: float = 30) -> dict:
        async with aiohttp.ClientSession() as session:
            for _ in range(int(timeout * 20)):
                async with session.get(f"{self.mesh.ingest_url}/v1/calls/{call_id}") as resp:
                    status = await resp.json()
                if status["status"] == state:
                    return status
                await asyncio.sleep(0.05)
        raise AssertionError(f"{call_id} never reached {state}: {json.dumps(status)}")

    async def wait(self, call_id: str, timeout: float = 600) -> dict:
        async with aiohttp.ClientSession() as session:
            for _ in range(int(timeout * 4)):
                async with session.get(f"{self.mesh.ingest_url}/v1/calls/{call_id}") as resp:
                    status = await resp.json()
                if status["status"] in ("done", "failed"):
                    return status
                await asyncio.sleep(0.25)
        raise AssertionError(f"{call_id} did not finish: {json.dumps(status)}")


@pytest_asyncio.fixture(scope="module")
async def world(audio_dir: Path, whisper_dir: Path, llm_main: Path, tmp_path_factory) -> AsyncIterator[World]:
    otlp = await OtlpReceiver().start()
    recorder = await Recorder(audio_dir).start()
    crm = await CrmReceiver().start()
    work = tmp_path_factory.mktemp("mesh")
    ca = Authority.create(work / "pki")
    mesh = new_mesh({
        **mtls_env(ca, ca.issue(work / "pki", "callmesh")),
        "CRM_URL": crm.url,
        "RECORDING_ALLOWED_HOSTS": "127.0.0.1",
        "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
        "INGEST_DATABASE": str(work / "ingest.db"),
        "CRM_DATABASE": str(work / "crm.db"),
        "RECORDING_DIR": str(work / "recordings"),
        "WHISPER_MODEL": str(whisper_dir),
        "LLM_MODEL": str(llm_main),
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "PIPELINE_CONCURRENCY": "2",
    }, work)
    try:
        await asyncio.to_thread(mesh.start)
        yield World(mesh, recorder, crm, otlp)
    finally:
        await asyncio.to_thread(mesh.stop)
        for svc in ("ingest", "transcribe", "analyze", "crm"):
            log = work / f"{svc}.log"
            if log.exists():
                print(f"--- {svc} log (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        await recorder.stop()
        await crm.stop()
        await otlp.stop()


RECORDER_METADATA = {"agent_id": "A-117", "queue": "billing", "direction": "inbound", "ani": "+34 600 123 456"}


@pytest_asyncio.fixture(scope="module")
async def two_calls(world: World) -> dict[str, dict]:
    """The English and the Spanish call, posted together, followed to the end."""
    await world.post("e2e-en-1", "en-internet-angry.wav")
    await world.post("e2e-es-1", "es-billing-angry.wav", metadata=RECORDER_METADATA)
    statuses = await asyncio.gather(world.wait("e2e-en-1"), world.wait("e2e-es-1"))
    return {"en": statuses[0], "es": statuses[1]}


async def test_the_recorders_metadata_reaches_the_crm_record_as_sent(world: World, two_calls: dict[str, dict]) -> None:
    spanish = world.crm.for_call(two_calls["es"]["call_id"])[0].body
    english = world.crm.for_call(two_calls["en"]["call_id"])[0].body
    assert spanish["metadata"] == RECORDER_METADATA  # the customer's number too: it is how the CRM files the call
    assert english["metadata"] == {}
    assert two_calls["es"]["options"]["metadata"] == RECORDER_METADATA


async def test_each_call_reaches_the_crm_once(world: World, two_calls: dict[str, dict]) -> None:
    for lang, status in two_calls.items():
        assert status["status"] == "done", status
        assert len(world.crm.for_call(status["call_id"])) == 1
    assert len({r.idempotency_key for r in world.crm.records}) == len(world.crm.records)


@pytest.mark.parametrize("lang", ["en", "es"])
async def test_record_has_the_seed_shape(world: World, two_calls: dict[str, dict], lang: str) -> None:
    record = world.crm.for_call(two_calls[lang]["call_id"])[0].body
    for field in ("call_id", "language", "transcript", "translated_transcript", "summary", "topic", "sentiment",
                  "emotion", "timestamp"):
        assert field in record
    assert len(record["summary"]) == 3 and all(record["summary"])
    assert record["sub_topic"] and isinstance(record["resolved"], bool) and len(record["follow_up_actions"]) <= 3
    assert record["sentiment_by_speaker"] == {}  # mono: the speakers are not known
    assert record["segments"] and record["audio_duration_seconds"] > 5
    stats = record["statistics"]
    assert stats["talk_time_seconds"]["unknown"] > 3 and stats["interruptions"] == 0
    total = stats["talk_time_seconds"]["unknown"] + stats["non_talk_time_seconds"]
    assert abs(total - record["audio_duration_seconds"]) < 0.05
    assert record["language_uncertain"] is False
    assert record["pii_redaction_applied"] is True  # on by default in the crm service
    assert record == two_calls[lang]["result"]  # the status API shows what the CRM received


@pytest.mark.parametrize("lang", ["en", "es"])
async def test_language_is_detected_and_key_words_are_transcribed(world: World, two_calls: dict[str, dict], lang: str) -> None:
    sample = SAMPLES["en-internet-angry" if lang == "en" else "es-billing-angry"]
    record = world.crm.for_call(two_calls[lang]["call_id"])[0].body
    assert record["language"] == lang
    for word in sample.keywords:
        assert word in record["transcript"].lower()


async def test_spanish_call_is_translated_into_english(world: World, two_calls: dict[str, dict]) -> None:
    record = world.crm.for_call("e2e-es-1")[0].body
    translation = record["translated_transcript"].lower()
    assert translation
    assert any(w in translation for w in ("bill", "invoice", "charged")), translation
    assert "money" in translation or "refund" in translation, translation
    assert "factura" not in translation


async def test_english_call_is_not_retranslated(world: World, two_calls: dict[str, dict]) -> None:
    assert world.crm.for_call("e2e-en-1")[0].body["translated_transcript"] == ""


@pytest.mark.parametrize("lang", ["en", "es"])
async def test_angry_call_is_negative(world: World, two_calls: dict[str, dict], lang: str) -> None:
    record = world.crm.for_call(two_calls[lang]["call_id"])[0].body
    assert record["sentiment"] == "negative"


async def test_status_shows_every_stage_in_order(two_calls: dict[str, dict]) -> None:
    stages = list(two_calls["es"]["stages"])
    assert stages == ["received", "downloading", "transcribing", "analyzing", "delivering", "done"]
    assert two_calls["es"]["error"] is None
    assert two_calls["es"]["delivery"]["state"] == "delivered"


async def test_one_trace_spans_all_four_services(world: World, two_calls: dict[str, dict]) -> None:
    trace_id = two_calls["es"]["trace_id"]
    def complete() -> bool:  # spans arrive in batches: wait until every parent has arrived too
        spans = world.otlp.trace(trace_id)
        ids = {s.span_id for s in spans}
        return (world.otlp.services_in(trace_id) >= SERVICES
                and "crm.post" in world.otlp.by_service(trace_id).get("crm", [])
                and all(s.parent_span_id in ids for s in spans if s.parent_span_id))

    for _ in range(200):
        if complete():
            break
        await asyncio.sleep(0.1)
    spans = world.otlp.by_service(trace_id)
    assert set(spans) == SERVICES, spans
    assert "recording.download" in spans["ingest"]
    assert "whisper.decode" in spans["transcribe"]
    assert "llm.analysis" in spans["analyze"] and "llm.translation" in spans["analyze"]
    assert "crm.post" in spans["crm"]
    # Every span's parent is in the same trace: one tree from the webhook down.
    trace = world.otlp.trace(trace_id)
    ids = {s.span_id for s in trace}
    roots = [s for s in trace if not s.parent_span_id]
    assert len(roots) == 1 and roots[0].service == "ingest"
    assert all(s.parent_span_id in ids for s in trace if s.parent_span_id)
    other = two_calls["en"]["trace_id"]
    assert other != trace_id and not set(world.otlp.trace(other)) & set(trace)


async def test_every_services_metrics_pass_promtools_checks(world: World, two_calls: dict[str, dict]) -> None:
    promtool = system_tool("promtool", "prometheus")
    async with aiohttp.ClientSession() as session:
        for name, svc in world.mesh.services.items():
            async with session.get(svc.metrics_url) as resp:
                scrape = await resp.text()
            checked = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True)
            assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"
            assert "callmesh_" in scrape


async def test_every_service_exposes_prometheus_metrics(world: World, two_calls: dict[str, dict]) -> None:
    async with aiohttp.ClientSession() as session:
        # A refusal the body middleware answers before the webhook's handler is counted too.
        async with session.post(f"{world.mesh.ingest_url}/v1/calls", data=b"{" * (64 * 1024 + 1),
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 413
        scrapes = {}
        for name, svc in world.mesh.services.items():
            async with session.get(svc.metrics_url) as resp:
                assert resp.status == 200 and resp.content_type == "text/plain"
                scrapes[name] = await resp.text()
    ingest, transcribe, analyze, crm = (scrapes[n] for n in ("ingest", "transcribe", "analyze", "crm"))
    assert metric(ingest, "callmesh_calls", state="done") >= 2
    assert metric(ingest, "callmesh_webhooks_total", outcome="accepted") >= 2
    assert metric(ingest, "callmesh_webhooks_total", outcome="413") >= 1
    assert metric(ingest, "callmesh_stage_duration_seconds_count", stage="transcribing", outcome="done") >= 2
    assert metric(ingest, "callmesh_queue_oldest_age_seconds") >= 0
    assert metric(ingest, "callmesh_recordings_free_bytes") > 0
    assert metric(ingest, "callmesh_recordings_min_free_bytes") == 1024**3  # RECORDING_MIN_FREE_BYTES' default
    assert metric(transcribe, "callmesh_transcribe_realtime_factor_count") >= 2
    assert metric(transcribe, "callmesh_transcribe_audio_seconds_total") > 10
    assert metric(analyze, "callmesh_llm_tokens_per_second_count", purpose="analysis") >= 2
    assert metric(analyze, "callmesh_llm_tokens_per_second_sum", purpose="analysis") > 0
    assert metric(crm, "callmesh_crm_delivery_attempts_total", outcome="delivered") >= 2
    assert metric(crm, "callmesh_crm_queued") == 0
    assert metric(crm, "callmesh_store_write_duration_seconds_count", store="crm.outbox", engine="sqlite") >= 2


@pytest.mark.parametrize(("recording", "reason"), [("broken.wav", "not audio"),
                                                  ("video-only.mp4", "it has no audio stream, only video")])
async def test_recording_that_does_not_decode_fails_at_transcribing_with_the_reason(world: World, recording: str,
                                                                                   reason: str) -> None:
    call_id = "e2e-broken-" + recording.replace(".", "-")
    await world.post(call_id, recording)
    status = await world.wait(call_id, timeout=120)
    assert status["status"] == "failed"
    assert status["error"]["stage"] == "transcribing"
    assert "INVALID_ARGUMENT" in status["error"]["message"] and reason in status["error"]["message"]
    assert world.crm.for_call(call_id) == []


@pytest.mark.parametrize("recording", ["silence-30s.wav", "noise-15s.wav"])
async def test_recording_without_speech_is_done_with_an_explicit_no_speech_record(world: World, recording: str) -> None:
    call_id = "e2e-" + recording.split(".")[0]
    await world.post(call_id, recording)
    status = await world.wait(call_id, timeout=300)
    assert status["status"] == "done", status
    record = world.crm.for_call(call_id)[0].body
    assert (record["transcript"], record["summary"], record["language"]) == ("", [], "")
    assert (record["language_probability"], record["language_uncertain"]) == (0, False)  # no language, not a guess
    assert record["sentiment"] == "neutral" and record["audio_duration_seconds"] >= 14


async def test_truncated_mp3_is_transcribed_as_far_as_it_decodes(world: World, two_calls: dict[str, dict]) -> None:
    await world.post("e2e-truncated", "truncated.mp3")
    status = await world.wait("e2e-truncated", timeout=300)
    assert status["status"] == "done", status
    record = world.crm.for_call("e2e-truncated")[0].body
    full = world.crm.for_call("e2e-es-1")[0].body
    assert 0 < record["audio_duration_seconds"] < 0.6 * full["audio_duration_seconds"]
    assert record["transcript"] and len(record["summary"]) == 3


async def test_call_interrupted_by_a_crash_resumes_when_ingest_restarts(world: World) -> None:
    await world.post("e2e-crash-1", "long-en.wav")
    await world.wait_for_state("e2e-crash-1", "transcribing")
    ingest = world.mesh.services.pop("ingest")
    ingest.process.kill()  # SIGKILL: no graceful hand-back
    ingest.process.wait()
    await asyncio.to_thread(world.mesh.start_service, "ingest")
    final = await world.wait("e2e-crash-1")
    assert final["status"] == "done", final
    assert len(world.crm.for_call("e2e-crash-1")) == 1


async def test_sigterm_on_ingest_hands_the_call_back_and_it_finishes_after_restart(world: World) -> None:
    await world.post("e2e-term-1", "long-en.wav")
    await world.wait_for_state("e2e-term-1", "transcribing")
    code = await asyncio.to_thread(world.mesh.stop_service, "ingest")
    assert code == 0  # drained within the grace period, not killed
    await asyncio.to_thread(world.mesh.start_service, "ingest")
    final = await world.wait("e2e-term-1")
    assert final["status"] == "done", final
    assert len(world.crm.for_call("e2e-term-1")) == 1


async def test_crm_service_stops_cleanly_and_remembers_deliveries(world: World, two_calls: dict[str, dict]) -> None:
    from callcenter.v1 import crm_pb2, crm_pb2_grpc

    address = world.mesh.services["crm"].address
    assert await asyncio.to_thread(world.mesh.stop_service, "crm") == 0
    # Same address again: ingest keeps talking to it.
    svc = await asyncio.to_thread(world.mesh.start_service, "crm", {"CRM_SYNC_LISTEN": address})
    async with client_channel(svc.address, world.tls) as channel:
        reply = await crm_pb2_grpc.CrmSyncServiceStub(channel).GetDelivery(
            crm_pb2.GetDeliveryRequest(call_id="e2e-es-1"), timeout=10)
    assert reply.delivery.state == crm_pb2.DELIVERY_STATE_DELIVERED


@pytest.mark.parametrize("service", ["transcribe", "analyze", "crm"])
async def test_services_refuse_clients_without_a_mesh_certificate(world: World, service: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = world.mesh.services[service].address
    ca_only = TlsSettings(None, None, world.tls.ca, False, "")
    for tls in (PLAINTEXT, ca_only):
        async with client_channel(address, tls) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    async with client_channel(address, world.tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
