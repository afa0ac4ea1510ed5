"""Settings of the transcribe service, from the environment."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from services.common.config import (
    ConfigError,
    GrpcServerSettings,
    data_dir,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_str,
)

STEREO_MODES = ("channels", "mix")


def cuda_device_count() -> int:
    """How many CUDA devices CTranslate2 sees (0 without a driver or a GPU)."""
    import ctranslate2

    try:
        return ctranslate2.get_cuda_device_count()
    except RuntimeError:  # a CUDA build that finds no driver
        return 0


def keep_compiled_kernels(environ: MutableMapping[str, str], root: Path) -> Path | None:
    """Point CUDA's kernel cache into the data directory, unless ``CUDA_CACHE_PATH`` or
    ``CUDA_CACHE_DISABLE`` says otherwise, and return where (None when left alone).

    A process's first decode on a GPU has CUDA compile GPU kernels for the card (14-19 s on an
    H100, the warm-up's whole cost there); CUDA keeps them under ``~/.nv``, which a container loses
    when it is recreated and which a user without a writable home never gets. In the data
    directory (a volume in the containers), a restart reuses them. Set before CUDA starts."""
    if "CUDA_CACHE_PATH" in environ or environ.get("CUDA_CACHE_DISABLE", "0") not in ("", "0"):
        return None
    path = root / "cuda-cache"
    environ["CUDA_CACHE_PATH"] = str(path)
    return path


@dataclass(frozen=True)
class DecodeSettings:
    """faster-whisper decoding options; defaults chosen to hold on hard (synthetic, telephone) audio."""

    beam_size: int = 5
    temperature: float = 0.0
    condition_on_previous_text: bool = False
    no_repeat_ngram_size: int = 3
    repetition_penalty: float = 1.1
    vad_filter: bool = True
    compression_ratio_threshold: float = 2.4
    no_speech_threshold: float = 0.6
    language_detection_segments: int = 3
    language_min_probability: float = 0.5  # below: the call's language is flagged as uncertain
    hallucination_silence_threshold: float = 0.0  # >0: skip silences this long around suspect text (word timings on)
    batch_size: int = 0  # >0: faster-whisper's BatchedInferencePipeline with this many windows at once
    per_segment_language: bool = False  # detect each segment's language (calls that switch language)
    chunk_seconds: float = 300.0  # longer recordings are decoded in pieces of about this length (0: whole)
    first_piece_seconds: float = 6.0  # >0: a call's first piece is this short, for an early first segment
    first_piece_min_probability: float = 0.75  # below: the 10 s of speech after it, then the first window, decide
    languages: tuple[str, ...] = ()  # detection picks among these (empty: any language Whisper knows)
    stereo_mode: str = "channels"  # stereo calls: "channels" decodes each alone; "mix" decodes the mix once
    fit_context: bool = True  # the encoder reads a short window's content, not its 30-s padding
    word_times: bool = True  # mono (and mixed stereo) calls timed by their words, as stereo channels are

    @classmethod
    def from_env(cls) -> "DecodeSettings":
        d = cls()
        settings = cls(
            beam_size=env_int("WHISPER_BEAM_SIZE", d.beam_size, minimum=1),
            temperature=env_float("WHISPER_TEMPERATURE", d.temperature, minimum=0.0),
            condition_on_previous_text=env_bool("WHISPER_CONDITION_ON_PREVIOUS_TEXT", d.condition_on_previous_text),
            no_repeat_ngram_size=env_int("WHISPER_NO_REPEAT_NGRAM_SIZE", d.no_repeat_ngram_size, minimum=0),
            repetition_penalty=env_float("WHISPER_REPETITION_PENALTY", d.repetition_penalty, minimum=0.0),
            vad_filter=env_bool("WHISPER_VAD", d.vad_filter),
            compression_ratio_threshold=env_float("WHISPER_COMPRESSION_RATIO_THRESHOLD", d.compression_ratio_threshold),
            no_speech_threshold=env_float("WHISPER_NO_SPEECH_THRESHOLD", d.no_speech_threshold),
            language_detection_segments=env_int("WHISPER_LANGUAGE_DETECTION_SEGMENTS", d.language_detection_segments, minimum=1),
            language_min_probability=env_float("WHISPER_LANGUAGE_MIN_PROBABILITY", d.language_min_probability,
                                               minimum=0.0),
            hallucination_silence_threshold=env_float("WHISPER_HALLUCINATION_SILENCE_THRESHOLD",
                                                      d.hallucination_silence_threshold, minimum=0.0),
            batch_size=env_int("WHISPER_BATCH_SIZE", d.batch_size, minimum=0),
            per_segment_language=env_bool("WHISPER_PER_SEGMENT_LANGUAGE", d.per_segment_language),
            chunk_seconds=env_float("WHISPER_CHUNK_SECONDS", d.chunk_seconds, minimum=0.0),
            first_piece_seconds=env_float("WHISPER_FIRST_PIECE_SECONDS", d.first_piece_seconds, minimum=0.0),
            first_piece_min_probability=env_float("WHISPER_FIRST_PIECE_MIN_PROBABILITY",
                                                  d.first_piece_min_probability, minimum=0.0),
            languages=tuple(code.lower() for code in env_list("WHISPER_LANGUAGES")),
            stereo_mode=env_str("WHISPER_STEREO_MODE", d.stereo_mode).lower(),
            fit_context=env_bool("WHISPER_FIT_CONTEXT", d.fit_context),
            word_times=env_bool("WHISPER_WORD_TIMES", d.word_times),
        )
        if settings.stereo_mode not in STEREO_MODES:
            raise ConfigError(f"WHISPER_STEREO_MODE must be one of {', '.join(STEREO_MODES)}, "
                              f"not {settings.stereo_mode!r}")
        if settings.batch_size and not settings.vad_filter:
            raise ConfigError("WHISPER_BATCH_SIZE needs WHISPER_VAD=1: batched decoding cuts the audio at pauses")
        return settings


@dataclass(frozen=True)
class EngineSettings:
    """Which Whisper model runs where."""

    model_path: Path
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 0
    num_workers: int = 1
    decode: DecodeSettings = DecodeSettings()

    @classmethod
    def from_env(cls) -> "EngineSettings":
        device = env_str("WHISPER_DEVICE", "cpu")
        if device not in {"cpu", "cuda", "auto"}:
            raise ConfigError(f"WHISPER_DEVICE={device!r}: use cpu, cuda or auto")
        if device == "auto":  # decided here, so that the compute type follows the device
            device = "cuda" if cuda_device_count() else "cpu"
        default_compute = "float16" if device == "cuda" else "int8"
        workers = env_int("TRANSCRIBE_MAX_CONCURRENT", 1, minimum=1)
        return cls(
            model_path=Path(env_str("WHISPER_MODEL", str(data_dir() / "models" / "whisper-base"))),
            device=device,
            compute_type=env_str("WHISPER_COMPUTE_TYPE", default_compute),
            cpu_threads=env_int("WHISPER_CPU_THREADS", os.cpu_count() or 1, minimum=0),
            num_workers=workers,
            decode=DecodeSettings.from_env(),
        )


@dataclass(frozen=True)
class TranscribeSettings:
    server: GrpcServerSettings
    engine: EngineSettings
    max_concurrent: int
    max_queued: int
    max_audio_bytes: int
    warm_up: bool = True  # decode once before serving (see WhisperEngine.warm_up)

    @classmethod
    def from_env(cls) -> "TranscribeSettings":
        engine = EngineSettings.from_env()
        return cls(
            server=GrpcServerSettings.from_env("TRANSCRIBE", 50051, 9101),
            engine=engine,
            max_concurrent=engine.num_workers,
            max_queued=env_int("TRANSCRIBE_MAX_QUEUED", 8, minimum=0),
            max_audio_bytes=env_int("TRANSCRIBE_MAX_AUDIO_BYTES", 2 * 1024**3, minimum=1),
            warm_up=env_bool("WHISPER_WARM_UP", True),
        )
