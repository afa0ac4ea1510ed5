"""Transcribe on an NVIDIA GPU (``WHISPER_DEVICE=cuda``): the same service, the same model, float16.

These run where CTranslate2 sees a CUDA device and are skipped elsewhere; the rest of the suite
checks the same behaviour on the CPU.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from callcenter.v1 import transcribe_pb2, transcribe_pb2_grpc
from services.common.grpc_server import ServiceBinding, client_channel, start_server
from services.common.limits import AdmissionLimiter
from services.transcribe.config import DecodeSettings, EngineSettings, cuda_device_count
from services.transcribe.engine import WhisperEngine
from services.transcribe.servicer import TranscriptionServicer

pytestmark = pytest.mark.skipif(cuda_device_count() == 0, reason="no CUDA device for CTranslate2 on this machine")

SERVICE_NAME = transcribe_pb2.DESCRIPTOR.services_by_name["TranscriptionService"].full_name


def gpu_engine(whisper_dir: Path, num_workers: int = 1, **decode: object) -> WhisperEngine:
    settings = EngineSettings(model_path=whisper_dir, device="cuda", compute_type="float16",
                              num_workers=num_workers, decode=DecodeSettings(**decode))
    return WhisperEngine(settings)


@pytest.fixture(scope="module")
def engine(whisper_dir: Path) -> WhisperEngine:
    return gpu_engine(whisper_dir)


async def transcribe(engine: WhisperEngine, paths: list[Path]) -> list[list[transcribe_pb2.TranscribeResponse]]:
    """Stream each recording through a real server on 127.0.0.1 port 0, all at once."""
    servicer = TranscriptionServicer(engine, AdmissionLimiter(len(paths), 0), max_audio_bytes=64 * 1024 * 1024)
    binding = ServiceBinding(SERVICE_NAME,
                             lambda s: transcribe_pb2_grpc.add_TranscriptionServiceServicer_to_server(servicer, s))
    server = await start_server("127.0.0.1:0", [binding])

    async def one(path: Path) -> list[transcribe_pb2.TranscribeResponse]:
        async def requests():
            yield transcribe_pb2.TranscribeRequest(config=transcribe_pb2.TranscriptionConfig(call_id=path.stem))
            yield transcribe_pb2.TranscribeRequest(audio=path.read_bytes())

        async with client_channel(server.address) as channel:
            stub = transcribe_pb2_grpc.TranscriptionServiceStub(channel)
            return [r async for r in stub.Transcribe(requests(), timeout=120)]

    try:
        return list(await asyncio.gather(*(one(p) for p in paths)))
    finally:
        await server.stop(1)


def text_of(responses: list[transcribe_pb2.TranscribeResponse]) -> str:
    return " ".join(r.segment.text for r in responses if r.HasField("segment")).lower()


def test_the_engine_loads_the_model_on_the_gpu(engine: WhisperEngine) -> None:
    assert engine.model.model.device == "cuda"
    assert engine.model.model.compute_type == "float16"


def test_auto_picks_the_gpu_in_float16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHISPER_DEVICE", "auto")
    monkeypatch.delenv("WHISPER_COMPUTE_TYPE", raising=False)
    settings = EngineSettings.from_env()
    assert (settings.device, settings.compute_type) == ("cuda", "float16")


async def test_on_the_gpu_the_rpc_streams_language_segments_and_summary(engine: WhisperEngine,
                                                                        audio_dir: Path) -> None:
    [responses] = await transcribe(engine, [audio_dir / "es-billing-angry.wav"])
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[0] == "language" and kinds[-1] == "summary" and set(kinds[1:-1]) == {"segment"}
    assert responses[0].language.language_code == "es"
    assert "factura" in text_of(responses)


async def test_on_the_gpu_a_long_call_keeps_its_first_piece_and_every_window(engine: WhisperEngine,
                                                                           audio_dir: Path) -> None:
    [responses] = await transcribe(engine, [audio_dir / "long-en.wav"])
    assert responses[0].language.language_code == "en"
    segments = [r.segment for r in responses if r.HasField("segment")]
    starts = [s.start_offset.ToTimedelta() for s in segments]
    assert starts == sorted(starts) and segments[-1].end_offset.ToTimedelta().total_seconds() > 25
    assert text_of(responses).count("invoice") == 3


def test_on_the_gpu_detection_and_the_first_window_share_one_encoder_pass(whisper_dir: Path,
                                                                         audio_dir: Path) -> None:
    from services.transcribe.encoder_memo import EncoderCounts
    from services.transcribe.engine import SegmentResult, SummaryResult, TranscribeOptions

    engine = gpu_engine(whisper_dir, first_piece_seconds=0)
    out = list(engine.run(audio_dir / "es-billing-angry.wav", TranscribeOptions()))
    summary = next(e for e in out if isinstance(e, SummaryResult))
    text = " ".join(e.text for e in out if isinstance(e, SegmentResult)).lower()
    assert summary.language == "es" and "factura" in text
    assert engine.model.counts == EncoderCounts(encoded=1, reused=1)  # the memo holds the GPU's encoder output


async def test_on_the_gpu_calls_decoded_at_once_read_as_they_do_alone(whisper_dir: Path, audio_dir: Path) -> None:
    engine = gpu_engine(whisper_dir, num_workers=2)
    calls = [audio_dir / "long-en.wav", audio_dir / "es-billing-angry.wav"]
    alone = [(await transcribe(engine, [path]))[0] for path in calls]
    together = await transcribe(engine, calls)
    assert [text_of(r) for r in together] == [text_of(r) for r in alone]
    assert [r[0].language.language_code for r in together] == ["en", "es"]
