"""Bare faster-whisper, the baseline of the transcription benchmarks.

Kept apart from the benchmark code so the memory baseline's process imports no more
than faster-whisper and the service's decoding settings (no gRPC, no mesh).
"""

from __future__ import annotations

import time
from pathlib import Path

from faster_whisper import WhisperModel

from services.transcribe.config import EngineSettings
from services.transcribe.engine import TranscribeOptions, decode_kwargs


def bare_whisper(settings: EngineSettings) -> WhisperModel:
    """faster-whisper's own ``WhisperModel``, loaded as the service loads its model."""
    return WhisperModel(str(settings.model_path), device=settings.device, compute_type=settings.compute_type,
                        cpu_threads=settings.cpu_threads, num_workers=settings.num_workers, local_files_only=True)


def transcribe_direct(model: WhisperModel, settings: EngineSettings, path: Path) -> tuple[float, int]:
    """One call through bare faster-whisper with the service's decoding settings; (seconds, segments)."""
    started = time.perf_counter()
    segments, _ = model.transcribe(str(path), **decode_kwargs(settings.decode, TranscribeOptions(), None))
    count = sum(1 for _ in segments)
    return time.perf_counter() - started, count
