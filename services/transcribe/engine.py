"""The Whisper engine: faster-whisper behind plain Python types, no gRPC.

``WhisperEngine.run`` is a blocking generator meant for a worker thread: it
decodes the recording, yields the language as soon as it is known, then each
segment as faster-whisper yields it, then a summary. Setting the ``cancel``
event stops it between segments.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import numpy as np

from services.transcribe.statistics import CallStats, call_statistics
from services.transcribe.config import DecodeSettings, EngineSettings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30  # Whisper reads audio in windows this long
# An unsure first piece's language is detected again over this much of the speech that follows the piece (speech
# not heard yet) before a whole window's: with a fitted window that costs less than half as much, and on the
# evaluation set it settled most of the calls that left the first piece unsure, right, and no call wrongly.
NEXT_SECONDS = 10
SPLIT_GAP_SECONDS = 1.0  # a pause this long inside a segment timed by its words: split there
Speaker = Literal["agent", "customer", "unknown"]


class AudioDecodeError(ValueError):
    """The recording is not audio FFmpeg can decode, or holds no samples."""


class ChannelEnergy:
    """How loud each channel of a stereo call is over time (10-ms frames), to tell which channel a
    stretch of the mix came from: a contact center records the agent on one and the customer on the
    other, and each hears the other only faintly, if at all."""

    FRAMES_PER_SECOND = 100

    def __init__(self, left: np.ndarray, right: np.ndarray) -> None:
        frame = SAMPLE_RATE // self.FRAMES_PER_SECOND
        n = min(left.size, right.size) // frame * frame

        def running(channel: np.ndarray) -> np.ndarray:
            per_frame = np.empty(n // frame, dtype=np.float64)
            block = frame * 60 * self.FRAMES_PER_SECOND  # a minute at a time: no copy of the whole call
            for at in range(0, n, block):
                part = np.ascontiguousarray(channel[at:min(at + block, n)]).reshape(-1, frame)
                per_frame[at // frame:at // frame + part.shape[0]] = np.einsum("ij,ij->i", part, part)
            return np.concatenate(([0.0], np.cumsum(per_frame)))

        self._sums = (running(left), running(right))
        self._frames = n // frame

    def louder(self, start: float, end: float) -> int:
        """0 (left) or 1 (right): the channel with more energy between ``start`` and ``end`` seconds."""
        a = min(max(int(start * self.FRAMES_PER_SECOND), 0), self._frames)
        b = min(max(int(np.ceil(end * self.FRAMES_PER_SECOND)), a + 1), self._frames)
        if b <= a:
            return 0
        left, right = (float(s[b] - s[a]) for s in self._sums)
        return 0 if left >= right else 1


def split_at_gaps(start: float, end: float, text: str, words: tuple["WordResult", ...], gap: float,
                  ) -> list[tuple[float, float, tuple["WordResult", ...], str]]:
    """A segment as (start, end, words, text) parts, cut wherever one word ends ``gap`` seconds or more
    before the next begins (one part when ``gap`` is 0 or nothing is that far apart)."""
    cuts = [i for i in range(1, len(words)) if gap > 0 and words[i].start - words[i - 1].end >= gap]
    if not cuts:
        return [(start, end, words, text)]
    parts = [words[a:b] for a, b in zip([0, *cuts], [*cuts, len(words)])]
    return [(start if i == 0 else part[0].start, end if i == len(parts) - 1 else part[-1].end, part,
             "".join(w.text for w in part).strip()) for i, part in enumerate(parts)]


class DecodeCancelled(Exception):
    """The caller went away; the decode stopped."""


class Diarizer(Protocol):
    """Who spoke when in a mono recording: the place for a diarization model.

    None ships as a package today, so mono calls are labelled "unknown"; a model that
    implements this (and maps its voices to "agent" and "customer") is passed to
    :class:`WhisperEngine` and labels each segment by the turn it overlaps most."""

    name: str

    def turns(self, audio: np.ndarray, sample_rate: int) -> list[tuple[float, float, "Speaker"]]:
        """(start, end, speaker) turns in seconds, in order."""
        ...


def speaker_of(start: float, end: float, turns: list[tuple[float, float, "Speaker"]]) -> "Speaker":
    """The speaker whose turns overlap [start, end] the most; "unknown" when none does."""
    overlap: dict[str, float] = {}
    for s, e, who in turns:
        shared = min(end, e) - max(start, s)
        if shared > 0:
            overlap[who] = overlap.get(who, 0.0) + shared
    return max(overlap, key=overlap.__getitem__) if overlap else "unknown"  # type: ignore[return-value]


@dataclass(frozen=True)
class TranscribeOptions:
    """What the caller asked for."""

    language: str | None = None
    stereo: bool = False
    agent_channel: Literal["left", "right"] = "left"
    word_timestamps: bool = False
    hotwords: tuple[str, ...] = ()
    per_segment_language: bool | None = None  # None: the engine's WHISPER_PER_SEGMENT_LANGUAGE
    task: Literal["transcribe", "translate"] = "transcribe"  # translate: English text from any language


@dataclass(frozen=True)
class WordResult:
    text: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class SegmentResult:
    index: int
    start: float
    end: float
    text: str
    speaker: Speaker
    channel: int
    avg_logprob: float
    no_speech_prob: float
    language: str
    words: tuple[WordResult, ...] = ()


@dataclass(frozen=True)
class LanguageResult:
    code: str
    probability: float
    from_hint: bool
    audio_duration: float = 0.0  # seconds: the recording's length, known before the first segment


@dataclass(frozen=True)
class SummaryResult:
    language: str
    language_probability: float
    audio_duration: float
    speech_duration: float
    segment_count: int
    processing_time: float
    model: str
    statistics: CallStats
    language_uncertain: bool


Event = LanguageResult | SegmentResult | SummaryResult
Labeller = Callable[[Iterator[SegmentResult]], Iterator[SegmentResult]]  # says who spoke each segment


NO_SPEECH = ("", 0.0)  # the language "detected" in a recording whose voice detection finds no speech


@dataclass
class DecodeInfo:
    """What the summary needs from faster-whisper's TranscriptionInfo, summed over the pieces of a long call."""

    language: str
    language_probability: float
    duration_after_vad: float


@dataclass
class EngineStats:
    """Counters the service and tests read to see what the engine is doing."""

    active: int = 0
    completed: int = 0
    cancelled: int = 0
    segments: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


def why_undecodable(source: str | Path | BinaryIO, exc: Exception) -> str:
    """What is wrong with a recording FFmpeg did not decode, in words: a file with no audio stream (a video or
    a picture sent for the call's recording), data in no format FFmpeg reads, or a file cut off before its
    audio; PyAV's own words (its "tuple index out of range" for the first) say none of that."""
    import av

    try:
        if not isinstance(source, (str, Path)):
            source.seek(0)
        with av.open(str(source) if isinstance(source, Path) else source, mode="r",
                     metadata_errors="ignore") as container:
            if not container.streams.audio:
                kinds = sorted({stream.type for stream in container.streams})
                held = f"only {' and '.join(kinds)}" if kinds else "no stream at all"
                return f"it has no audio stream, {held} (FFmpeg reads it as {container.format.name})"
    except Exception:  # noqa: BLE001 - the container does not open either: the error below says why
        pass
    if isinstance(exc, av.error.InvalidDataError):
        return "its data is in no audio format FFmpeg reads"
    if isinstance(exc, EOFError):
        return "it ends before its first whole piece of audio (a file cut off?)"
    return f"{type(exc).__name__}: {exc}"


def decode_audio(source: str | Path | BinaryIO, *, split_stereo: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Decode any container FFmpeg reads into 16 kHz float32 samples."""
    from faster_whisper import decode_audio as fw_decode

    try:
        audio = fw_decode(str(source) if isinstance(source, Path) else source,
                          sampling_rate=SAMPLE_RATE, split_stereo=split_stereo)
    except Exception as exc:  # PyAV raises several error types for bad input
        raise AudioDecodeError(f"the recording is not audio that can be decoded: {why_undecodable(source, exc)}") from exc
    first = audio[0] if split_stereo else audio
    if first.size == 0:
        raise AudioDecodeError("the recording holds no audio samples")
    return audio


def speech_only(audio: np.ndarray) -> np.ndarray:
    """``audio`` with its silences cut out, as faster-whisper's voice detection (default options) finds them."""
    from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

    return np.concatenate(collect_chunks(audio, get_speech_timestamps(audio, VadOptions()))[0])


def decode_kwargs(d: DecodeSettings, options: TranscribeOptions, language: str | None, *,
                  multilingual: bool = False, batched: bool = False) -> dict:
    """The keyword arguments of faster-whisper's ``transcribe`` for these settings (also what the
    benchmarks give bare faster-whisper, so both decode alike)."""
    kwargs = dict(
        language=language,
        task=options.task,
        beam_size=d.beam_size,
        temperature=d.temperature,
        condition_on_previous_text=d.condition_on_previous_text,
        no_repeat_ngram_size=d.no_repeat_ngram_size,
        repetition_penalty=d.repetition_penalty,
        compression_ratio_threshold=d.compression_ratio_threshold,
        no_speech_threshold=d.no_speech_threshold,
        vad_filter=d.vad_filter,
        word_timestamps=options.word_timestamps or d.word_times,  # returned only when the caller asks
        hotwords=" ".join(options.hotwords) or None,
        language_detection_segments=d.language_detection_segments,
        multilingual=multilingual,
    )
    if d.hallucination_silence_threshold > 0:
        # faster-whisper finds the silences from word timings, so they are computed (not returned unless asked).
        kwargs.update(hallucination_silence_threshold=d.hallucination_silence_threshold, word_timestamps=True)
    if batched:
        kwargs["batch_size"] = d.batch_size
    return kwargs


class WhisperEngine:
    """One loaded Whisper model, shared by every stream."""

    def __init__(self, settings: EngineSettings, diarizer: Diarizer | None = None) -> None:
        from faster_whisper import BatchedInferencePipeline

        from services.transcribe.encoder_memo import SharedEncoderWhisperModel

        if not (settings.model_path / "model.bin").is_file():
            raise FileNotFoundError(
                f"no Whisper model in {settings.model_path}: run `python -m callmesh.models` "
                "or point WHISPER_MODEL at a CTranslate2 Whisper directory"
            )
        self.settings = settings
        self.diarizer = diarizer
        self.model_name = settings.model_path.name
        started = time.perf_counter()
        try:
            self.model = SharedEncoderWhisperModel(
                str(settings.model_path),
                device=settings.device,
                compute_type=settings.compute_type,
                cpu_threads=settings.cpu_threads,
                num_workers=settings.num_workers,
                local_files_only=True,
                fit_context=settings.decode.fit_context,
            )
        except RuntimeError as exc:  # CTranslate2's words name a tensor, not the file or what to do
            raise RuntimeError(
                f"CTranslate2 could not load the Whisper model in {settings.model_path} on device={settings.device} "
                f"({exc}); files cut short or damaged are installed again with `python -m callmesh.models`") from exc
        # Batched decoding shares the loaded model: one copy of the weights either way.
        self.pipeline = BatchedInferencePipeline(self.model) if settings.decode.batch_size else None
        self.stats = EngineStats()
        log.info(
            "loaded Whisper model %s on device=%s compute_type=%s cpu_threads=%d workers=%d %s in %.1f s",
            self.model_name, settings.device, settings.compute_type, settings.cpu_threads, settings.num_workers,
            f"batched (batch_size={settings.decode.batch_size})" if self.pipeline else "sequential",
            time.perf_counter() - started,
        )

    def warm_up(self) -> float:
        """Decode two seconds of silence once, outside any call, and return the seconds it took.

        The device's first use happens here rather than in the first call: on a GPU, CUDA's start
        and the compiling of GPU kernels for the card (14-19 s for a fresh process on an
        H100, 0.4 s with the kernels kept: ``keep_compiled_kernels``); and a library that cannot be
        loaded stops the service at start instead of failing every call after it reports SERVING."""
        started = time.perf_counter()
        try:
            segments, _ = self.model.transcribe(
                np.zeros(2 * SAMPLE_RATE, dtype=np.float32), language="en", beam_size=self.settings.decode.beam_size,
                temperature=0.0, vad_filter=False, condition_on_previous_text=False, max_new_tokens=4)
            for _ in segments:
                pass
        except RuntimeError as exc:
            raise RuntimeError(f"Whisper cannot decode on device={self.settings.device} "
                               f"compute_type={self.settings.compute_type}: {exc}") from exc
        finally:
            self.model.forget()
        return time.perf_counter() - started

    def per_segment_language(self, options: TranscribeOptions) -> bool:
        """Each segment's language is detected when asked (or configured) and no hint fixes it."""
        wanted = self.settings.decode.per_segment_language if options.per_segment_language is None \
            else options.per_segment_language
        return wanted and not options.language

    def _transcribe_kwargs(self, options: TranscribeOptions, language: str | None) -> dict:
        return decode_kwargs(self.settings.decode, options, language,
                             multilingual=self.per_segment_language(options), batched=self.pipeline is not None)

    def _utterances(self, audio: np.ndarray, fallback: str) -> list[tuple[float, float, str]]:
        """Stretches of speech between pauses of half a second, each with the language spoken in it."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        out = []
        for chunk in get_speech_timestamps(audio, VadOptions(min_silence_duration_ms=500)):
            clip = audio[chunk["start"]:chunk["end"]]
            language = fallback
            if clip.size >= SAMPLE_RATE // 2:  # under half a second: too little to tell
                language, _ = self._allowed(*self.model.detect_language(
                    audio=clip, vad_filter=False, language_detection_segments=1))
            out.append((chunk["start"] / SAMPLE_RATE, chunk["end"] / SAMPLE_RATE, language))
        return out

    def run(self, source: str | Path | BinaryIO, options: TranscribeOptions,
            cancel: threading.Event | None = None) -> Iterator[Event]:
        """Transcribe ``source``; blocking, so run it off the event loop."""
        cancel = cancel or threading.Event()
        self.stats.add(active=1)
        started = time.perf_counter()
        finished = False
        try:
            if options.stereo:
                yield from self._run_stereo(source, options, cancel, started)
            else:
                yield from self._run_mono(source, options, cancel, started)
            finished = True
        finally:
            self.model.forget()
            self.stats.add(active=-1, completed=1 if finished else 0, cancelled=0 if finished else 1)

    def _uncertain(self, options: TranscribeOptions, language: str, probability: float) -> bool:
        """A detected language below the configured probability is flagged; a hint is never uncertain, nor is a
        recording without speech (it has no language)."""
        return not options.language and bool(language) and probability < self.settings.decode.language_min_probability

    def _check(self, cancel: threading.Event) -> None:
        if cancel.is_set():
            raise DecodeCancelled()

    def _pieces(self, audio: np.ndarray) -> list[tuple[int, int]]:
        """Sample ranges to decode one after the other, each cut at the quietest moment near its mark.

        With ``first_piece_seconds``, the first of a call longer than one window is that short, so its
        segments come back after one short decode instead of a whole 30-s window; the rest is cut in pieces
        of about ``chunk_seconds``. A call that fits one window is decoded whole: Whisper hears a short clip
        alone worse than inside its window (``bench/quality.py``), and the whole of it decodes in seconds."""
        n = audio.size
        head = int(self.settings.decode.first_piece_seconds * SAMPLE_RATE)
        if head > 0 and n > max(head * 2, WINDOW_SECONDS * SAMPLE_RATE):
            cut = self._quietest(audio, head, lo=SAMPLE_RATE, hi=n - SAMPLE_RATE,
                                 radius=min(2 * SAMPLE_RATE, head // 4))
            return [(0, cut)] + [(a + cut, b + cut) for a, b in self._even_pieces(audio[cut:])]
        return self._even_pieces(audio)

    def _even_pieces(self, audio: np.ndarray) -> list[tuple[int, int]]:
        """Ranges of about ``chunk_seconds`` each (even lengths, so none costs more memory than the others)."""
        size = int(self.settings.decode.chunk_seconds * SAMPLE_RATE)
        n = audio.size
        if size <= 0 or n <= size * 1.5:
            return [(0, n)]
        size = n // round(n / size)
        cuts = [0]
        while n - cuts[-1] > size * 1.5:
            # look for a pause this far either side of the mark
            cuts.append(self._quietest(audio, cuts[-1] + size, lo=cuts[-1] + SAMPLE_RATE, hi=n - SAMPLE_RATE,
                                       radius=min(30 * SAMPLE_RATE, size // 4)))
        return list(zip(cuts, [*cuts[1:], n]))

    @staticmethod
    def _quietest(audio: np.ndarray, target: int, *, lo: int, hi: int, radius: int) -> int:
        """The sample at the middle of the quietest half second within ``radius`` of ``target`` (kept in [lo, hi])."""
        frame = SAMPLE_RATE // 10  # 100 ms
        lo, hi = max(lo, target - radius), min(hi, target + radius)
        if hi - lo < 5 * frame:
            return max(lo, min(hi, target))
        window = audio[lo:lo + (hi - lo) // frame * frame].reshape(-1, frame)
        energy = np.convolve((window.astype(np.float64) ** 2).mean(axis=1), np.ones(5), mode="valid")
        return lo + (int(np.argmin(energy)) + 2) * frame + frame // 2

    def _segments(self, audio: np.ndarray, options: TranscribeOptions, language: str | None,
                  speaker: Speaker, channel: int, *, split_gap: float = 0.0,
                  ) -> tuple[Iterator[SegmentResult], "DecodeInfo"]:
        """Segments of the whole recording. A long one is decoded piece by piece (``WHISPER_CHUNK_SECONDS``):
        faster-whisper computes the features of everything it is given at once, so a one-hour call given
        whole costs gigabytes before the first segment; in pieces, memory stays that of one piece. With
        ``WHISPER_FIRST_PIECE_SECONDS`` the first piece is short, so the first segments come back early.
        With ``split_gap``, a segment is split wherever its words are that many seconds apart."""
        pieces = [(0, audio.size)] if self.per_segment_language(options) else self._pieces(audio)
        head = audio[pieces[0][0]:pieces[0][1]]
        detected = None
        if language is None:
            short = len(pieces) > 1 and self.settings.decode.first_piece_seconds > 0
            detected = self._detect_head(head, audio, short=short, per_segment=self.per_segment_language(options))
            if detected == NO_SPEECH:  # none anywhere in the recording: nothing to decode, and no language
                return iter(()), DecodeInfo(*NO_SPEECH, 0.0)
            language = detected[0] if detected else None
        first, first_info = self._decode(head, options, language, speaker, channel, split_gap=split_gap)
        info = DecodeInfo(*detected if detected else (first_info.language, float(first_info.language_probability)),
                          float(first_info.duration_after_vad))
        if len(pieces) == 1:
            return first, info

        def chained() -> Iterator[SegmentResult]:
            yield from first
            for a, b in pieces[1:]:
                # The language found in the first piece holds for the rest: one call, one language.
                segments, more = self._decode(audio[a:b], options, language or info.language, speaker, channel,
                                              split_gap=split_gap)
                offset = a / SAMPLE_RATE
                for seg in segments:
                    yield SegmentResult(**{**seg.__dict__, "start": seg.start + offset, "end": seg.end + offset,
                                           "words": tuple(WordResult(w.text, w.start + offset, w.end + offset,
                                                                     w.probability) for w in seg.words)})
                info.duration_after_vad += float(more.duration_after_vad)

        rest = (pieces[-1][1] - pieces[1][0]) / SAMPLE_RATE / (len(pieces) - 1)
        log.info("decoding %d pieces: the first %.1f s, then about %.0f s each", len(pieces),
                 (pieces[0][1] - pieces[0][0]) / SAMPLE_RATE, rest)
        return chained(), info

    def _decode(self, audio: np.ndarray, options: TranscribeOptions, language: str | None,
                speaker: Speaker, channel: int, *, split_gap: float = 0.0) -> tuple[Iterator[SegmentResult], object]:
        kwargs = self._transcribe_kwargs(options, language)
        if split_gap > 0:
            kwargs["word_timestamps"] = True  # where to split; returned only when asked for
        decoder = self.pipeline or self.model
        utterances: list[tuple[float, float, str]] = []
        if self.per_segment_language(options):
            # Whisper settles on one language per 30-s window, so a window where the caller switches
            # language loses the second one. Each utterance is decoded on its own instead, in the
            # language detected for it (sequential decoder: it takes clips in seconds).
            detected = language or self._detect(audio)[0]
            kwargs["language"] = detected  # the call's language; each window is still detected again
            utterances = self._utterances(audio, detected)
            decoder = self.model
            kwargs.update(vad_filter=False, clip_timestamps=[t for u in utterances for t in u[:2]] or "0")
            kwargs.pop("batch_size", None)
        segments, info = decoder.transcribe(audio, **kwargs)

        def language_at(start: float, end: float) -> str:
            middle = (start + end) / 2
            return next((lang for s, e, lang in utterances if s <= middle <= e),
                        min(utterances, key=lambda u: abs((u[0] + u[1]) / 2 - middle))[2] if utterances
                        else info.language)

        def convert() -> Iterator[SegmentResult]:
            for seg in segments:
                text = seg.text.strip()
                if not text:
                    continue
                words = tuple(
                    WordResult(w.word, float(w.start), float(w.end), float(w.probability)) for w in (seg.words or ())
                )
                for start, end, part, said in split_at_gaps(float(seg.start), float(seg.end), text, words, split_gap):
                    yield SegmentResult(
                        index=-1, start=start, end=end, text=said, speaker=speaker, channel=channel,
                        avg_logprob=float(seg.avg_logprob), no_speech_prob=float(seg.no_speech_prob),
                        language="en" if options.task == "translate" else
                        language_at(start, end) if utterances else info.language,
                        words=part if options.word_timestamps else (),
                    )

        return convert(), info

    def _numbered(self, segments: Iterator[SegmentResult], cancel: threading.Event) -> Iterator[SegmentResult]:
        for index, seg in enumerate(segments):
            self._check(cancel)
            self.stats.add(segments=1)
            yield SegmentResult(**{**seg.__dict__, "index": index})

    def _run_mono(self, source, options: TranscribeOptions, cancel: threading.Event, started: float) -> Iterator[Event]:
        audio = decode_audio(source)
        self._check(cancel)
        yield from self._run_one(audio, options, cancel, started,
                                 self._diarized(self.diarizer, audio) if self.diarizer is not None else None)

    @staticmethod
    def _diarized(diarizer: Diarizer, audio: np.ndarray) -> Labeller:
        def label(segments: Iterator[SegmentResult]) -> Iterator[SegmentResult]:
            turns = diarizer.turns(audio, SAMPLE_RATE)  # once the language is out, as the segments start
            for seg in segments:
                yield SegmentResult(**{**seg.__dict__, "speaker": speaker_of(seg.start, seg.end, turns)})

        return label

    def _run_mixed(self, source, options: TranscribeOptions, cancel: threading.Event,
                   started: float) -> Iterator[Event]:
        """``WHISPER_STEREO_MODE=mix``: the two channels decoded once, mixed, so Whisper hears the whole
        conversation as in a mono call; each segment goes to the channel that is louder over it."""
        left, right = decode_audio(source, split_stereo=True)
        self._check(cancel)
        energy = ChannelEnergy(left, right)
        mixed = left  # mixed in place: no third copy of the call
        mixed += right
        mixed *= 0.5
        del left, right
        agent = 0 if options.agent_channel == "left" else 1

        def label(segments: Iterator[SegmentResult]) -> Iterator[SegmentResult]:
            for seg in segments:
                channel = energy.louder(seg.start, seg.end)
                yield SegmentResult(**{**seg.__dict__, "channel": channel,
                                       "speaker": "agent" if channel == agent else "customer"})

        yield from self._run_one(mixed, options, cancel, started, label)

    def _run_one(self, audio: np.ndarray, options: TranscribeOptions, cancel: threading.Event, started: float,
                 label: Labeller | None) -> Iterator[Event]:
        """One decode of ``audio``; ``label`` (when given) says who spoke each segment.

        With ``WHISPER_WORD_TIMES`` (the default) the segments are timed by their words, as a stereo channel's are:
        faster-whisper otherwise dates the end of a segment that stops right before a pause its voice
        detection cut from the start of the speech after it, and the pause then counts as talk."""
        gap = SPLIT_GAP_SECONDS if self.settings.decode.word_times else 0.0
        segments, info = self._segments(audio, options, options.language, "unknown", 0, split_gap=gap)
        probability = 1.0 if options.language else float(info.language_probability)
        yield LanguageResult(info.language, probability, from_hint=bool(options.language),
                             audio_duration=audio.size / SAMPLE_RATE)
        if label is not None:
            segments = label(segments)
        spoken: list[tuple[str, float, float]] = []
        for seg in self._numbered(segments, cancel):
            spoken.append((seg.speaker, seg.start, seg.end))
            yield seg
        yield SummaryResult(
            language=info.language,
            language_probability=probability,
            audio_duration=audio.size / SAMPLE_RATE,
            speech_duration=float(info.duration_after_vad),
            segment_count=len(spoken),
            processing_time=time.perf_counter() - started,
            model=self.model_name,
            statistics=call_statistics(spoken, audio.size / SAMPLE_RATE),
            language_uncertain=self._uncertain(options, info.language, probability),
        )

    def _detect_head(self, head: np.ndarray, audio: np.ndarray, *, short: bool,
                     per_segment: bool = False) -> tuple[str, float] | None:
        """The call's language, detected on the first piece it is decoded in (None: no speech to tell from).

        The detection reads the very window the decoder reads first, so one encoder pass serves both.
        A short first piece (``WHISPER_FIRST_PIECE_SECONDS``) that leaves the detection below
        ``WHISPER_FIRST_PIECE_MIN_PROBABILITY`` is not trusted alone: the next :data:`NEXT_SECONDS` of speech
        after the piece are read, and when those leave it below that too, the call's first window of speech
        decides (an encoder pass each, before the first segment; the piece holds a fifth of that window's speech
        or less). With ``WHISPER_FIT_CONTEXT=0`` every window costs a whole one, so the first window decides at
        once.
        A first piece without speech (the line still rings, the caller waits on hold) leaves it to the call's first
        speech, wherever it starts. :data:`NO_SPEECH` when the whole recording holds none.
        With per-segment languages the whole call's first windows decide too (each utterance is detected later)."""
        try:
            if per_segment:
                return self._detect(audio)
            detected = self._detect_as_decoded(head)
            if detected == NO_SPEECH and head.size < audio.size:
                log.info("no speech in the first %.1f s: detecting the language over the call's first speech",
                         head.size / SAMPLE_RATE)
                detected = self._detect(audio, windows=1)
            elif short and detected[1] < self.settings.decode.first_piece_min_probability:
                log.info("language %s (p=%.2f) from the first piece alone is unsure: detecting over the speech "
                         "after it", *detected)
                detected = self._detect_surer(audio, after=head.size)
        except Exception:  # nothing to detect from: let the decoder decide
            log.debug("language detection failed; the decoder detects it", exc_info=True)
            return None
        return detected

    def _detect_surer(self, audio: np.ndarray, after: int) -> tuple[str, float]:
        """The language over the :data:`NEXT_SECONDS` of speech that follow the first piece (``audio[:after]``,
        whose speech was heard already), and, when that leaves it below ``WHISPER_FIRST_PIECE_MIN_PROBABILITY``
        or the call has no speech after the piece, over the call's first window of speech."""
        d = self.settings.decode
        if d.fit_context:
            speech = self._speech_head(audio[after:], NEXT_SECONDS * SAMPLE_RATE)
            if speech.size:
                detected = self._allowed(*self.model.detect_language(audio=speech, vad_filter=False))
                if detected[1] >= d.first_piece_min_probability:
                    return detected
                log.info("language %s (p=%.2f) over the next %.0f s of speech is unsure too: detecting over the "
                         "first window", *detected, speech.size / SAMPLE_RATE)
        return self._detect(audio, windows=1)

    def _detect_as_decoded(self, audio: np.ndarray) -> tuple[str, float]:
        """The language of ``audio``, from the features faster-whisper's ``transcribe`` decodes: its speech
        after VAD, the features computed over all of it, less the last frame (its decoder leaves that one
        out). The first window is then the same array in both, and :class:`SharedEncoderWhisperModel`
        encodes it once. :data:`NO_SPEECH` when voice detection finds none."""
        d = self.settings.decode
        speech = speech_only(audio) if d.vad_filter else audio
        if speech.size == 0:
            return NO_SPEECH
        features = self.model.feature_extractor(speech)
        return self._allowed(*self.model.detect_language(
            features=features[..., :max(features.shape[-1] - 1, 1)],
            language_detection_segments=d.language_detection_segments))

    def _detect(self, audio: np.ndarray, windows: int = 0) -> tuple[str, float]:
        """The language spoken, over the first ``windows`` windows of speech (default
        ``WHISPER_LANGUAGE_DETECTION_SEGMENTS``); with ``WHISPER_LANGUAGES`` set, the likeliest of those
        (its probability taken among them): a contact center knows which languages its callers speak.
        Only as much of the call is read as holds that speech (:meth:`_first_speech`; the first minutes of
        nearly every call), not the whole call: voice detection over an hour of audio would cost seconds before
        the first segment. :data:`NO_SPEECH` when voice detection finds none in the whole recording."""
        d = self.settings.decode
        windows = windows or d.language_detection_segments
        head = self._speech_head(audio, windows * WINDOW_SECONDS * SAMPLE_RATE)
        if head.size == 0:
            return NO_SPEECH
        return self._allowed(*self.model.detect_language(
            audio=head, vad_filter=False, language_detection_segments=windows))

    def _speech_head(self, audio: np.ndarray, wanted: int) -> np.ndarray:
        """The call's first ``wanted`` samples of speech (of audio, with ``WHISPER_VAD=0``)."""
        return self._first_speech(audio, wanted) if self.settings.decode.vad_filter else audio[:wanted]

    @staticmethod
    def _first_speech(audio: np.ndarray, wanted: int) -> np.ndarray:
        """The call's first ``wanted`` samples of speech. Voice detection reads one and a half times
        that much of the call first, and up to four times that much only when the first stretch holds
        too little speech: on a 30-s window, 45 s of audio instead of two minutes (0.11 s instead of 0.26 s
        on two cores, before the first segment of a call whose language is unsure). Past that (a long hold, a
        recording that starts long before anyone speaks) it reads on a stretch at a time until it has enough
        speech or the call ends."""
        speech = audio[:0]
        for span in (wanted * 3 // 2, wanted * 4):
            speech = speech_only(audio[:span])
            if speech.size >= wanted or span >= audio.size:
                return speech[:wanted]
        found, have = [speech], speech.size
        for start in range(span, audio.size, span):
            found.append(speech_only(audio[start:start + span]))
            have += found[-1].size
            if have >= wanted:
                break
        return np.concatenate(found)[:wanted]

    def _allowed(self, language: str, probability: float, ranked: list[tuple[str, float]]) -> tuple[str, float]:
        """A detection restricted to ``WHISPER_LANGUAGES`` (when set): the likeliest of those."""
        languages = self.settings.decode.languages
        if languages and language not in languages:
            allowed = [(code, p) for code, p in ranked if code in languages]
            total = sum(p for _, p in allowed)
            if allowed and total > 0:
                best, p = max(allowed, key=lambda item: item[1])
                log.info("detected %s (p=%.2f), not among WHISPER_LANGUAGES: taking %s", language, probability, best)
                language, probability = best, p / total
        return language, float(probability)

    def _run_stereo(self, source, options: TranscribeOptions, cancel: threading.Event, started: float) -> Iterator[Event]:
        if self.settings.decode.stereo_mode == "mix":
            yield from self._run_mixed(source, options, cancel, started)
            return
        left, right = decode_audio(source, split_stereo=True)
        self._check(cancel)
        if options.language:
            language, probability = options.language, 1.0
        else:
            language, probability = self._detect((left + right) / 2)
        yield LanguageResult(language, float(probability), from_hint=bool(options.language),
                             audio_duration=left.size / SAMPLE_RATE)
        agent_is_left = options.agent_channel == "left"
        # Each channel is decoded without its silences (VAD), where the other speaker talks. faster-whisper
        # then dates a segment that starts right after a removed silence from the end of the speech before
        # it, so a speaker's next turn could sort before the other speaker's turn in between; and one
        # segment can hold two turns. Word times are right, so each channel is decoded with them: segments start at their first
        # word and are split where their words stand apart. The call then reads in the order it was spoken.
        gap = SPLIT_GAP_SECONDS
        # Where the two mixed hold no speech, each channel is looked at on its own (a quiet one may hold some).
        left_segments, left_info = self._segments(left, options, language or None,
                                                  "agent" if agent_is_left else "customer", 0, split_gap=gap)
        right_segments, right_info = self._segments(right, options, language or None,
                                                    "customer" if agent_is_left else "agent", 1, split_gap=gap)
        merged = heapq.merge(left_segments, right_segments, key=lambda s: (s.start, s.channel))
        spoken: list[tuple[str, float, float]] = []
        heard = ""  # the first segment's language, where the two mixed held no speech
        for seg in self._numbered(merged, cancel):
            spoken.append((seg.speaker, seg.start, seg.end))
            heard = heard or seg.language
            yield seg
        yield SummaryResult(
            language=language or heard,
            language_probability=float(probability),
            audio_duration=left.size / SAMPLE_RATE,
            speech_duration=float(left_info.duration_after_vad) + float(right_info.duration_after_vad),
            segment_count=len(spoken),
            processing_time=time.perf_counter() - started,
            model=self.model_name,
            statistics=call_statistics(spoken, left.size / SAMPLE_RATE),
            language_uncertain=self._uncertain(options, language, float(probability)),
        )
