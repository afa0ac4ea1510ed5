"""The analyzer around the model: schema, validation, retry, backends.

The model itself is exercised on real weights in test_end_to_end.py and in the
embedded-backend test below; here the Ollama server is a stand-in on loopback
speaking Ollama's /api/chat protocol, since no Ollama binary installs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import pytest_asyncio
from aiohttp import web

from callcenter.v1 import analyze_pb2, analyze_pb2_grpc, common_pb2
from services.analyze.analyzer import (EMOTION_MEANINGS, LANGUAGE_NAMES, TOPIC_MEANINGS, AnalysisError, Analyzer,
                                       TranscriptTooLong, Utterance, analysis_schema, notes_schema)
from services.analyze.backends import BackendUnavailable, EmbeddedLlamaBackend, OllamaBackend
from services.analyze.config import DEFAULT_EMOTIONS, DEFAULT_TOPICS, LlmSettings
from services.analyze.servicer import AnalysisServicer
from services.common.grpc_server import RunningServer, ServiceBinding, client_channel, start_server
from services.common.lifecycle import start_site
from services.common.limits import AdmissionLimiter
from services.common.protoconv import duration
from services.ingest.pipeline import analysis_deadline
from services.ingest.store import ANALYZING
from tests.ingest_harness import running_ingest, stored_call, wait_for_state

GOOD = {"sentiment": "negative", "emotion": "angry", "topic": "Billing", "sub_topic": "double charge",
        "resolved": False, "follow_up_actions": ["Refund the second charge."],
        "summary": ["Customer was billed twice.", "Customer is angry.", "Customer wants a refund."]}
CALL = [Utterance("customer", 0.0, "I was billed twice this month and I am angry. I want my money back.")]


@dataclass
class FakeOllama:
    """Answers /api/chat with the queued answers, one per request, and records the requests."""

    answers: list[str]
    requests: list[dict] = field(default_factory=list)
    by_schema: bool = False  # answer from the requested schema instead of the queue (long calls)
    delay: float = 0.0  # seconds before each answer: a busy model
    gate: asyncio.Event | None = None  # when given, no answer leaves before it is set: a model busy until then
    url: str = ""
    _runner: web.AppRunner | None = None

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        content = self.answers.pop(0) if not self.by_schema else schema_answer(body["format"])
        return web.json_response({
            "model": body["model"], "created_at": "2026-11-25T00:00:00Z", "done": True, "done_reason": "stop",
            "message": {"role": "assistant", "content": content}, "prompt_eval_count": 50, "eval_count": 20,
        })

    async def start(self) -> "FakeOllama":
        app = web.Application()
        app.router.add_post("/api/chat", self.chat)
        self._runner, port = await start_site(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def schema_answer(schema: dict) -> str:
    """A valid answer for whichever request this is: notes, translated lines, or the analysis."""
    props = schema["properties"]
    if "notes" in props:
        return json.dumps({"notes": ["The customer complains about a double charge."]})
    if "lines" in props:
        return json.dumps({"lines": ["Translated line."] * props["lines"]["minItems"]})
    return json.dumps(GOOD)


def settings(host: str, model: str = "qwen2.5:7b-instruct") -> LlmSettings:
    return LlmSettings(ollama_host=host, model=model, context_tokens=4096, max_answer_tokens=512, threads=2,
                       timeout_seconds=30, keep_alive="30m")


def analyzer(backend) -> Analyzer:
    return Analyzer(backend, DEFAULT_TOPICS, DEFAULT_EMOTIONS, 4096, 512)


@pytest_asyncio.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    server = await FakeOllama([]).start()
    yield server
    await server.stop()


async def test_ollama_backend_sends_schema_temperature_and_context(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")
    assert result.sentiment == "negative" and result.topic == "Billing" and len(result.summary) == 3
    request = ollama.requests[0]
    assert request["format"] == analysis_schema(DEFAULT_TOPICS, DEFAULT_EMOTIONS)
    assert request["options"]["temperature"] == 0
    assert request["options"]["num_ctx"] == 4096
    assert request["keep_alive"] == "30m"


async def test_english_call_is_not_translated(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")
    assert result.translated_transcript == ""
    assert len(ollama.requests) == 1


@pytest.mark.parametrize("field, meanings, labels", [
    ("emotion", EMOTION_MEANINGS, ("angry", "anxious", "resigned")),
    ("topic", TOPIC_MEANINGS, ("Billing", "Sales", "Roaming")),
])  # the last label of each is configured beyond the defaults
async def test_prompt_says_what_each_known_label_means_and_offers_others_by_name(
        ollama: FakeOllama, field: str, meanings: dict[str, str], labels: tuple[str, ...]) -> None:
    ollama.answers = [json.dumps({**GOOD, field: labels[-1]})]
    configured = Analyzer(OllamaBackend(settings(ollama.url)), labels if field == "topic" else DEFAULT_TOPICS,
                          labels if field == "emotion" else DEFAULT_EMOTIONS, 4096, 512)
    # A call in which the customer names no feeling (one named would outweigh the model's emotion)
    result = await configured.analyze([Utterance("customer", 0.0, "I was billed twice. I want my money back.")], "en")
    assert getattr(result, field) == labels[-1]
    prompt = ollama.requests[0]["messages"][1]["content"]
    assert (f"Allowed {field}s: {labels[0]} ({meanings[labels[0]]}); {labels[1]} ({meanings[labels[1]]}); "
            f"{labels[2]}.\n") in prompt
    assert ollama.requests[0]["format"]["properties"][field]["enum"] == list(labels)


def test_every_default_topic_has_a_meaning() -> None:
    assert set(DEFAULT_TOPICS) <= set(TOPIC_MEANINGS)


def test_every_language_whisper_can_detect_has_a_name_for_the_prompts() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(_LANGUAGE_CODES) == set(LANGUAGE_NAMES)


async def test_other_languages_are_translated_in_a_request_of_their_own(ollama: FakeOllama) -> None:
    both = {**GOOD, "agent_sentiment": "neutral", "customer_sentiment": "negative"}
    ollama.answers = [json.dumps({"lines": ["Good morning.", "I was charged twice."]}), json.dumps(both)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(
        [Utterance("agent", 0, "Buenos días."), Utterance("customer", 2, "Me cobraron dos veces.")], "es")
    assert result.translated_lines == ("Good morning.", "I was charged twice.")
    assert result.translated_transcript == "Agent: Good morning.\nCustomer: I was charged twice."
    translation = ollama.requests[0]
    assert "Spanish" in translation["messages"][0]["content"]
    assert translation["format"]["properties"]["lines"]["minItems"] == 2
    assert "1. Agent: Buenos días.\n2. Customer: Me cobraron dos veces." == translation["messages"][1]["content"]


async def test_a_speaker_label_the_model_repeats_in_its_translation_is_not_doubled(ollama: FakeOllama) -> None:
    both = {**GOOD, "agent_sentiment": "neutral", "customer_sentiment": "negative"}
    ollama.answers = [json.dumps({"lines": ["Agent: Good morning.", "2. Customer: I was charged twice."]}),
                      json.dumps(both)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(
        [Utterance("agent", 0, "Buenos días."), Utterance("customer", 2, "Me cobraron dos veces.")], "es")
    assert result.translated_lines == ("Good morning.", "I was charged twice.")
    assert result.translated_transcript == "Agent: Good morning.\nCustomer: I was charged twice."


async def test_a_mono_calls_translation_carries_no_speaker_label(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps({"lines": ["Good morning.", "Speaker: I was charged twice."]}), json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(
        [Utterance("unknown", 0, "Buenos días."), Utterance("unknown", 2, "Me cobraron dos veces.")], "es")
    assert "1. Speaker: Buenos días.\n2. Speaker: Me cobraron dos veces." == ollama.requests[0]["messages"][1]["content"]
    assert result.translated_transcript == "Good morning.\nI was charged twice."


async def test_a_call_in_a_script_of_a_token_a_character_gets_room_for_its_translation(ollama: FakeOllama) -> None:
    thai = "สวัสดีค่ะ ดิฉันถูกเรียกเก็บเงินสองครั้งในใบแจ้งหนี้เดือนนี้ อยากขอคืนเงินค่ะ"
    ollama.answers = [json.dumps({"lines": ["Hello, I was charged twice on this month's bill; I'd like a refund."]}),
                      json.dumps(GOOD)]
    await analyzer(OllamaBackend(settings(ollama.url))).analyze([Utterance("customer", 0, thai)], "th")
    assert ollama.requests[0]["options"]["num_predict"] >= 2 * len(thai)


async def test_personal_data_can_be_kept_from_the_llm(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps({"lines": ["My card is [CARD_NUMBER]."]}), json.dumps(GOOD)]
    call = [Utterance("customer", 0, "Mi tarjeta es 4111 1111 1111 1111, escriba a ana.lopez@example.com.")]
    masking = Analyzer(OllamaBackend(settings(ollama.url)), DEFAULT_TOPICS, DEFAULT_EMOTIONS, 4096, 512,
                       redact_pii=True)
    await masking.analyze(call, "es")
    sent = json.dumps(ollama.requests)
    assert "4111" not in sent and "ana.lopez" not in sent
    assert "[CARD_NUMBER]" in sent and "[EMAIL_ADDRESS]" in sent


async def test_a_card_read_out_a_group_an_utterance_is_kept_from_the_llm(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps(GOOD)]
    call = [Utterance("customer", i, text) for i, text in enumerate(["Sure.", "4111.", "1111.", "1111.", "1111."])]
    masking = Analyzer(OllamaBackend(settings(ollama.url)), DEFAULT_TOPICS, DEFAULT_EMOTIONS, 4096, 512,
                       redact_pii=True)
    await masking.analyze(call, "en")
    sent = json.dumps(ollama.requests)
    assert "1111" not in sent and "4111" not in sent and sent.count("[CARD_NUMBER]") >= 4


async def test_a_card_read_out_between_the_agents_words_is_kept_from_the_llm(ollama: FakeOllama) -> None:
    both = {**GOOD, "agent_sentiment": "neutral", "customer_sentiment": "neutral"}
    ollama.answers = [json.dumps(both)]
    said = [("customer", "4111."), ("agent", "Okay."), ("customer", "1111."), ("agent", "Yes."),
            ("customer", "1111."), ("agent", "Go on."), ("customer", "1111.")]
    masking = Analyzer(OllamaBackend(settings(ollama.url)), DEFAULT_TOPICS, DEFAULT_EMOTIONS, 4096, 512,
                       redact_pii=True)
    await masking.analyze([Utterance(speaker, i, text) for i, (speaker, text) in enumerate(said)], "en")
    sent = json.dumps(ollama.requests)
    assert "1111" not in sent and "4111" not in sent and "Go on." in sent


async def test_by_default_the_llm_reads_the_transcript_as_spoken(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps(GOOD)]
    await analyzer(OllamaBackend(settings(ollama.url))).analyze(
        [Utterance("customer", 0, "My card is 4111 1111 1111 1111.")], "en")
    assert "4111 1111 1111 1111" in json.dumps(ollama.requests)


def test_every_string_and_list_in_the_schemas_is_bounded() -> None:
    def walk(node: dict, path: str) -> None:
        if node.get("type") == "string":
            assert "enum" in node or "maxLength" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path
            walk(node["items"], path + "[]")
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")

    from services.analyze.analyzer import notes_schema, translation_schema
    for schema in (analysis_schema(DEFAULT_TOPICS, DEFAULT_EMOTIONS),
                   analysis_schema(DEFAULT_TOPICS, DEFAULT_EMOTIONS, speakers_known=True), translation_schema(["Hola."] * 3),
                   notes_schema()):
        walk(schema, "answer")


async def test_known_speakers_get_a_sentiment_each(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps({**GOOD, "agent_sentiment": "neutral", "customer_sentiment": "negative"})]
    call = [Utterance("agent", 0, "How can I help?"), Utterance("customer", 2, "I was billed twice!")]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(call, "en")
    assert (result.agent_sentiment, result.customer_sentiment) == ("neutral", "negative")
    assert {"agent_sentiment", "customer_sentiment"} <= set(ollama.requests[0]["format"]["required"])


async def test_unknown_speakers_get_only_the_overall_sentiment(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")
    assert "customer_sentiment" not in ollama.requests[0]["format"]["properties"]
    assert (result.agent_sentiment, result.customer_sentiment) == ("", "")
    assert result.sub_topic == "double charge" and result.resolved is False
    assert result.follow_up_actions == ("Refund the second charge.",)


async def test_malformed_answer_is_retried_with_the_error(ollama: FakeOllama) -> None:
    ollama.answers = ["{\"sentiment\": \"furious\"}", json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")
    assert result.sentiment == "negative"
    retry_messages = ollama.requests[1]["messages"]
    assert retry_messages[-1]["role"] == "user" and "invalid" in retry_messages[-1]["content"]


async def test_two_malformed_answers_fail_clearly(ollama: FakeOllama) -> None:
    ollama.answers = ["not json at all", json.dumps({**GOOD, "summary": ["only one"]})]
    with pytest.raises(AnalysisError, match="no valid analysis after 2 attempts: summary"):
        await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")


async def test_unreachable_ollama_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="unreachable"):
        await analyzer(OllamaBackend(settings("http://127.0.0.1:9"))).analyze(CALL, "en")


async def test_a_long_transcript_is_read_in_parts_and_summarised_whole(ollama: FakeOllama) -> None:
    ollama.by_schema = True
    long_call = [Utterance("customer", i, f"Sentence {i} of a long call about a double charge. " * 5) for i in range(100)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(long_call, "en")
    notes = [r for r in ollama.requests if "notes" in r["format"]["properties"]]
    assert result.parts == len(notes) > 1
    said = "\n".join(r["messages"][1]["content"] for r in notes)
    assert all(f"Sentence {i} of" in said for i in range(100))  # every line was read, none cut off
    assert all(len(r["messages"][1]["content"]) // 3 < 4096 - 400 for r in ollama.requests)  # each fits
    final = ollama.requests[-1]["messages"][1]["content"]
    assert f"read in {result.parts} parts" in final and "(part 1)" in final and f"(part {result.parts})" in final
    assert len(result.summary) == 3


async def test_a_long_call_is_translated_line_by_line_in_batches(ollama: FakeOllama) -> None:
    ollama.by_schema = True
    long_call = [Utterance("customer", i, f"Frase número {i} de una llamada larga. " * 5) for i in range(100)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(long_call, "es")
    batches = [r for r in ollama.requests if "lines" in r["format"]["properties"]]
    assert len(batches) > 1 and len(result.translated_lines) == 100
    assert sum(r["format"]["properties"]["lines"]["minItems"] for r in batches) == 100


async def test_one_line_longer_than_the_context_is_refused_not_truncated(ollama: FakeOllama) -> None:
    huge = [Utterance("customer", 0, "This sentence repeats to fill the context. " * 400)]
    with pytest.raises(TranscriptTooLong, match="does not fit"):
        await analyzer(OllamaBackend(settings(ollama.url))).analyze(huge, "en")
    assert ollama.requests == []


async def test_a_summary_naming_a_number_the_call_never_mentions_is_retried(ollama: FakeOllama) -> None:
    invented = {**GOOD, "summary": ["Customer was billed 45 euros twice.", "Customer is angry.", "Wants a refund."]}
    ollama.answers = [json.dumps(invented), json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")
    assert result.summary == tuple(GOOD["summary"])
    assert "summary[0] names 45, which the call never mentions" in ollama.requests[1]["messages"][-1]["content"]


async def test_a_bullet_still_invented_after_the_retry_is_dropped(ollama: FakeOllama) -> None:
    invented = {**GOOD, "summary": ["Customer was billed 45 euros twice.", "Customer is angry.", "Wants a refund."]}
    ollama.answers = [json.dumps(invented), json.dumps(invented)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")
    assert result.summary == ("Customer is angry.", "Wants a refund.") and result.dropped_bullets == 1


async def test_a_summary_asked_for_again_that_comes_back_broken_keeps_the_first_answer_less_the_invented_bullet(
        ollama: FakeOllama) -> None:
    invented = {**GOOD, "summary": ["Customer was billed 45 euros twice.", "Customer is angry.", "Wants a refund."]}
    ollama.answers = [json.dumps(invented), "not JSON at all"]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")
    assert result.summary == ("Customer is angry.", "Wants a refund.") and result.dropped_bullets == 1


async def test_a_summary_naming_someone_the_call_never_mentions_is_retried(ollama: FakeOllama) -> None:
    invented = {**GOOD, "summary": ["The customer spoke to John about a double charge.", "Customer is angry.",
                                    "Wants a refund."]}
    ollama.answers = [json.dumps(invented), json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(CALL, "en")
    assert result.summary == tuple(GOOD["summary"])
    assert "summary[0] names John, which the call never mentions" in ollama.requests[1]["messages"][-1]["content"]


SPANISH_CALL = [Utterance("customer", 0.0, "Me han cobrado dos veces la factura este mes y estoy muy enfadado.")]
SPANISH_CALL_IN_ENGLISH = json.dumps({"lines": ["I was charged twice on the bill this month and I am very angry."]})
BULLET_IN_SPANISH = "El cliente dice que le han cobrado dos veces la factura."


async def test_a_summary_written_in_the_calls_language_is_translated(ollama: FakeOllama) -> None:
    in_spanish = {**GOOD, "summary": [BULLET_IN_SPANISH, "Customer is angry.", "Wants a refund."],
                  "sub_topic": "factura"}
    bullet_in_english = "The customer says the bill was charged twice."
    ollama.answers = [SPANISH_CALL_IN_ENGLISH, json.dumps(in_spanish),
                      json.dumps({"lines": [bullet_in_english, "bill"]})]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(SPANISH_CALL, "es")
    assert result.summary == (bullet_in_english, "Customer is angry.", "Wants a refund.")
    assert result.sub_topic == "bill" and result.sentiment == GOOD["sentiment"]
    asked = ollama.requests[2]["messages"][-1]["content"]
    assert BULLET_IN_SPANISH in asked and "factura" in asked and "Customer is angry." not in asked
    assert len(ollama.requests) == 3  # the analysis is not asked for again


async def test_an_english_summary_of_a_spanish_call_is_taken_as_it_is(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps({"lines": ["I was charged twice on the UTS bill and I am very angry."]}),
                      json.dumps({**GOOD, "sub_topic": "UTS bill"})]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(
        [Utterance("customer", 0.0, "Me han cobrado dos veces la factura UTS y estoy muy enfadado.")], "es")
    assert result.summary == tuple(GOOD["summary"]) and result.sub_topic == "UTS bill"
    assert len(ollama.requests) == 2


async def test_a_line_given_back_untranslated_is_asked_for_again(ollama: FakeOllama) -> None:
    copy = json.dumps({"lines": [SPANISH_CALL[0].text]})
    ollama.answers = [copy, SPANISH_CALL_IN_ENGLISH, json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(SPANISH_CALL, "es")
    assert "line 1 is not translated: it repeats the Spanish line" in ollama.requests[1]["messages"][-1]["content"]
    assert result.translated_lines == ("I was charged twice on the bill this month and I am very angry.",)


async def test_a_translation_that_gives_back_the_error_it_was_told_keeps_the_line_as_it_was_said(
        ollama: FakeOllama) -> None:
    copy = json.dumps({"lines": [SPANISH_CALL[0].text]})
    echo = json.dumps({"lines": ["That answer is invalid: line 1 is not translated: it repeats the Spanish line"]})
    ollama.answers = [copy, echo, json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(SPANISH_CALL, "es")
    assert "line 1 is not translated" in ollama.requests[1]["messages"][-1]["content"]
    assert result.translated_lines == (SPANISH_CALL[0].text,)


async def test_a_translation_asked_for_again_that_comes_back_broken_keeps_the_first_answer(
        ollama: FakeOllama) -> None:
    copy = json.dumps({"lines": [SPANISH_CALL[0].text]})
    cut_off = '{"lines": ["I was charged twice on the bill this month and I am very'  # the token budget ran out
    ollama.answers = [copy, cut_off, json.dumps(GOOD)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(SPANISH_CALL, "es")
    assert result.translated_lines == (SPANISH_CALL[0].text,) and result.topic == GOOD["topic"]


async def test_a_line_of_names_and_numbers_may_stay_as_it_was_said(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps({"lines": ["Lucía López Fernández, 28 04 1990."]}), json.dumps(GOOD)]
    await analyzer(OllamaBackend(settings(ollama.url))).analyze(
        [Utterance("customer", 0.0, "Lucía López Fernández, 28 04 1990.")], "es")
    assert len(ollama.requests) == 2


async def test_names_weekdays_and_labels_the_call_gives_are_kept(ollama: FakeOllama) -> None:
    grounded = {**GOOD, "summary": ["The customer told Anna on Monday about a Billing problem.",
                                    "Customer is angry.", "Wants a refund."]}
    ollama.answers = [json.dumps(grounded)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(
        [Utterance("customer", 0, "Anna, since monday I have been billed twice!")], "en")
    assert result.summary[0].startswith("The customer told Anna") and len(ollama.requests) == 1


async def test_numbers_the_customer_said_may_be_summarised(ollama: FakeOllama) -> None:
    grounded = {**GOOD, "summary": ["Customer was billed 1,250.00 euros.", "Customer is angry.", "Wants a refund."]}
    ollama.answers = [json.dumps(grounded)]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(
        [Utterance("customer", 0, "You charged me 1250.00 euros!")], "en")
    assert result.summary[0] == "Customer was billed 1,250.00 euros." and len(ollama.requests) == 1


async def test_a_feeling_the_customer_names_outweighs_the_models_emotion(ollama: FakeOllama) -> None:
    ollama.answers = [json.dumps({**GOOD, "emotion": "frustrated"})]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze([Utterance(
        "unknown", 0, "I was charged twice for my phone bill this month, and am really angry about it.")], "en")
    assert result.emotion == "angry"
    assert result.sentiment == GOOD["sentiment"] and result.topic == GOOD["topic"]


async def test_a_feeling_named_in_the_translation_of_a_call_counts(ollama: FakeOllama) -> None:
    ollama.answers = [SPANISH_CALL_IN_ENGLISH, json.dumps({**GOOD, "emotion": "frustrated"})]
    result = await analyzer(OllamaBackend(settings(ollama.url))).analyze(SPANISH_CALL, "es")
    assert result.emotion == "angry"


@pytest.mark.parametrize("lines, emotions", [
    ([("customer", "I'm not angry, just tired of waiting."), ("agent", "I understand.")], DEFAULT_EMOTIONS),
    ([("customer", "I was worried last week, but it arrived."), ("agent", "Good to hear.")], DEFAULT_EMOTIONS),
    ([("customer", "I'm worried about the bill and I am furious about the fee.")], DEFAULT_EMOTIONS),
    ([("customer", "Why is my bill so high?"), ("agent", "I'm confused by this charge too, one moment.")],
     DEFAULT_EMOTIONS),
    ([("customer", "I am really angry about this bill.")], ("calm", "satisfied", "upset")),
], ids=["negated", "past", "two-feelings", "the-agents-words", "not-a-configured-emotion"])
async def test_a_feeling_the_customer_does_not_name_as_theirs_now_leaves_the_models_emotion(
        ollama: FakeOllama, lines: list[tuple[str, str]], emotions: tuple[str, ...]) -> None:
    call = [Utterance(speaker, float(i), text) for i, (speaker, text) in enumerate(lines)]
    each = {"customer_sentiment": "neutral", "agent_sentiment": "neutral"} if len(lines) > 1 else {}
    ollama.answers = [json.dumps({**GOOD, "emotion": "calm", **each})]
    result = await Analyzer(OllamaBackend(settings(ollama.url)), DEFAULT_TOPICS, emotions, 4096, 512).analyze(call, "en")
    assert result.emotion == "calm"


@pytest.mark.models
async def test_embedded_backend_answers_within_the_schema(llm_small: Path) -> None:
    backend = EmbeddedLlamaBackend(settings("", str(llm_small)))
    try:
        from services.analyze.analyzer import notes_schema, translation_schema

        call = "Agent: ¿En qué puedo ayudarle?\nCustomer: Mi paquete nunca llegó y estoy enfadado."
        for system, schema in (
            ("Analyse the call and answer in JSON.", analysis_schema(DEFAULT_TOPICS, DEFAULT_EMOTIONS, True)),
            ("Translate each line into English; answer in JSON.", translation_schema(call.splitlines())),
            ("Take notes on the call; answer in JSON.", notes_schema()),
        ):
            completion = await backend.complete_json(
                [{"role": "system", "content": system}, {"role": "user", "content": call}], schema, 400)
            jsonschema.validate(json.loads(completion.text), schema)
            assert completion.completion_tokens > 0
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def analysis_server(ollama_url: str, running: int = 1, queued: int = 1) -> AsyncIterator[RunningServer]:
    """The Analyze service on port 0 over the Ollama stand-in."""
    servicer = AnalysisServicer(analyzer(OllamaBackend(settings(ollama_url))), AdmissionLimiter(running, queued))
    server = await start_server("127.0.0.1:0", [ServiceBinding(
        "callcenter.v1.AnalysisService", lambda s: analyze_pb2_grpc.add_AnalysisServiceServicer_to_server(servicer, s))])
    try:
        yield server
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def analysis_service(ollama_url: str, running: int = 1, queued: int = 1) -> AsyncIterator[Any]:
    """The Analyze service on port 0 over the Ollama stand-in, and a stub to call it."""
    async with analysis_server(ollama_url, running, queued) as server, client_channel(server.address) as channel:
        yield analyze_pb2_grpc.AnalysisServiceStub(channel)


def english_request(call_id: str) -> analyze_pb2.AnalyzeRequest:
    return analyze_pb2.AnalyzeRequest(call_id=call_id, language_code="en",
                                      segments=[common_pb2.TranscriptSegment(text=CALL[0].text)])


async def test_analyze_beyond_its_limits_is_resource_exhausted_not_queued(ollama: FakeOllama) -> None:
    ollama.answers, ollama.delay = [json.dumps(GOOD)] * 2, 1.0
    async with analysis_service(ollama.url, running=1, queued=1) as stub:
        results = await asyncio.gather(*(stub.Analyze(english_request("busy"), timeout=30) for _ in range(3)),
                                       return_exceptions=True)
    codes = sorted(r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results)
    assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED"]  # one running, one queued, the third pushed back


async def test_translated_segments_keep_their_times_and_speakers(ollama: FakeOllama) -> None:
    both = {**GOOD, "agent_sentiment": "neutral", "customer_sentiment": "negative"}
    ollama.answers = [json.dumps({"lines": ["Good morning.", "I was charged twice."]}), json.dumps(both)]
    segments = [
        common_pb2.TranscriptSegment(index=0, start_offset=duration(0.5), end_offset=duration(1.5), text="Buenos días.",
                                     speaker=common_pb2.SPEAKER_AGENT, channel=0),
        common_pb2.TranscriptSegment(index=1, text="  "),  # nothing said: nothing to translate
        common_pb2.TranscriptSegment(index=2, start_offset=duration(2.0), end_offset=duration(4.0),
                                     text="Me cobraron dos veces.", speaker=common_pb2.SPEAKER_CUSTOMER, channel=1),
    ]
    async with analysis_service(ollama.url) as stub:
        answer = await stub.Analyze(analyze_pb2.AnalyzeRequest(call_id="tr", language_code="es", segments=segments),
                                    timeout=30)
    out = [(s.index, s.start_offset.ToTimedelta().total_seconds(), s.end_offset.ToTimedelta().total_seconds(),
            s.speaker, s.channel, s.text) for s in answer.translated_segments]
    assert out == [(0, 0.5, 1.5, common_pb2.SPEAKER_AGENT, 0, "Good morning."),
                   (2, 2.0, 4.0, common_pb2.SPEAKER_CUSTOMER, 1, "I was charged twice.")]
    assert answer.customer_sentiment == common_pb2.SENTIMENT_NEGATIVE and answer.parts == 1


async def test_a_call_past_its_deadline_is_cancelled_and_frees_its_slot(ollama: FakeOllama) -> None:
    ollama.answers, ollama.delay = [json.dumps(GOOD)] * 2, 3.0
    async with analysis_service(ollama.url, running=1, queued=0) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Analyze(english_request("late"), timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.3)
        ollama.delay = 0.0
        answer = await stub.Analyze(english_request("late"), timeout=10)  # the only slot is free again
    assert answer.topic == "Billing"


async def transcribed_call(tmp_path: Path, call_id: str, audio_seconds: float) -> None:
    """A call of ``audio_seconds`` transcribed before ingest starts: it resumes at analysis."""
    await stored_call(tmp_path, call_id, ANALYZING, transcript={
        "language": "en", "audio_duration": audio_seconds, "complete": True,
        "segments": [{"index": 0, "start": 0.0, "end": 4.0, "text": CALL[0].text, "speaker": "unknown"}]})


@pytest.mark.parametrize(("minutes", "outcome"), [(1, "failed"), (25, "delivering")])
async def test_the_analysis_deadline_grows_with_each_ten_minutes_of_the_call(
        ollama: FakeOllama, tmp_path: Path, minutes: int, outcome: str) -> None:
    # The model takes 1.5 s; ANALYZE_TIMEOUT_SECONDS is 1 s: a one-minute call gets 1 s, a 25-minute one 3 s.
    ollama.answers, ollama.delay = [json.dumps(GOOD)] * 2, 1.5
    await transcribed_call(tmp_path, "timed", minutes * 60.0)
    async with analysis_server(ollama.url) as server, running_ingest(
            tmp_path, analyze_addr=server.address, analyze_timeout=1.0) as ingest:
        status = await wait_for_state(ingest.url, "timed", {"failed", "delivering"}, timeout=20)
    assert status["status"] == outcome, status
    if outcome == "failed":
        assert "DEADLINE_EXCEEDED" in status["error"]["message"]


def test_each_started_ten_minutes_of_a_call_adds_one_analysis_timeout() -> None:
    assert [analysis_deadline(s, 900.0) for s in (None, 0.0, 600.0, 600.5, 1800.0, 3600.0)] == [
        900.0, 900.0, 900.0, 1800.0, 2700.0, 5400.0]


def test_an_llm_model_that_is_not_gguf_stops_the_embedded_backend_with_the_reason(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"<html>Not Found</html>" * 100)  # what a proxy may hand out instead of the model
    with pytest.raises(ValueError, match=r"model.gguf is not a GGUF model .*set LLM_MODEL"):
        EmbeddedLlamaBackend(settings("", str(model)))


@pytest.mark.models
def test_a_damaged_gguf_model_stops_the_embedded_backend_with_the_reason(tmp_path: Path, llm_small: Path,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.gguf"
    with llm_small.open("rb") as f:
        model.write_bytes(f.read(64 * 1024))  # a download cut short: the header, and little else
    with pytest.raises(RuntimeError, match=r"llama.cpp could not load .*model.gguf .*cut short or damaged"):
        EmbeddedLlamaBackend(settings("", str(model)))
    # llama.cpp's own reason, in the service's log. Its log lines are written by a thread of its own, a moment later.
    logged = ""
    for _ in range(100):
        logged += capfd.readouterr().err
        if "error loading model" in logged:
            break
        time.sleep(0.1)
    assert "error loading model" in logged


async def one_embedded_answer(llm_small: Path) -> None:
    backend = EmbeddedLlamaBackend(settings("", str(llm_small)))
    try:
        await backend.complete_json([{"role": "user", "content": "Say hello in JSON."}], notes_schema(), 16)
    finally:
        await backend.close()


@pytest.mark.models
async def test_at_log_level_info_llama_cpp_writes_no_lines_of_its_own(llm_small: Path, caplog: pytest.LogCaptureFixture,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="services.analyze.backends")
    await one_embedded_answer(llm_small)
    err = capfd.readouterr().err
    assert "slot" not in err and "print_timing" not in err


@pytest.mark.models
async def test_at_log_level_debug_llama_cpp_logs_each_request(llm_small: Path, caplog: pytest.LogCaptureFixture,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG, logger="services.analyze.backends")
    await one_embedded_answer(llm_small)
    assert "print_timing" in capfd.readouterr().err
