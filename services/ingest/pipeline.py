"""The pipeline worker: drives each claimed job through download, Transcribe, Analyze and CRM sync.

Each stage's outcome is written to the job store before the next begins, so a
restart resumes at the stage it stopped in. Transient failures are retried
with exponential backoff and jitter; a service that is down (UNAVAILABLE) or at
its limit (RESOURCE_EXHAUSTED) is waited for without using up the attempts;
permanent failures fail the call at once with the stage and the reason. Personal data
in what was said is masked as each segment comes from Transcribe, before it is stored
(``PII_REDACTION``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from callcenter.v1 import analyze_pb2, analyze_pb2_grpc, common_pb2, crm_pb2, crm_pb2_grpc, transcribe_pb2, transcribe_pb2_grpc
from services.common import pii
from services.common.database import UNAVAILABLE_ERRORS, OutageLog, delete_in_batches
from services.common.grpc_server import client_channel
from services.common.limits import ADMITTED_METADATA
from services.common.logs import call_context
from services.common.metrics import DURATION_BUCKETS, meter
from services.common.retry import backoff_delay, sleep_or_wake
from services.common.protoconv import duration, seconds, timestamp
from services.common.records import (
    SENTIMENT_NAMES, SENTIMENT_VALUES, record_to_json, segment_from_dict, segment_to_dict, sentiment_by_speaker,
    statistics_from_json, statistics_to_json,
)
from services.common.telemetry import context_from, tracer
from services.ingest.config import PipelineSettings
from services.ingest.downloader import DownloadError, Downloader
from services.ingest.store import (
    ANALYZING, DELIVERING, DONE, DOWNLOADING, FAILED, RECEIVED, TRANSCRIBING, Job, JobStore, LeaseLost,
)

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
_stage_seconds = meter(__name__).create_histogram(
    "callmesh.stage.duration", unit="s", description="One attempt at a pipeline stage (stage, outcome)",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS)

FRONT_STATES = (RECEIVED, DOWNLOADING, TRANSCRIBING)
BACK_STATES = (ANALYZING, DELIVERING)
BACK_STAGE_FACTOR = 3  # calls analysed or delivered at once: at most this many times PIPELINE_CONCURRENCY
FIRST_DELIVERY_POLL_SECONDS = 0.05  # the CRM's answer is first looked for this soon after the record is queued
TRANSIENT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
_SWEEP = "the sweep (calls and recordings past their retention, orphan recordings)"  # in its log lines
WAIT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}  # transient, and never give up


class StageError(Exception):
    def __init__(self, message: str, *, permanent: bool, waiting: bool = False, retry_in: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.waiting = waiting  # a dependency is down or busy: wait without using up attempts
        # Nothing failed, the call is early (a recording still being written): look again after this many
        # seconds, its attempts as they were, with the error as its status.
        self.retry_in = retry_in


class _Reschedule(Exception):
    """Nothing failed; look at this job again after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay


def _rpc_error(stage: str, exc: grpc.aio.AioRpcError) -> StageError:
    code = exc.code()
    message = f"{stage}: {code.name}: {exc.details()}"
    # Down (UNAVAILABLE) or at its limit (RESOURCE_EXHAUSTED: several ingest replicas can offer a service more
    # calls than it queues): the call waits its turn, however long, and never fails for it.
    return StageError(message, permanent=code not in TRANSIENT_CODES, waiting=code in WAIT_CODES)


def spoken_text(segments: list[dict]) -> str:
    """A call's text as the record carries it: the segments' text, one after the other."""
    return " ".join(s["text"].strip() for s in segments)


class SegmentMasking:
    """The call's segments as they come, with personal data masked before ingest stores them (off: as they are).

    Each segment is read with the few before it (:class:`services.common.pii.SegmentRedactor`), and a number that
    only the newest completes (a card read out a group at a time, a segment each) is masked in the earlier
    segments too, in :attr:`segments` as they stand."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.segments: list[dict] = []
        self._redactor = pii.SegmentRedactor()

    def add(self, segment: dict) -> None:
        self.segments.append(segment)
        if self.on:
            for k in self._redactor.add(segment["text"], _voice(segment)):
                self.segments[k] = {**self.segments[k], "text": self._redactor.masked(k)[0]}

    def settled(self) -> list[dict]:
        """The segments that progress may show and store before the call's transcript is complete: all but those
        from the first on that the next segments may still mask a part of (:meth:`pii.SegmentRedactor.first_open`:
        one with figures among those the next ones are read with)."""
        if not self.on:
            return self.segments
        return self.segments[:self._redactor.first_open()]


def _voice(segment: dict) -> tuple[Any, Any]:
    """Who said a segment, as :class:`SegmentMasking` tells its speakers apart: its speaker and channel."""
    return segment.get("speaker"), segment.get("channel")


def record_revision(job: Job) -> int:
    """The revision of the call's record: 1 for its first analysis, one more each time it is analysed again."""
    result = job.result or {}
    return int(result.get("revision") or (result.get("record") or {}).get("revision") or 1)


def delivery_poll_delay(waited: float, interval: float) -> float:
    """When to ask the crm service again about a record that has waited ``waited`` seconds for the CRM:
    after as long again, so that a CRM that answers in milliseconds gets its call done in milliseconds,
    not after a whole poll interval, and the looks come twice as far apart each time; and at most
    every ``interval`` (``DELIVERY_POLL_SECONDS``): a CRM that is down is polled no more often than that."""
    return min(interval, max(FIRST_DELIVERY_POLL_SECONDS, waited))


ANALYSIS_DEADLINE_AUDIO_SECONDS = 600.0  # each ANALYZE_TIMEOUT_SECONDS of deadline buys this much of the call


def analysis_deadline(audio_seconds: float | None, timeout_per_ten_minutes: float) -> float:
    """The deadline of a call's analysis: ``ANALYZE_TIMEOUT_SECONDS`` for each started ten minutes of the call.

    The LLM's work grows with the transcript, its line-by-line translation above all: with the 1.5B model on
    2 CPU cores, 3,930 words of Spanish (about 28 minutes of talk) took 1,115 s, 0.28 s a word. One fixed
    deadline would cut every attempt at a long call short, retry it from the start and fail it, or wait far
    too long on a short call whose analysis hangs."""
    return timeout_per_ten_minutes * max(1, math.ceil((audio_seconds or 0.0) / ANALYSIS_DEADLINE_AUDIO_SECONDS))


class PipelineWorker:
    def __init__(self, store: JobStore, downloader: Downloader, settings: PipelineSettings,
                 worker_id: str | None = None) -> None:
        self.store = store
        self.downloader = downloader
        self.settings = settings
        # A stable id lets a restarted worker take back at once the jobs it held when it died;
        # jobs of a worker that never comes back are taken over when their lease expires.
        self.owner = worker_id or f"ingest-{uuid.uuid4().hex[:8]}"
        self._channels = {
            "transcribe": client_channel(settings.transcribe_addr, settings.tls),
            "analyze": client_channel(settings.analyze_addr, settings.tls),
            "crm": client_channel(settings.crm_addr, settings.tls),
        }
        self.transcribe = transcribe_pb2_grpc.TranscriptionServiceStub(self._channels["transcribe"])
        self.analyze = analyze_pb2_grpc.AnalysisServiceStub(self._channels["analyze"])
        self.crm = crm_pb2_grpc.CrmSyncServiceStub(self._channels["crm"])
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        # Two pools of slots. Calls not yet past transcription hold one of PIPELINE_CONCURRENCY front
        # slots; calls at analysis or delivery one of BACK_STAGE_FACTOR times as many back slots. A
        # transcribed call that finds every back slot taken waits in the job store, not as a task, so
        # a backlog at the LLM or the CRM never keeps the transcriber from the next recording.
        self._front: set[str] = set()
        self._back: set[str] = set()
        self._early: set[str] = set()  # calls looked at again later (a recording still being written): logged once
        self._loop_task: asyncio.Task | None = None
        self._sweep_task: asyncio.Task | None = None

    def wake(self) -> None:
        """A call was queued: look for work now, unless every front slot is taken (a slot that frees
        wakes the loop). Behind a burst of webhooks this spares a pass of the loop per webhook."""
        if self._front_room() > 0:
            self._wake.set()

    def _front_room(self) -> int:
        return self.settings.concurrency - len(self._front)

    def _back_room(self) -> int:
        return self.settings.concurrency * BACK_STAGE_FACTOR - len(self._back)

    async def start(self) -> None:
        resumed = await self.store.release_leases(self.owner)
        if resumed:
            log.info("resuming %d job(s) left unfinished by the previous run", resumed)
        self._loop_task = asyncio.create_task(self._loop(), name="pipeline")
        self._sweep_task = asyncio.create_task(self._sweep(), name="sweep")

    async def stop(self, grace: float) -> None:
        """Stop claiming; give running jobs ``grace`` seconds, then hand them back to the queue."""
        self._stopping.set()
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._sweep_task is not None:
            await self._sweep_task
        if self._tasks:
            log.info("waiting up to %.0f s for %d job(s) in flight", grace, len(self._tasks))
            done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for channel in self._channels.values():
            await channel.close()

    async def _loop(self) -> None:
        outage = OutageLog(log, "the job store")
        while not self._stopping.is_set():
            wait = 1.0
            try:
                # Calls further along first: their slots free as they finish, and the CRM gets records sooner.
                pools = ((BACK_STATES, self._back, self._back_room), (FRONT_STATES, self._front, self._front_room))
                watched: tuple[str, ...] = ()
                for states, pool, room in pools:
                    if room() > 0:
                        for job in await self.store.claim(self.owner, room(), self.settings.lease_seconds, states):
                            pool.add(job.call_id)
                            task = asyncio.create_task(self._run(job), name=f"job-{job.call_id}")
                            self._tasks.add(task)
                            task.add_done_callback(functools.partial(self._finished, job.call_id))
                    if room() > 0:  # jobs that fall due here can be taken: look again then
                        watched += states
                if watched:
                    due = await self.store.next_due_at(watched)
                    wait = 5.0 if due is None else max(0.05, min(5.0, due - time.time()))
                outage.answered()
            except UNAVAILABLE_ERRORS as exc:
                outage.failed(exc)
            except Exception:
                log.exception("pipeline loop error")
            await sleep_or_wake(self._wake, wait)

    def orphan_age(self) -> float:
        """How long a recording no call holds is left alone: the longest a download may take, plus a lease
        (a worker whose lease ran out can have fetched a file it could not record)."""
        return self.downloader.settings.total_timeout + self.settings.lease_seconds

    async def _sweep(self) -> None:
        """At start and then every :meth:`orphan_age`, delete the recordings of calls failed longer ago than
        their retention, the recordings that no call holds, and the calls done longer ago than theirs."""
        while not self._stopping.is_set():
            try:
                await self._expire_done_calls()
                await self._expire_failed_recordings()
                in_use = await self.store.recordings_in_use()
                removed = await asyncio.to_thread(self.downloader.remove_orphans, in_use, self.orphan_age())
                if removed:
                    log.info("removed %d recording file(s) that no call holds (left by a stopped download "
                             "or a lost lease)", len(removed))
            except UNAVAILABLE_ERRORS as exc:
                log.error("%s could not reach the job store (%s: %s); trying again in %.0f s", _SWEEP,
                          type(exc).__name__, exc, self.orphan_age())
            except Exception:
                log.exception("%s failed; trying again later", _SWEEP)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.orphan_age())

    async def _expire_done_calls(self) -> None:
        retention = self.settings.done_retention
        if retention <= 0:
            return
        cutoff = time.time() - retention
        deleted = await delete_in_batches(lambda batch: self.store.delete_done(cutoff, batch))
        if deleted:
            log.info("deleted %d call(s) done more than %.1f days ago (CALL_RETENTION_DAYS); the CRM has their "
                     "records", deleted, retention / 86400)

    async def _expire_failed_recordings(self) -> None:
        retention = self.downloader.settings.failed_retention
        if retention <= 0:
            return
        released = await self.store.release_failed_recordings(time.time() - retention)
        for _, path in released:
            Path(path).unlink(missing_ok=True)
        if released:
            log.info("deleted the recordings of %d call(s) failed more than %.0f h ago "
                     "(RECORDING_FAILED_RETENTION_HOURS); a retry downloads them again", len(released), retention / 3600)

    def _finished(self, call_id: str, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._front.discard(call_id)
        self._back.discard(call_id)
        self._wake.set()

    async def _heartbeat(self, call_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 4)
            try:
                await self.store.renew(call_id, self.owner, self.settings.lease_seconds)
            except UNAVAILABLE_ERRORS as exc:  # the next beat may get through; the work goes on meanwhile
                log.warning("could not renew the call's lease: %s: %s", type(exc).__name__, exc)

    async def _run(self, job: Job) -> None:
        # The call's trace is current for the whole run, so every log line about it carries its trace id.
        token = otel_context.attach(context_from(job.trace_context))
        try:
            await self._run_attached(job)
        finally:
            otel_context.detach(token)

    async def _run_attached(self, job: Job) -> None:
        with call_context(job.call_id):
            heartbeat = asyncio.create_task(self._heartbeat(job.call_id))
            try:
                await self._advance(job)
            except LeaseLost as exc:
                log.warning("%s", exc)
            except asyncio.CancelledError:
                log.info("shutting down: job handed back at stage %s", job.state)
                await asyncio.shield(self.store.update(job.call_id, self.owner, release=True))
                raise
            except UNAVAILABLE_ERRORS as exc:
                # Recording a failed attempt would need the store too: the call stays where the store has it,
                # and is taken up again once its lease runs out.
                log.error("the job store failed at stage %s (%s: %s); the call is taken up again in %.0f s, once "
                          "its lease runs out", job.state, type(exc).__name__, exc, self.settings.lease_seconds)
            except Exception:
                log.exception("unexpected error at stage %s", job.state)
                await self._failed_attempt(job, StageError(f"{job.state}: internal error", permanent=False))
            finally:
                heartbeat.cancel()

    async def _advance(self, job: Job) -> None:
        """Run stages until the job is done, fails, or has to wait."""
        parent = context_from(job.trace_context)
        while job.state not in (DONE, FAILED):
            stage = DOWNLOADING if job.state == RECEIVED else job.state
            if stage != job.state:
                await self.store.update(job.call_id, self.owner, state=stage)
                job.state, job.attempts = stage, 0
            stage_started = time.perf_counter()
            outcome = "retry"
            try:
                with _tracer.start_as_current_span(f"pipeline.{stage}", context=parent,
                                                   attributes={"callmesh.call_id": job.call_id,
                                                               "callmesh.attempt": job.attempts + 1}) as span:
                    try:
                        next_state, fields = await getattr(self, f"_stage_{stage}")(job)
                        outcome = "done"
                    except StageError as exc:
                        span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                        raise
            except StageError as exc:
                outcome = "failed" if exc.permanent else "waiting" if exc.retry_in is not None else "retry"
                await self._failed_attempt(job, exc)
                return
            except _Reschedule as r:
                outcome = "waiting"
                await self.store.update(job.call_id, self.owner, release=True, next_attempt_at=time.time() + r.delay)
                return
            finally:
                _stage_seconds.record(time.perf_counter() - stage_started, {"stage": stage, "outcome": outcome})
            # Past transcription: the front slot goes to the next recording, and the call carries on
            # in a back slot, or waits for one in the job store.
            handed_back = False
            if next_state in BACK_STATES and job.call_id in self._front:
                self._front.discard(job.call_id)
                if self._back_room() > 0:
                    self._back.add(job.call_id)
                else:
                    handed_back = True
                self._wake.set()
            await self.store.update(job.call_id, self.owner, state=next_state, error=None, error_stage=None,
                                    release=handed_back, **fields)
            log.info("%s → %s%s", stage, next_state, " (waits for a free slot)" if handed_back else "")
            if handed_back:
                return
            job.state, job.attempts = next_state, 0
            for key, value in fields.items():
                setattr(job, key, value)
        await self.store.update(job.call_id, self.owner, release=True)

    async def _failed_attempt(self, job: Job, exc: StageError) -> None:
        if exc.retry_in is not None:
            await self.store.update(job.call_id, self.owner, release=True, error=str(exc), error_stage=job.state,
                                    next_attempt_at=time.time() + exc.retry_in)
            level = logging.DEBUG if job.call_id in self._early else logging.INFO  # the status has each look
            self._early.add(job.call_id)
            log.log(level, "%s; looking again in %.1f s", exc, exc.retry_in)
            return
        self._early.discard(job.call_id)
        attempts = job.attempts + 1
        if exc.permanent or (attempts >= self.settings.max_attempts and not exc.waiting):
            reason = str(exc) if exc.permanent else f"{exc} (gave up after {attempts} attempts)"
            await self.store.update(job.call_id, self.owner, state=FAILED, release=True, error=reason,
                                    error_stage=job.state, attempts=attempts)
            log.error("failed at %s: %s", job.state, reason)
            return
        delay = backoff_delay(attempts - 1, self.settings.backoff_initial, self.settings.backoff_max)
        await self.store.update(job.call_id, self.owner, release=True, attempts=attempts, error=str(exc),
                                error_stage=job.state, next_attempt_at=time.time() + delay)
        log.warning("attempt %d at %s failed (%s); retrying in %.1f s", attempts, job.state, exc, delay)

    # -- stages: each returns (next state, fields to store) or raises StageError / _Reschedule --

    async def _stage_downloading(self, job: Job) -> tuple[str, dict]:
        try:
            downloaded = await self.downloader.fetch(job.recording_url)
        except DownloadError as exc:
            latest = await self.store.get(job.call_id)
            if latest is not None and latest.recording_url != job.recording_url:  # see JobStore.relink
                log.info("download: %s; the recorder has sent a new link meanwhile: trying that one now", exc)
                raise _Reschedule(0) from exc
            if exc.not_there:
                self._not_there_yet(job, exc)
            if exc.still_written_for is not None:
                self._still_written(job, exc.still_written_for, exc)
            raise StageError(f"download: {exc}", permanent=exc.permanent, waiting=exc.waiting) from exc
        self._early.discard(job.call_id)
        log.info("downloaded %d bytes", downloaded.size)
        return TRANSCRIBING, {"recording_path": str(downloaded.path)}

    def _not_there_yet(self, job: Job, exc: DownloadError) -> None:
        """Recorders often send the webhook when the call ends, before the recording is uploaded where the link
        points: for RECORDING_NOT_READY_SECONDS after the webhook, a recording that is not there (404, or 403, which S3
        answers for an object not there yet when the link's signer may not list the bucket; no such file on a share) is
        tried again (with the usual backoff, without using up attempts); after that it fails the call, saying how long
        it was missing."""
        grace = self.downloader.settings.not_ready_seconds
        if grace <= 0:
            return
        age = time.time() - job.created_at
        if age < grace:
            raise StageError(f"download: the recording is not there yet ({exc}); the recorder may still be uploading "
                             f"it: tried again until {grace:.0f} s after the webhook (RECORDING_NOT_READY_SECONDS)",
                             permanent=False, waiting=True) from exc
        raise StageError(f"download: {exc}, still {age:.0f} s after the webhook (RECORDING_NOT_READY_SECONDS is "
                         f"{grace:.0f})", permanent=True) from exc

    def _still_written(self, job: Job, look_again_in: float, exc: DownloadError) -> None:
        """A recording on a share that is still being written is looked at again once it may have settled,
        without holding a download slot meanwhile nor using up attempts, for RECORDING_TOTAL_TIMEOUT_SECONDS after
        the webhook; after that each look that sees it changing is an attempt, and the call fails once they are
        spent (a file that still changes so long after its call ended is not the call's recording being finished).
        A look that could not tell (a file dated ahead of this machine's clock, seen once) never counts."""
        limit = self.downloader.settings.total_timeout
        age = time.time() - job.created_at
        if age < limit or not exc.seen_changing:
            raise StageError(f"download: {exc}", permanent=False, retry_in=look_again_in) from exc
        raise StageError(f"download: {exc}; still {age:.0f} s after the webhook (RECORDING_TOTAL_TIMEOUT_SECONDS is "
                         f"{limit:.0f})", permanent=False) from exc

    def _transcription(self, job: Job, path: Path, task: int = transcribe_pb2.TRANSCRIPTION_TASK_TRANSCRIBE,
                       language: str = "") -> grpc.aio.StreamStreamCall:
        """A Transcribe stream that sends the recording once the service has admitted it: a busy service answers
        the config with RESOURCE_EXHAUSTED before any upload, so a call that waits for a busy transcriber does not
        send its recording on every look. (Written through a request iterator: a failed explicit write surfaces
        as INTERNAL, where the iterator leaves the call its real status.)"""
        opts = job.options
        config = transcribe_pb2.TranscriptionConfig(
            call_id=job.call_id, language_code=language or opts.language or "", task=task, await_admission=True,
            channel_layout=transcribe_pb2.CHANNEL_LAYOUT_STEREO if opts.agent_channel else transcribe_pb2.CHANNEL_LAYOUT_MONO,
            agent_channel=transcribe_pb2.AGENT_CHANNEL_RIGHT if opts.agent_channel == "right" else transcribe_pb2.AGENT_CHANNEL_LEFT,
        )

        async def requests() -> AsyncIterator[transcribe_pb2.TranscribeRequest]:
            yield transcribe_pb2.TranscribeRequest(config=config)
            answer = asyncio.ensure_future(call.initial_metadata())
            await asyncio.wait({answer}, timeout=self.settings.rpc_timeout)
            if answer.done() and not any(key == ADMITTED_METADATA for key, _ in answer.result()):
                return  # refused: the call's status says why
            # Admitted, or no answer from a transcribe service older than await_admission: send the audio.
            with path.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, self.settings.chunk_bytes):
                    yield transcribe_pb2.TranscribeRequest(audio=chunk)

        call = self.transcribe.Transcribe(requests(), timeout=self.settings.transcribe_timeout)
        return call

    async def _stage_transcribing(self, job: Job) -> tuple[str, dict]:
        if not job.recording_path or not Path(job.recording_path).is_file():
            # The file is gone (a restart with a fresh disk): fetch it again.
            return DOWNLOADING, {"recording_path": None}
        language, probability, summary, audio = "", 0.0, None, None
        masking = SegmentMasking(self.settings.redact_pii)
        segments = masking.segments
        last_saved = -math.inf  # the first segment is shown at once, then progress at most every 2 s
        call = self._transcription(job, Path(job.recording_path))
        try:
            async for response in call:
                kind = response.WhichOneof("response")
                if kind == "language":
                    language, probability = response.language.language_code, response.language.probability
                    if response.language.HasField("audio_duration"):  # how far the decode has come, of how much
                        audio = seconds(response.language.audio_duration)
                elif kind == "segment":
                    masking.add({**segment_to_dict(response.segment), "language": response.segment.language_code})
                    if time.monotonic() - last_saved > 2.0:  # progress the status API can show
                        await self.store.update(job.call_id, self.owner, transcript={
                            "language": language, "language_probability": probability,
                            "segments": masking.settled(),
                            "audio_duration": audio, "complete": False})
                        last_saved = time.monotonic()
                elif kind == "summary":
                    summary = response.summary
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error("transcribe", exc) from exc
        if summary is None:
            raise StageError("transcribe: the stream ended without a summary", permanent=False)
        transcript = {
            "language": summary.language_code or language, "language_probability": summary.language_probability,
            "segments": segments, "audio_duration": seconds(summary.audio_duration),
            "speech_duration": seconds(summary.speech_duration),
            "processing_time": seconds(summary.processing_time), "model": summary.model, "complete": True,
            "statistics": statistics_to_json(summary.statistics), "language_uncertain": summary.language_uncertain,
        }
        log.info("transcribed: language %s, %d segments", transcript["language"], len(segments))
        if (self.settings.translation_source == "whisper" and transcript["language"] != "en"
                and any(s["text"].strip() for s in segments)):
            transcript["translated_segments"] = await self._whisper_translation(job, transcript["language"])
        return ANALYZING, {"transcript": transcript}

    async def _whisper_translation(self, job: Job, language: str) -> list[dict]:
        """The speech model's own English translation (TRANSLATION_SOURCE=whisper), segment by segment."""
        assert job.recording_path is not None
        call = self._transcription(job, Path(job.recording_path), transcribe_pb2.TRANSCRIPTION_TASK_TRANSLATE, language)
        try:
            masking = SegmentMasking(self.settings.redact_pii)
            async for r in call:
                if r.HasField("segment"):
                    masking.add(segment_to_dict(r.segment))
            translated = masking.segments
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error("transcribe (translate)", exc) from exc
        log.info("translated by the speech model: %d segments", len(translated))
        return translated

    async def _stage_analyzing(self, job: Job) -> tuple[str, dict]:
        transcript = job.transcript or {}
        segments = transcript.get("segments", [])
        if not any(s["text"].strip() for s in segments):
            log.info("no speech in the recording: nothing to analyse")
            return DELIVERING, {"analysis": {"summary": [], "topic": "", "sentiment": "neutral", "emotion": "",
                                             "translated_transcript": "", "model": "", "prompt_version": "",
                                             "no_speech": True}}
        request = analyze_pb2.AnalyzeRequest(
            call_id=job.call_id, language_code=transcript.get("language", ""),
            segments=[segment_from_dict(s) for s in segments],
            translated_segments=[segment_from_dict(s) for s in transcript.get("translated_segments", [])])
        try:
            response = await self.analyze.Analyze(request, timeout=analysis_deadline(
                transcript.get("audio_duration"), self.settings.analyze_timeout))
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error("analyze", exc) from exc
        analysis = {
            "summary": list(response.summary), "topic": response.topic,
            "sentiment": SENTIMENT_NAMES.get(response.sentiment, "neutral"), "emotion": response.emotion,
            "translated_transcript": response.translated_transcript, "model": response.model,
            "prompt_version": response.prompt_version, "processing_time": seconds(response.processing_time),
            "sub_topic": response.sub_topic, "resolved": response.resolved,
            "follow_up_actions": list(response.follow_up_actions), "parts": response.parts,
            "translation_source": ("whisper" if transcript.get("translated_segments") else "llm")
            if response.translated_transcript else "",
            "translated_segments": [segment_to_dict(s) for s in response.translated_segments],
            "sentiment_by_speaker": sentiment_by_speaker(response.agent_sentiment, response.customer_sentiment),
        }
        return DELIVERING, {"analysis": analysis}

    def build_record(self, job: Job) -> crm_pb2.CallRecord:
        t, a = job.transcript or {}, job.analysis or {}
        segments = t.get("segments", [])
        english = a.get("translated_segments", [])
        return crm_pb2.CallRecord(
            # No speech: no language either (Whisper's guess on silence is noise).
            call_id=job.call_id, language_code=t.get("language", "") if not a.get("no_speech") else "",
            transcript=spoken_text(segments),
            # The translation in the transcript's own form.
            translated_transcript=spoken_text(english) if english else a.get("translated_transcript", ""),
            summary=a.get("summary", []),
            topic=a.get("topic", ""), sentiment=SENTIMENT_VALUES.get(a.get("sentiment", ""), common_pb2.SENTIMENT_NEUTRAL),
            emotion=a.get("emotion", ""), create_time=timestamp(job.stage_times.get(DELIVERING) or time.time()),
            segments=[segment_from_dict(s) for s in segments], audio_duration=duration(t.get("audio_duration", 0.0)),
            language_probability=t.get("language_probability", 0.0) if not a.get("no_speech") else 0.0,
            transcription_model=t.get("model", ""),
            analysis_model=a.get("model", ""), prompt_version=a.get("prompt_version", ""),
            statistics=statistics_from_json(t.get("statistics", {})),
            language_uncertain=bool(t.get("language_uncertain")) and not a.get("no_speech"),
            sub_topic=a.get("sub_topic", ""), resolved=bool(a.get("resolved")),
            follow_up_actions=a.get("follow_up_actions", []),
            translated_segments=[segment_from_dict(s) for s in english],
            translation_source=a.get("translation_source", ""),
            agent_sentiment=SENTIMENT_VALUES.get(a.get("sentiment_by_speaker", {}).get("agent", ""), 0),
            customer_sentiment=SENTIMENT_VALUES.get(a.get("sentiment_by_speaker", {}).get("customer", ""), 0),
            metadata=job.options.metadata or {},
            revision=record_revision(job),
        )

    async def _stage_delivering(self, job: Job) -> tuple[str, dict]:
        try:
            if not (job.result or {}).get("queued"):
                record = self.build_record(job)
                request = crm_pb2.DeliverRequest(record=record, requeue_failed=bool((job.result or {}).get("requeue")))
                response = await self.crm.Deliver(request, timeout=self.settings.rpc_timeout)
                # Keep what the CRM will get (personal data masked by the crm service), not what was sent.
                sent = response.record if response.HasField("record") else record
                result = {"queued": True, "record": record_to_json(sent), "revision": record.revision}
                await self.store.update(job.call_id, self.owner, result=result)
                job.result = result
                delivery = response.delivery
            else:
                delivery = (await self.crm.GetDelivery(crm_pb2.GetDeliveryRequest(call_id=job.call_id),
                                                       timeout=self.settings.rpc_timeout)).delivery
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # the outbox lost it: queue again
                await self.store.update(job.call_id, self.owner, result={**(job.result or {}), "queued": False})
                job.result = {**(job.result or {}), "queued": False}
            raise _rpc_error("crm", exc) from exc
        result = {**(job.result or {}), "delivery": {
            "state": crm_pb2.DeliveryState.Name(delivery.state).removeprefix("DELIVERY_STATE_").lower(),
            "attempts": delivery.attempts, "last_error": delivery.last_error,
            "idempotency_key": delivery.idempotency_key}}
        if delivery.state == crm_pb2.DELIVERY_STATE_DELIVERED:
            self._cleanup(job)
            return DONE, {"result": result}
        if delivery.state == crm_pb2.DELIVERY_STATE_FAILED:
            raise StageError(f"crm: {delivery.last_error}", permanent=True)
        await self.store.update(job.call_id, self.owner, result=result)
        job.result = result
        waited = time.time() - (job.stage_times.get(DELIVERING) or time.time())
        raise _Reschedule(delivery_poll_delay(waited, self.settings.delivery_poll_seconds))

    async def set_aside_delivery(self, call_id: str, reason: str) -> crm_pb2.Delivery:
        """Have the crm service take the call's queued record out of its queue (``SetAsideDelivery``), so that
        the records behind it go to the CRM. The call looks at its delivery at once and fails at delivery with
        the reason; ``retry`` queues the record again."""
        response = await self.crm.SetAsideDelivery(crm_pb2.SetAsideDeliveryRequest(call_id=call_id, reason=reason),
                                                   timeout=self.settings.rpc_timeout)
        await self.store.update(call_id, None, next_attempt_at=0)
        self.wake()
        return response.delivery

    async def erase_delivery(self, call_id: str) -> None:
        """Have the crm service erase the call's record from its outbox (``DeleteDelivery``); an outbox that
        never held it is fine."""
        try:
            await self.crm.DeleteDelivery(crm_pb2.DeleteDeliveryRequest(call_id=call_id),
                                          timeout=self.settings.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise

    @staticmethod
    def reanalysis_fields(job: Job) -> dict[str, Any]:
        """What analysing the done ``job`` again resets: its analysis, and its result, which keeps only the
        revision its next record is to have (one more than the record the CRM has)."""
        return {"analysis": None, "result": {"revision": record_revision(job) + 1}, "error": None,
                "error_stage": None, "next_attempt_at": 0}

    @staticmethod
    def retry_fields(job: Job) -> dict[str, Any]:
        """What a retry of the failed ``job`` resets besides its state: a call the CRM refused is queued again
        in the crm service's outbox (where its failed delivery would otherwise answer every new attempt)."""
        if job.error_stage == DELIVERING:
            return {"result": {**(job.result or {}), "queued": False, "requeue": True}}
        return {}

    def _cleanup(self, job: Job) -> None:
        if job.recording_path:
            Path(job.recording_path).unlink(missing_ok=True)
