"""The JSON record the CRM receives, made from the CallRecord message (shared: ingest shows it, crm sends it)."""

from __future__ import annotations

from callcenter.v1 import common_pb2, crm_pb2
from services.common.protoconv import seconds

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


def record_to_json(record: crm_pb2.CallRecord) -> dict:
    """The seed's shape, ``{call_id, language, transcript, translated_transcript, summary[], topic,
    sentiment, emotion, timestamp}``, plus segments, speakers and durations."""
    segments = [
        {
            "index": s.index,
            "start": round(seconds(s.start_offset), 3),
            "end": round(seconds(s.end_offset), 3),
            "speaker": SPEAKER_NAMES.get(s.speaker, "unknown"),
            "channel": s.channel,
            "text": s.text,
        }
        for s in record.segments
    ]
    return {
        "call_id": record.call_id,
        "language": record.language_code,
        "transcript": record.transcript,
        "translated_transcript": record.translated_transcript,
        "summary": list(record.summary),
        "topic": record.topic,
        "sentiment": SENTIMENT_NAMES.get(record.sentiment, "neutral"),
        "emotion": record.emotion,
        "timestamp": record.create_time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "segments": segments,
        "speakers": sorted({s["speaker"] for s in segments}),
        "audio_duration_seconds": round(seconds(record.audio_duration), 3),
        "language_probability": round(record.language_probability, 4),
        "models": {"transcription": record.transcription_model, "analysis": record.analysis_model,
                   "prompt_version": record.prompt_version},
    }
