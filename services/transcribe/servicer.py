"""gRPC face of the Whisper engine: protobuf in, engine events out as protobuf."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import tempfile
import threading
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from callcenter.v1 import common_pb2, transcribe_pb2, transcribe_pb2_grpc
from services.common.limits import ADMITTED_METADATA, NO_ROOM_ERRNOS, AdmissionLimiter, Overloaded
from services.common.logs import call_context
from services.common.metrics import DURATION_BUCKETS, meter
from services.common.protoconv import duration
from services.common.records import SPEAKER_VALUES
from services.common.telemetry import tracer
from services.transcribe.engine import (
    AudioDecodeError,
    LanguageResult,
    SegmentResult,
    SummaryResult,
    TranscribeOptions,
    WhisperEngine,
)

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
_meter = meter(__name__)
_decode_seconds = _meter.create_histogram(
    "callmesh.transcribe.decode.duration", unit="s", description="Time to decode one recording",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
_rtf = _meter.create_histogram(
    "callmesh.transcribe.realtime_factor", description="Decode time divided by audio duration (below 1: faster than "
    "real time)", explicit_bucket_boundaries_advisory=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 4))
_audio_seconds = _meter.create_counter("callmesh.transcribe.audio", unit="s", description="Audio transcribed")
_rejected = _meter.create_counter("callmesh.transcribe.rejected", description="Streams refused (reason)")

_SPOOL_IN_MEMORY = 8 * 1024 * 1024
_DONE = object()
_DRAIN_BYTES_AT_LEAST = 64 * 1024 * 1024


def options_from_config(config: transcribe_pb2.TranscriptionConfig) -> TranscribeOptions:
    return TranscribeOptions(
        language=config.language_code.strip().lower() or None,
        stereo=config.channel_layout == transcribe_pb2.CHANNEL_LAYOUT_STEREO,
        agent_channel="right" if config.agent_channel == transcribe_pb2.AGENT_CHANNEL_RIGHT else "left",
        word_timestamps=config.word_timestamps,
        hotwords=tuple(h for h in config.hotwords if h.strip()),
        per_segment_language=config.detect_language_per_segment or None,
        task="translate" if config.task == transcribe_pb2.TRANSCRIPTION_TASK_TRANSLATE else "transcribe",
    )


def to_response(event: LanguageResult | SegmentResult | SummaryResult) -> transcribe_pb2.TranscribeResponse:
    if isinstance(event, LanguageResult):
        return transcribe_pb2.TranscribeResponse(language=transcribe_pb2.LanguageDetection(
            language_code=event.code, probability=event.probability, from_hint=event.from_hint,
            audio_duration=duration(event.audio_duration)))
    if isinstance(event, SegmentResult):
        return transcribe_pb2.TranscribeResponse(segment=common_pb2.TranscriptSegment(
            index=event.index, start_offset=duration(event.start), end_offset=duration(event.end),
            text=event.text, speaker=SPEAKER_VALUES[event.speaker], channel=event.channel,
            avg_logprob=event.avg_logprob, no_speech_prob=event.no_speech_prob, language_code=event.language,
            words=[common_pb2.Word(text=w.text, start_offset=duration(w.start), end_offset=duration(w.end),
                                   probability=w.probability) for w in event.words],
        ))
    return transcribe_pb2.TranscribeResponse(summary=transcribe_pb2.TranscriptionSummary(
        language_code=event.language, language_probability=event.language_probability,
        audio_duration=duration(event.audio_duration), speech_duration=duration(event.speech_duration),
        segment_count=event.segment_count, processing_time=duration(event.processing_time), model=event.model,
        statistics=event.statistics.to_proto(), language_uncertain=event.language_uncertain,
    ))


class TranscriptionServicer(transcribe_pb2_grpc.TranscriptionServiceServicer):
    """Receives a recording, streams back its transcript as it is decoded."""

    def __init__(self, engine: WhisperEngine, limiter: AdmissionLimiter, max_audio_bytes: int,
                 drain_seconds: float = 30.0) -> None:
        self.engine = engine
        self.limiter = limiter
        self.max_audio_bytes = max_audio_bytes
        self.drain_seconds = drain_seconds  # how long a refused stream is read before its status goes out

    async def Transcribe(self, request_iterator: AsyncIterator[transcribe_pb2.TranscribeRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[transcribe_pb2.TranscribeResponse]:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("request") != "config":
            await self._refuse(request_iterator, context,
                               "the first message must carry the config, audio follows in later messages")
        config = first.config
        with call_context(config.call_id or "-"), tempfile.SpooledTemporaryFile(_SPOOL_IN_MEMORY) as spool:
            try:
                async with contextlib.AsyncExitStack() as admitted:
                    # A client that awaits admission learns on its config alone whether the service takes the
                    # stream, before it uploads. Any other is answered once it has sent everything (refused
                    # while it still writes, its call would end as INTERNAL, not as the RESOURCE_EXHAUSTED it
                    # should retry on), so admission is decided then, as room may have been made meanwhile.
                    if config.await_admission:
                        await self._admit(admitted, context)
                    size = await self._receive_audio(request_iterator, spool, context)
                    log.info("received %d bytes of audio", size)
                    spool.seek(0)
                    if not config.await_admission:
                        await self._admit(admitted, context)
                    async with self.limiter.run_slot():
                        async for response in self._decode(spool, options_from_config(config), config.call_id):
                            yield response
            except Overloaded as exc:
                _rejected.add(1, {"reason": "overloaded"})
                log.warning("rejected %s: %s", "before its audio was sent" if config.await_admission
                            else "once its audio was received", exc)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except _InvalidAudio as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _admit(self, admitted: contextlib.AsyncExitStack, context: grpc.aio.ServicerContext) -> None:
        """Take a place in the limiter for the rest of the stream (or raise Overloaded), and say so to the client."""
        await admitted.enter_async_context(self.limiter.admit())
        await context.send_initial_metadata(((ADMITTED_METADATA, "1"),))

    async def _receive_audio(self, request_iterator, spool, context: grpc.aio.ServicerContext) -> int:
        size = 0
        async for message in request_iterator:
            if message.WhichOneof("request") != "audio":
                await self._refuse(request_iterator, context, "only the first message may carry a config")
            size += len(message.audio)
            if size > self.max_audio_bytes:
                await self._refuse(request_iterator, context, f"the recording is over the {self.max_audio_bytes}"
                                   "-byte limit (TRANSCRIBE_MAX_AUDIO_BYTES)")
            try:
                spool.write(message.audio)  # past 8 MiB, to a file in the temporary directory
            except OSError as exc:
                if exc.errno not in NO_ROOM_ERRNOS:
                    raise
                _rejected.add(1, {"reason": "no_room"})
                log.warning("refused a stream: no room for its audio in %s (%s)", tempfile.gettempdir(), exc.strerror)
                await self._drain(request_iterator)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"no room to hold the audio until it is decoded ({exc.strerror}, in "
                                    f"{tempfile.gettempdir()}); send it again later")
        if size == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no audio was sent after the config")
        return size

    async def _refuse(self, request_iterator, context: grpc.aio.ServicerContext, reason: str) -> NoReturn:
        """INVALID_ARGUMENT with ``reason``, once the client has sent its whole stream (see :meth:`_drain`):
        aborted while the client still writes, the call ends on the client as INTERNAL "Internal error from
        Core", without the reason, and a client such as ingest cannot tell that sending again is useless."""
        await self._drain(request_iterator)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)

    async def _drain(self, request_iterator) -> int:
        """Read and drop the rest of a refused stream, so that its status reaches the client intact; return the
        audio bytes dropped. Bounded: at most TRANSCRIBE_MAX_AUDIO_BYTES more (64 MiB when that is less) and
        ``drain_seconds``, after which the status goes out mid-stream (a client that keeps sending, or stalls
        without ending its stream, holds nothing longer than that)."""
        dropped = 0
        try:
            async with asyncio.timeout(self.drain_seconds):
                async for message in request_iterator:
                    dropped += len(message.audio)
                    if dropped > max(self.max_audio_bytes, _DRAIN_BYTES_AT_LEAST):
                        log.warning("refused stream: stopped reading after %d more bytes", dropped)
                        break
        except TimeoutError:
            log.warning("refused stream: stopped reading after %.0f s (%d more bytes)", self.drain_seconds, dropped)
        return dropped

    async def _decode(self, source, options: TranscribeOptions, call_id: str) -> AsyncIterator[transcribe_pb2.TranscribeResponse]:
        """Run the blocking engine in a thread and hand its events over as they come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                for event in self.engine.run(source, options, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as exc:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        with _tracer.start_as_current_span("whisper.decode", attributes={
            "callmesh.call_id": call_id, "whisper.model": self.engine.model_name,
            "whisper.stereo": options.stereo, "whisper.language_hint": options.language or "",
        }) as span:
            # In this context (the call's id, its decode span): the engine's and faster-whisper's log lines name
            # the call and its trace, as the servicer's do.
            thread = threading.Thread(target=contextvars.copy_context().run, args=(work,), name=f"decode-{call_id}",
                                      daemon=True)
            thread.start()
            ended = False  # the engine's thread ended on its own: done, or failed
            try:
                while True:
                    event = await queue.get()
                    ended = event is _DONE or isinstance(event, BaseException)
                    if event is _DONE:
                        break
                    if isinstance(event, AudioDecodeError):
                        span.record_exception(event)
                        raise _InvalidAudio(str(event))
                    if isinstance(event, BaseException):
                        raise event
                    if isinstance(event, SegmentResult):
                        span.add_event("segment", {"index": event.index, "start": event.start, "end": event.end,
                                                   "speaker": event.speaker})
                    elif isinstance(event, LanguageResult):
                        span.set_attribute("whisper.language", event.code)
                        log.info("language %s (p=%.2f%s)", event.code, event.probability, ", hint" if event.from_hint else "")
                    else:
                        span.set_attribute("whisper.segments", event.segment_count)
                        span.set_attribute("whisper.audio_seconds", event.audio_duration)
                        log.info("decoded %.1f s of audio into %d segments in %.1f s", event.audio_duration,
                                 event.segment_count, event.processing_time)
                        _decode_seconds.record(event.processing_time)
                        _audio_seconds.add(event.audio_duration)
                        if event.audio_duration > 0:
                            _rtf.record(event.processing_time / event.audio_duration)
                    yield to_response(event)
            finally:
                if not ended:  # the client went away mid-decode: stop the engine
                    cancel.set()
                    log.info("stream ended early: stopping the decode")
                if thread.is_alive():  # a thread that ended on its own may not have returned quite yet
                    await asyncio.to_thread(thread.join)


class _InvalidAudio(Exception):
    """The engine could not decode the recording."""
