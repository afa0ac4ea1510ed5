"""The record the CRM receives, and the names the mesh uses for speakers and sentiments.

Shared because ingest stores and shows what crm sends, and every service turns the
same enums into the same names.
"""

from __future__ import annotations

from callcenter.v1 import common_pb2, crm_pb2
from services.common.protoconv import duration, seconds

SENTIMENT_NAMES = {
    common_pb2.SENTIMENT_POSITIVE: "positive",
    common_pb2.SENTIMENT_NEUTRAL: "neutral",
    common_pb2.SENTIMENT_NEGATIVE: "negative",
}
SPEAKER_NAMES = {
    common_pb2.SPEAKER_AGENT: "agent",
    common_pb2.SPEAKER_CUSTOMER: "customer",
    common_pb2.SPEAKER_UNKNOWN: "unknown",
}
SENTIMENT_VALUES = {name: value for value, name in SENTIMENT_NAMES.items()}
SPEAKER_VALUES = {name: value for value, name in SPEAKER_NAMES.items()}


def segment_to_dict(s: common_pb2.TranscriptSegment) -> dict:
    """A segment as the CRM record and the job store hold it."""
    return {
        "index": s.index,
        "start": round(seconds(s.start_offset), 3),
        "end": round(seconds(s.end_offset), 3),
        "speaker": SPEAKER_NAMES.get(s.speaker, "unknown"),
        "channel": s.channel,
        "text": s.text,
    }


def segment_from_dict(s: dict) -> common_pb2.TranscriptSegment:
    """The inverse of :func:`segment_to_dict` (plus the segment's language when stored)."""
    return common_pb2.TranscriptSegment(
        index=s["index"], start_offset=duration(s["start"]), end_offset=duration(s["end"]), text=s["text"],
        speaker=SPEAKER_VALUES.get(s["speaker"], common_pb2.SPEAKER_UNKNOWN), channel=s.get("channel", 0),
        language_code=s.get("language", ""),
    )


def statistics_to_json(stats: common_pb2.CallStatistics) -> dict:
    """Call statistics as the CRM record and the job store hold them."""
    return {
        "talk_time_seconds": {SPEAKER_NAMES.get(t.speaker, "unknown"): round(seconds(t.talk_time), 3)
                              for t in stats.talk_times},
        "non_talk_time_seconds": round(seconds(stats.non_talk_time), 3),
        "interruptions": stats.interruptions,
        "longest_silence_seconds": round(seconds(stats.longest_silence), 3),
    }


def statistics_from_json(d: dict) -> common_pb2.CallStatistics:
    """The inverse of :func:`statistics_to_json`."""
    return common_pb2.CallStatistics(
        talk_times=[common_pb2.SpeakerTalkTime(speaker=SPEAKER_VALUES.get(s, common_pb2.SPEAKER_UNKNOWN),
                                               talk_time=duration(t)) for s, t in d.get("talk_time_seconds", {}).items()],
        non_talk_time=duration(d.get("non_talk_time_seconds", 0.0)), interruptions=d.get("interruptions", 0),
        longest_silence=duration(d.get("longest_silence_seconds", 0.0)))


def sentiment_by_speaker(agent: int, customer: int) -> dict[str, str]:
    """Each speaker's sentiment by name; a speaker whose sentiment is not known is left out."""
    return {speaker: SENTIMENT_NAMES[value] for speaker, value in (("agent", agent), ("customer", customer))
            if value in SENTIMENT_NAMES}


def record_to_json(record: crm_pb2.CallRecord) -> dict:
    """The seed's shape, ``{call_id, language, transcript, translated_transcript, summary[], topic,
    sentiment, emotion, timestamp}``, plus segments, speakers and durations."""
    segments = [segment_to_dict(s) for s in record.segments]
    return {
        "call_id": record.call_id,
        "language": record.language_code,
        "transcript": record.transcript,
        "translated_transcript": record.translated_transcript,
        "summary": list(record.summary),
        "topic": record.topic,
        "sentiment": SENTIMENT_NAMES.get(record.sentiment, "neutral"),
        "sentiment_by_speaker": sentiment_by_speaker(record.agent_sentiment, record.customer_sentiment),
        "emotion": record.emotion,
        "sub_topic": record.sub_topic,
        "resolved": record.resolved,
        "follow_up_actions": list(record.follow_up_actions),
        "translated_segments": [segment_to_dict(s) for s in record.translated_segments],
        "translation_source": record.translation_source,
        "timestamp": record.create_time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "segments": segments,
        "speakers": sorted({s["speaker"] for s in segments}),
        "audio_duration_seconds": round(seconds(record.audio_duration), 3),
        "language_probability": round(record.language_probability, 4),
        "language_uncertain": record.language_uncertain,
        "statistics": statistics_to_json(record.statistics),
        "models": {"transcription": record.transcription_model, "analysis": record.analysis_model,
                   "prompt_version": record.prompt_version},
        "pii_redaction_applied": record.pii_redaction_applied,
        "redactions": [{"kind": common_pb2.PiiKind.Name(r.kind).removeprefix("PII_KIND_").lower(), "field": r.field,
                        "start": r.start, "end": r.end} for r in record.redactions],
        "metadata": dict(sorted(record.metadata.items())),
        "revision": record.revision or 1,
    }
