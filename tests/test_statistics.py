"""Call statistics from timed segments (the arithmetic; the servicer test checks they reach the summary)."""

from __future__ import annotations

from services.common.records import statistics_from_json, statistics_to_json
from services.transcribe.statistics import call_statistics


def test_talk_time_per_speaker_and_non_talk_time() -> None:
    stats = call_statistics([("agent", 1.0, 4.0), ("customer", 5.0, 9.0), ("agent", 10.0, 11.0)], 12.0)
    assert stats.talk_time == {"agent": 4.0, "customer": 4.0}
    assert stats.non_talk_time == 4.0  # 0-1, 4-5, 9-10, 11-12
    assert stats.interruptions == 0
    assert stats.longest_silence == 1.0


def test_a_speaker_starting_while_another_speaks_is_an_interruption() -> None:
    stats = call_statistics([("agent", 0.0, 5.0), ("customer", 4.0, 8.0), ("agent", 7.5, 9.0),
                             ("agent", 8.5, 9.5)], 10.0)
    assert stats.interruptions == 2  # customer at 4.0 over the agent, agent at 7.5 over the customer
    assert stats.talk_time == {"agent": 7.0, "customer": 4.0}  # the agent's own overlap counted once
    assert stats.non_talk_time == 0.5


def test_longest_silence_counts_the_start_and_the_end_of_the_call() -> None:
    assert call_statistics([("unknown", 6.0, 7.0)], 8.0).longest_silence == 6.0
    assert call_statistics([("unknown", 0.0, 1.0)], 30.0).longest_silence == 29.0


def test_a_segment_stamped_past_the_end_counts_up_to_the_end_only() -> None:
    stats = call_statistics([("unknown", 1.0, 5.0), ("unknown", 9.0, 13.0)], 12.852)
    assert stats.talk_time == {"unknown": 7.852}
    assert stats.non_talk_time == 5.0
    assert stats.talk_time["unknown"] + stats.non_talk_time == 12.852
    assert stats.longest_silence == 4.0


def test_a_call_without_speech_is_all_silence() -> None:
    stats = call_statistics([], 30.0)
    assert (stats.talk_time, stats.non_talk_time, stats.interruptions, stats.longest_silence) == ({}, 30.0, 0, 30.0)


def test_statistics_survive_the_trip_through_the_proto_and_the_job_store() -> None:
    stats = call_statistics([("agent", 0.0, 3.25), ("customer", 3.0, 5.5)], 6.0)
    as_json = statistics_to_json(stats.to_proto())
    assert as_json == {"talk_time_seconds": {"agent": 3.25, "customer": 2.5}, "non_talk_time_seconds": 0.5,
                       "interruptions": 1, "longest_silence_seconds": 0.5}
    assert statistics_to_json(statistics_from_json(as_json)) == as_json
