"""Call statistics from the timed segments: talk time, non-talk time, interruptions, longest silence."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from callcenter.v1 import common_pb2
from services.common.protoconv import duration
from services.common.records import SPEAKER_VALUES


@dataclass(frozen=True)
class CallStats:
    talk_time: dict[str, float]  # speaker → seconds, overlaps within one speaker counted once
    non_talk_time: float  # seconds in which nobody spoke
    interruptions: int  # a speaker started while another was still speaking
    longest_silence: float  # longest stretch with nobody speaking, call start and end included

    def to_proto(self) -> common_pb2.CallStatistics:
        return common_pb2.CallStatistics(
            talk_times=[common_pb2.SpeakerTalkTime(speaker=SPEAKER_VALUES[s], talk_time=duration(t))
                        for s, t in self.talk_time.items()],
            non_talk_time=duration(self.non_talk_time), interruptions=self.interruptions,
            longest_silence=duration(self.longest_silence))


def _merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def call_statistics(segments: Iterable[tuple[str, float, float]], duration: float) -> CallStats:
    """``segments`` as (speaker, start, end) in seconds; ``duration`` of the whole recording.

    A segment is counted within the recording only: Whisper may stamp the last one past its end
    (13.0 s in a 12.85-s call), and talk plus non-talk time is the recording's duration."""
    def within(t: float) -> float:
        return min(max(t, 0.0), duration)

    timed = sorted((within(start), within(max(start, end)), speaker) for speaker, start, end in segments)
    speakers = sorted({speaker for _, _, speaker in timed})
    talk = {s: round(sum(e - b for b, e in _merge((b, e) for b, e, who in timed if who == s)), 3) for s in speakers}
    speech = _merge((b, e) for b, e, _ in timed)
    edges = [0.0, *(x for interval in speech for x in interval), duration]
    gaps = [edges[i + 1] - edges[i] for i in range(0, len(edges) - 1, 2)]
    interruptions = 0
    latest_end: dict[str, float] = {}  # how far each speaker's speech reaches so far
    for start, end, speaker in timed:
        if any(other != speaker and reach > start for other, reach in latest_end.items()):
            interruptions += 1
        latest_end[speaker] = max(latest_end.get(speaker, 0.0), end)
    return CallStats(talk, round(max(0.0, duration - sum(e - b for b, e in speech)), 3), interruptions,
                     round(max(gaps), 3))
