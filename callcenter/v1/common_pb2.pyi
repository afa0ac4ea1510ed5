import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Speaker(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEAKER_UNSPECIFIED: _ClassVar[Speaker]
    SPEAKER_AGENT: _ClassVar[Speaker]
    SPEAKER_CUSTOMER: _ClassVar[Speaker]
    SPEAKER_UNKNOWN: _ClassVar[Speaker]

class Sentiment(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SENTIMENT_UNSPECIFIED: _ClassVar[Sentiment]
    SENTIMENT_POSITIVE: _ClassVar[Sentiment]
    SENTIMENT_NEUTRAL: _ClassVar[Sentiment]
    SENTIMENT_NEGATIVE: _ClassVar[Sentiment]

class PiiKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PII_KIND_UNSPECIFIED: _ClassVar[PiiKind]
    PII_KIND_CARD_NUMBER: _ClassVar[PiiKind]
    PII_KIND_IBAN: _ClassVar[PiiKind]
    PII_KIND_PHONE_NUMBER: _ClassVar[PiiKind]
    PII_KIND_EMAIL_ADDRESS: _ClassVar[PiiKind]
    PII_KIND_NATIONAL_ID: _ClassVar[PiiKind]
    PII_KIND_ACCOUNT_NUMBER: _ClassVar[PiiKind]
    PII_KIND_SECURITY_CODE: _ClassVar[PiiKind]
SPEAKER_UNSPECIFIED: Speaker
SPEAKER_AGENT: Speaker
SPEAKER_CUSTOMER: Speaker
SPEAKER_UNKNOWN: Speaker
SENTIMENT_UNSPECIFIED: Sentiment
SENTIMENT_POSITIVE: Sentiment
SENTIMENT_NEUTRAL: Sentiment
SENTIMENT_NEGATIVE: Sentiment
PII_KIND_UNSPECIFIED: PiiKind
PII_KIND_CARD_NUMBER: PiiKind
PII_KIND_IBAN: PiiKind
PII_KIND_PHONE_NUMBER: PiiKind
PII_KIND_EMAIL_ADDRESS: PiiKind
PII_KIND_NATIONAL_ID: PiiKind
PII_KIND_ACCOUNT_NUMBER: PiiKind
PII_KIND_SECURITY_CODE: PiiKind

class Word(_message.Message):
    __slots__ = ("text", "start_offset", "end_offset", "probability")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    text: str
    start_offset: _duration_pb2.Duration
    end_offset: _duration_pb2.Duration
    probability: float
    def __init__(self, text: _Optional[str] = ..., start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., probability: _Optional[float] = ...) -> None: ...

class TranscriptSegment(_message.Message):
    __slots__ = ("index", "start_offset", "end_offset", "text", "speaker", "channel", "words", "avg_logprob", "no_speech_prob", "language_code")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    AVG_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NO_SPEECH_PROB_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    index: int
    start_offset: _duration_pb2.Duration
    end_offset: _duration_pb2.Duration
    text: str
    speaker: Speaker
    channel: int
    words: _containers.RepeatedCompositeFieldContainer[Word]
    avg_logprob: float
    no_speech_prob: float
    language_code: str
    def __init__(self, index: _Optional[int] = ..., start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., text: _Optional[str] = ..., speaker: _Optional[_Union[Speaker, str]] = ..., channel: _Optional[int] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ..., avg_logprob: _Optional[float] = ..., no_speech_prob: _Optional[float] = ..., language_code: _Optional[str] = ...) -> None: ...

class SpeakerTalkTime(_message.Message):
    __slots__ = ("speaker", "talk_time")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    TALK_TIME_FIELD_NUMBER: _ClassVar[int]
    speaker: Speaker
    talk_time: _duration_pb2.Duration
    def __init__(self, speaker: _Optional[_Union[Speaker, str]] = ..., talk_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CallStatistics(_message.Message):
    __slots__ = ("talk_times", "non_talk_time", "interruptions", "longest_silence")
    TALK_TIMES_FIELD_NUMBER: _ClassVar[int]
    NON_TALK_TIME_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTIONS_FIELD_NUMBER: _ClassVar[int]
    LONGEST_SILENCE_FIELD_NUMBER: _ClassVar[int]
    talk_times: _containers.RepeatedCompositeFieldContainer[SpeakerTalkTime]
    non_talk_time: _duration_pb2.Duration
    interruptions: int
    longest_silence: _duration_pb2.Duration
    def __init__(self, talk_times: _Optional[_Iterable[_Union[SpeakerTalkTime, _Mapping]]] = ..., non_talk_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., interruptions: _Optional[int] = ..., longest_silence: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Redaction(_message.Message):
    __slots__ = ("kind", "field", "start", "end")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    kind: PiiKind
    field: str
    start: int
    end: int
    def __init__(self, kind: _Optional[_Union[PiiKind, str]] = ..., field: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...
