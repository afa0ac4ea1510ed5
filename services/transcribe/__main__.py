"""``python -m services.transcribe``: load Whisper once, serve TranscriptionService until SIGTERM."""

from __future__ import annotations

import logging
import os

from callcenter.v1 import transcribe_pb2, transcribe_pb2_grpc
from services.common.config import data_dir
from services.common.grpc_server import ServiceBinding, serve
from services.common.limits import AdmissionLimiter
from services.common.telemetry import run_service
from services.transcribe.config import TranscribeSettings, keep_compiled_kernels
from services.transcribe.engine import WhisperEngine
from services.transcribe.servicer import TranscriptionServicer

SERVICE = "transcribe"
log = logging.getLogger(SERVICE)


def build(settings: TranscribeSettings) -> tuple[TranscriptionServicer, ServiceBinding]:
    engine = WhisperEngine(settings.engine)
    if settings.warm_up:
        log.info("warmed up: one decode on device=%s in %.1f s", settings.engine.device, engine.warm_up())
    servicer = TranscriptionServicer(engine, AdmissionLimiter(settings.max_concurrent, settings.max_queued),
                                     settings.max_audio_bytes)
    name = transcribe_pb2.DESCRIPTOR.services_by_name["TranscriptionService"].full_name
    return servicer, ServiceBinding(name, lambda s: transcribe_pb2_grpc.add_TranscriptionServiceServicer_to_server(servicer, s))


async def amain() -> None:
    settings = TranscribeSettings.from_env()
    _, binding = build(settings)
    await serve(SERVICE, settings.server, [binding])


def main() -> None:
    keep_compiled_kernels(os.environ, data_dir())  # before CUDA starts
    run_service(SERVICE, amain)


if __name__ == "__main__":
    main()
