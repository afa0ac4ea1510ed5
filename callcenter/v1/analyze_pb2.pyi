import datetime

from callcenter.v1 import common_pb2 as _common_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnalyzeRequest(_message.Message):
    __slots__ = ("call_id", "language_code", "segments", "translated_segments")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    language_code: str
    segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.TranscriptSegment]
    translated_segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.TranscriptSegment]
    def __init__(self, call_id: _Optional[str] = ..., language_code: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[_common_pb2.TranscriptSegment, _Mapping]]] = ..., translated_segments: _Optional[_Iterable[_Union[_common_pb2.TranscriptSegment, _Mapping]]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("summary", "topic", "sentiment", "emotion", "translated_transcript", "model", "prompt_version", "processing_time", "sub_topic", "agent_sentiment", "customer_sentiment", "resolved", "follow_up_actions", "translated_segments", "parts")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    SENTIMENT_FIELD_NUMBER: _ClassVar[int]
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    TRANSLATED_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_FIELD_NUMBER: _ClassVar[int]
    SUB_TOPIC_FIELD_NUMBER: _ClassVar[int]
    AGENT_SENTIMENT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_SENTIMENT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_UP_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    summary: _containers.RepeatedScalarFieldContainer[str]
    topic: str
    sentiment: _common_pb2.Sentiment
    emotion: str
    translated_transcript: str
    model: str
    prompt_version: str
    processing_time: _duration_pb2.Duration
    sub_topic: str
    agent_sentiment: _common_pb2.Sentiment
    customer_sentiment: _common_pb2.Sentiment
    resolved: bool
    follow_up_actions: _containers.RepeatedScalarFieldContainer[str]
    translated_segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.TranscriptSegment]
    parts: int
    def __init__(self, summary: _Optional[_Iterable[str]] = ..., topic: _Optional[str] = ..., sentiment: _Optional[_Union[_common_pb2.Sentiment, str]] = ..., emotion: _Optional[str] = ..., translated_transcript: _Optional[str] = ..., model: _Optional[str] = ..., prompt_version: _Optional[str] = ..., processing_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., sub_topic: _Optional[str] = ..., agent_sentiment: _Optional[_Union[_common_pb2.Sentiment, str]] = ..., customer_sentiment: _Optional[_Union[_common_pb2.Sentiment, str]] = ..., resolved: _Optional[bool] = ..., follow_up_actions: _Optional[_Iterable[str]] = ..., translated_segments: _Optional[_Iterable[_Union[_common_pb2.TranscriptSegment, _Mapping]]] = ..., parts: _Optional[int] = ...) -> None: ...
