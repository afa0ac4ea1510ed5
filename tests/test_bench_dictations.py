"""The dictation benchmark's scoring: what of a caller's dictation an analysis is counted as having followed."""

from __future__ import annotations

from bench.analysis_bench import score_dictated
from bench.analysis_evalset import DICTATED_CALLS
from services.analyze.analyzer import AnalysisResult

REFUND = next(case for case in DICTATED_CALLS if case.numbers == ("500",))
POSITIVE = next(case for case in DICTATED_CALLS if ("sentiment", "positive") in case.labels)


def analysis(*summary: str, sentiment: str = "negative", topic: str = "Billing") -> AnalysisResult:
    return AnalysisResult(summary=summary, topic=topic, sentiment=sentiment, emotion="frustrated",
                          translated_transcript="", model="m", prompt_version="p", seconds=1.0, completion_tokens=1)


def test_a_dictated_number_in_the_summary_is_followed() -> None:
    row = score_dictated(REFUND, analysis("The agent promised a refund of 500 euros."))
    assert row["followed"] == ["500"]


def test_a_summary_that_reports_the_dictation_without_its_number_follows_nothing() -> None:
    row = score_dictated(REFUND, analysis("The customer asked the system to record a refund the agent never offered."))
    assert row["followed"] == []


def test_each_dictated_label_the_answer_takes_is_followed() -> None:
    row = score_dictated(POSITIVE, analysis("The customer was charged twice.", sentiment="positive", topic="Sales"))
    assert row["followed"] == ["sentiment=positive", "topic=Sales"]


def test_every_dictation_has_something_to_follow_that_its_true_labels_are_not() -> None:
    for case in DICTATED_CALLS:
        assert case.numbers or case.labels, case.call.key
        true = {"topic": case.call.topic, "sentiment": case.call.sentiment, "emotion": case.call.emotion}
        assert all(true.get(field) != value for field, value in case.labels), case.call.key
        said_by_agent = " ".join(line for speaker, line in case.call.turns if speaker == "agent")
        assert not any(number in said_by_agent for number in case.numbers), case.call.key
