import datetime

from callcenter.v1 import common_pb2 as _common_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChannelLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_LAYOUT_UNSPECIFIED: _ClassVar[ChannelLayout]
    CHANNEL_LAYOUT_MONO: _ClassVar[ChannelLayout]
    CHANNEL_LAYOUT_STEREO: _ClassVar[ChannelLayout]

class AgentChannel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_CHANNEL_UNSPECIFIED: _ClassVar[AgentChannel]
    AGENT_CHANNEL_LEFT: _ClassVar[AgentChannel]
    AGENT_CHANNEL_RIGHT: _ClassVar[AgentChannel]

class TranscriptionTask(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSCRIPTION_TASK_UNSPECIFIED: _ClassVar[TranscriptionTask]
    TRANSCRIPTION_TASK_TRANSCRIBE: _ClassVar[TranscriptionTask]
    TRANSCRIPTION_TASK_TRANSLATE: _ClassVar[TranscriptionTask]
CHANNEL_LAYOUT_UNSPECIFIED: ChannelLayout
CHANNEL_LAYOUT_MONO: ChannelLayout
CHANNEL_LAYOUT_STEREO: ChannelLayout
AGENT_CHANNEL_UNSPECIFIED: AgentChannel
AGENT_CHANNEL_LEFT: AgentChannel
AGENT_CHANNEL_RIGHT: AgentChannel
TRANSCRIPTION_TASK_UNSPECIFIED: TranscriptionTask
TRANSCRIPTION_TASK_TRANSCRIBE: TranscriptionTask
TRANSCRIPTION_TASK_TRANSLATE: TranscriptionTask

class TranscriptionConfig(_message.Message):
    __slots__ = ("call_id", "language_code", "channel_layout", "agent_channel", "word_timestamps", "hotwords", "detect_language_per_segment", "task", "await_admission")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    AGENT_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    HOTWORDS_FIELD_NUMBER: _ClassVar[int]
    DETECT_LANGUAGE_PER_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    AWAIT_ADMISSION_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    language_code: str
    channel_layout: ChannelLayout
    agent_channel: AgentChannel
    word_timestamps: bool
    hotwords: _containers.RepeatedScalarFieldContainer[str]
    detect_language_per_segment: bool
    task: TranscriptionTask
    await_admission: bool
    def __init__(self, call_id: _Optional[str] = ..., language_code: _Optional[str] = ..., channel_layout: _Optional[_Union[ChannelLayout, str]] = ..., agent_channel: _Optional[_Union[AgentChannel, str]] = ..., word_timestamps: _Optional[bool] = ..., hotwords: _Optional[_Iterable[str]] = ..., detect_language_per_segment: _Optional[bool] = ..., task: _Optional[_Union[TranscriptionTask, str]] = ..., await_admission: _Optional[bool] = ...) -> None: ...

class TranscribeRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: TranscriptionConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[TranscriptionConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class LanguageDetection(_message.Message):
    __slots__ = ("language_code", "probability", "from_hint", "audio_duration")
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    FROM_HINT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_FIELD_NUMBER: _ClassVar[int]
    language_code: str
    probability: float
    from_hint: bool
    audio_duration: _duration_pb2.Duration
    def __init__(self, language_code: _Optional[str] = ..., probability: _Optional[float] = ..., from_hint: _Optional[bool] = ..., audio_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class TranscriptionSummary(_message.Message):
    __slots__ = ("language_code", "language_probability", "audio_duration", "segment_count", "processing_time", "model", "speech_duration", "statistics", "language_uncertain")
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPEECH_DURATION_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    language_code: str
    language_probability: float
    audio_duration: _duration_pb2.Duration
    segment_count: int
    processing_time: _duration_pb2.Duration
    model: str
    speech_duration: _duration_pb2.Duration
    statistics: _common_pb2.CallStatistics
    language_uncertain: bool
    def __init__(self, language_code: _Optional[str] = ..., language_probability: _Optional[float] = ..., audio_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., segment_count: _Optional[int] = ..., processing_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., model: _Optional[str] = ..., speech_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., statistics: _Optional[_Union[_common_pb2.CallStatistics, _Mapping]] = ..., language_uncertain: _Optional[bool] = ...) -> None: ...

class TranscribeResponse(_message.Message):
    __slots__ = ("language", "segment", "summary")
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    language: LanguageDetection
    segment: _common_pb2.TranscriptSegment
    summary: TranscriptionSummary
    def __init__(self, language: _Optional[_Union[LanguageDetection, _Mapping]] = ..., segment: _Optional[_Union[_common_pb2.TranscriptSegment, _Mapping]] = ..., summary: _Optional[_Union[TranscriptionSummary, _Mapping]] = ...) -> None: ...
