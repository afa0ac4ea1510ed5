"""gRPC face of the analyzer."""

from __future__ import annotations

import logging

import grpc

from callcenter.v1 import analyze_pb2, analyze_pb2_grpc, common_pb2
from services.analyze.analyzer import AnalysisError, Analyzer, TranscriptTooLong, Utterance
from services.analyze.backends import BackendUnavailable
from services.common.limits import AdmissionLimiter, Overloaded
from services.common.logs import call_context
from services.common.metrics import meter
from services.common.protoconv import duration, seconds
from services.common.records import SENTIMENT_VALUES, SPEAKER_NAMES

log = logging.getLogger(__name__)
_rejected = meter(__name__).create_counter("callmesh.analyze.rejected", description="Requests refused (reason)")



def utterance(segment: common_pb2.TranscriptSegment) -> Utterance:
    return Utterance(SPEAKER_NAMES.get(segment.speaker, "unknown"), seconds(segment.start_offset), segment.text)


def translated(segment: common_pb2.TranscriptSegment, text: str) -> common_pb2.TranscriptSegment:
    """The segment with its text in English; index, times, speaker and channel kept (words dropped)."""
    return common_pb2.TranscriptSegment(index=segment.index, start_offset=segment.start_offset,
                                        end_offset=segment.end_offset, speaker=segment.speaker,
                                        channel=segment.channel, text=text, language_code="en")


class AnalysisServicer(analyze_pb2_grpc.AnalysisServiceServicer):
    def __init__(self, analyzer: Analyzer, limiter: AdmissionLimiter) -> None:
        self.analyzer = analyzer
        self.limiter = limiter

    async def Analyze(self, request: analyze_pb2.AnalyzeRequest, context: grpc.aio.ServicerContext) -> analyze_pb2.AnalyzeResponse:
        spoken = [s for s in request.segments if s.text.strip()]
        utterances = [utterance(s) for s in spoken]
        given = [s for s in request.translated_segments if s.text.strip()]
        translation = [utterance(s) for s in given] or None
        if not utterances:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the transcript has no text to analyse")
        with call_context(request.call_id or "-"):
            try:
                async with self.limiter.admit():
                    async with self.limiter.run_slot():
                        result = await self.analyzer.analyze(utterances, request.language_code, translation)
            except Overloaded as exc:
                _rejected.add(1, {"reason": "overloaded"})
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except TranscriptTooLong as exc:
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
            except BackendUnavailable as exc:
                log.warning("LLM unavailable: %s", exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except AnalysisError as exc:
                log.error("analysis failed: %s", exc)
                await context.abort(grpc.StatusCode.INTERNAL, str(exc))
            log.info("analysed in %.1f s: topic=%s sentiment=%s emotion=%s", result.seconds, result.topic,
                     result.sentiment, result.emotion)
            return analyze_pb2.AnalyzeResponse(
                summary=list(result.summary),
                topic=result.topic,
                sentiment=SENTIMENT_VALUES[result.sentiment],
                emotion=result.emotion,
                translated_transcript=result.translated_transcript,
                model=result.model,
                prompt_version=result.prompt_version,
                processing_time=duration(result.seconds),
                sub_topic=result.sub_topic,
                agent_sentiment=SENTIMENT_VALUES.get(result.agent_sentiment, 0),
                customer_sentiment=SENTIMENT_VALUES.get(result.customer_sentiment, 0),
                resolved=result.resolved,
                follow_up_actions=list(result.follow_up_actions),
                translated_segments=given if translation and request.language_code.lower() != "en" else
                [translated(s, text) for s, text in zip(spoken, result.translated_lines)],
                parts=result.parts,
            )
