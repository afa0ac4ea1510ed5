import datetime

from callcenter.v1 import common_pb2 as _common_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeliveryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_STATE_UNSPECIFIED: _ClassVar[DeliveryState]
    DELIVERY_STATE_QUEUED: _ClassVar[DeliveryState]
    DELIVERY_STATE_DELIVERED: _ClassVar[DeliveryState]
    DELIVERY_STATE_FAILED: _ClassVar[DeliveryState]
DELIVERY_STATE_UNSPECIFIED: DeliveryState
DELIVERY_STATE_QUEUED: DeliveryState
DELIVERY_STATE_DELIVERED: DeliveryState
DELIVERY_STATE_FAILED: DeliveryState

class CallRecord(_message.Message):
    __slots__ = ("call_id", "language_code", "transcript", "translated_transcript", "summary", "topic", "sentiment", "emotion", "create_time", "segments", "audio_duration", "language_probability", "transcription_model", "analysis_model", "prompt_version", "statistics", "language_uncertain", "redactions", "pii_redaction_applied", "sub_topic", "agent_sentiment", "customer_sentiment", "resolved", "follow_up_actions", "translated_segments", "translation_source", "metadata", "revision")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    TRANSLATED_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    SENTIMENT_FIELD_NUMBER: _ClassVar[int]
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPTION_MODEL_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    REDACTIONS_FIELD_NUMBER: _ClassVar[int]
    PII_REDACTION_APPLIED_FIELD_NUMBER: _ClassVar[int]
    SUB_TOPIC_FIELD_NUMBER: _ClassVar[int]
    AGENT_SENTIMENT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_SENTIMENT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_UP_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    language_code: str
    transcript: str
    translated_transcript: str
    summary: _containers.RepeatedScalarFieldContainer[str]
    topic: str
    sentiment: _common_pb2.Sentiment
    emotion: str
    create_time: _timestamp_pb2.Timestamp
    segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.TranscriptSegment]
    audio_duration: _duration_pb2.Duration
    language_probability: float
    transcription_model: str
    analysis_model: str
    prompt_version: str
    statistics: _common_pb2.CallStatistics
    language_uncertain: bool
    redactions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Redaction]
    pii_redaction_applied: bool
    sub_topic: str
    agent_sentiment: _common_pb2.Sentiment
    customer_sentiment: _common_pb2.Sentiment
    resolved: bool
    follow_up_actions: _containers.RepeatedScalarFieldContainer[str]
    translated_segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.TranscriptSegment]
    translation_source: str
    metadata: _containers.ScalarMap[str, str]
    revision: int
    def __init__(self, call_id: _Optional[str] = ..., language_code: _Optional[str] = ..., transcript: _Optional[str] = ..., translated_transcript: _Optional[str] = ..., summary: _Optional[_Iterable[str]] = ..., topic: _Optional[str] = ..., sentiment: _Optional[_Union[_common_pb2.Sentiment, str]] = ..., emotion: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[_common_pb2.TranscriptSegment, _Mapping]]] = ..., audio_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., language_probability: _Optional[float] = ..., transcription_model: _Optional[str] = ..., analysis_model: _Optional[str] = ..., prompt_version: _Optional[str] = ..., statistics: _Optional[_Union[_common_pb2.CallStatistics, _Mapping]] = ..., language_uncertain: _Optional[bool] = ..., redactions: _Optional[_Iterable[_Union[_common_pb2.Redaction, _Mapping]]] = ..., pii_redaction_applied: _Optional[bool] = ..., sub_topic: _Optional[str] = ..., agent_sentiment: _Optional[_Union[_common_pb2.Sentiment, str]] = ..., customer_sentiment: _Optional[_Union[_common_pb2.Sentiment, str]] = ..., resolved: _Optional[bool] = ..., follow_up_actions: _Optional[_Iterable[str]] = ..., translated_segments: _Optional[_Iterable[_Union[_common_pb2.TranscriptSegment, _Mapping]]] = ..., translation_source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., revision: _Optional[int] = ...) -> None: ...

class DeliverRequest(_message.Message):
    __slots__ = ("record", "requeue_failed")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    REQUEUE_FAILED_FIELD_NUMBER: _ClassVar[int]
    record: CallRecord
    requeue_failed: bool
    def __init__(self, record: _Optional[_Union[CallRecord, _Mapping]] = ..., requeue_failed: _Optional[bool] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("call_id", "state", "attempts", "last_error", "idempotency_key", "create_time", "deliver_time", "next_attempt_time")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DELIVER_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    state: DeliveryState
    attempts: int
    last_error: str
    idempotency_key: str
    create_time: _timestamp_pb2.Timestamp
    deliver_time: _timestamp_pb2.Timestamp
    next_attempt_time: _timestamp_pb2.Timestamp
    def __init__(self, call_id: _Optional[str] = ..., state: _Optional[_Union[DeliveryState, str]] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deliver_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeliverResponse(_message.Message):
    __slots__ = ("delivery", "record")
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    delivery: Delivery
    record: CallRecord
    def __init__(self, delivery: _Optional[_Union[Delivery, _Mapping]] = ..., record: _Optional[_Union[CallRecord, _Mapping]] = ...) -> None: ...

class GetDeliveryRequest(_message.Message):
    __slots__ = ("call_id",)
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    def __init__(self, call_id: _Optional[str] = ...) -> None: ...

class GetDeliveryResponse(_message.Message):
    __slots__ = ("delivery",)
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    delivery: Delivery
    def __init__(self, delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

class SetAsideDeliveryRequest(_message.Message):
    __slots__ = ("call_id", "reason")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    reason: str
    def __init__(self, call_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetAsideDeliveryResponse(_message.Message):
    __slots__ = ("delivery",)
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    delivery: Delivery
    def __init__(self, delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

class DeleteDeliveryRequest(_message.Message):
    __slots__ = ("call_id",)
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    def __init__(self, call_id: _Optional[str] = ...) -> None: ...

class DeleteDeliveryResponse(_message.Message):
    __slots__ = ("delivery",)
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    delivery: Delivery
    def __init__(self, delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...
