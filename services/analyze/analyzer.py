"""The analysis itself: prompt and schema as code, validation, one retry.

Knows nothing of gRPC. Two requests per call: one for summary, topic,
sentiment and emotion (in English, whatever the call's language), one for the
English translation, since small models asked for both at once summarise
instead of translating. An answer that breaks the schema is retried once with
the validation error; a second bad answer fails the call.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

import jsonschema

from services.analyze.backends import Completion, LlmBackend
from services.common import pii
from services.common.metrics import meter
from services.common.telemetry import tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
_meter = meter(__name__)
_tokens = _meter.create_counter("callmesh.llm.completion_tokens", description="Tokens the LLM generated (purpose)")
_tokens_per_second = _meter.create_histogram(
    "callmesh.llm.tokens_per_second", description="Generation speed of one LLM answer (purpose)",
    explicit_bucket_boundaries_advisory=(1, 2, 5, 10, 20, 30, 50, 75, 100, 200))

PROMPT_VERSION = "2026-11-25.3"
SENTIMENTS = ("positive", "neutral", "negative")
LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "ru": "Russian", "tr": "Turkish", "ar": "Arabic", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean", "hi": "Hindi", "sv": "Swedish", "ca": "Catalan", "ro": "Romanian",
}
# A rough bound to refuse, not truncate, transcripts that cannot fit the context.
CHARS_PER_TOKEN = 3


class AnalysisError(Exception):
    """The model gave no valid answer after a retry; the message says why."""


class TranscriptTooLong(Exception):
    """The transcript does not fit the model's context."""


@dataclass(frozen=True)
class Utterance:
    speaker: str  # "agent", "customer" or "unknown"
    start: float
    text: str


@dataclass(frozen=True)
class AnalysisResult:
    summary: tuple[str, str, str]
    topic: str
    sentiment: str
    emotion: str
    translated_transcript: str
    model: str
    prompt_version: str
    seconds: float
    completion_tokens: int
    sub_topic: str = ""
    agent_sentiment: str = ""  # empty when the speakers are not known
    customer_sentiment: str = ""
    resolved: bool = False
    follow_up_actions: tuple[str, ...] = ()


def render_transcript(utterances: list[Utterance]) -> str:
    lines = []
    for u in utterances:
        label = {"agent": "Agent", "customer": "Customer"}.get(u.speaker, "Speaker")
        lines.append(f"{label}: {u.text.strip()}")
    return "\n".join(lines)


def analysis_schema(topics: tuple[str, ...], emotions: tuple[str, ...], speakers_known: bool = False) -> dict:
    """Every string and list bounded, so a small model always terminates."""
    # Sentiment and emotion come first: the model judges the customer before it writes
    # the summary, so its own wording cannot sway the judgement.
    properties: dict = {
        "sentiment": {"type": "string", "enum": list(SENTIMENTS)},
        "emotion": {"type": "string", "enum": list(emotions)},
    }
    if speakers_known:
        properties["customer_sentiment"] = {"type": "string", "enum": list(SENTIMENTS)}
        properties["agent_sentiment"] = {"type": "string", "enum": list(SENTIMENTS)}
    properties.update({
        "topic": {"type": "string", "enum": list(topics)},
        "sub_topic": {"type": "string", "minLength": 2, "maxLength": 60},
        "resolved": {"type": "boolean"},
        "follow_up_actions": {
            "type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 120}, "maxItems": 3,
        },
        "summary": {
            "type": "array",
            "items": {"type": "string", "minLength": 3, "maxLength": 200},
            "minItems": 3,
            "maxItems": 3,
        },
    })
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def translation_schema(source_chars: int) -> dict:
    return {
        "type": "object",
        "properties": {"translation": {"type": "string", "minLength": 1, "maxLength": max(200, 3 * source_chars)}},
        "required": ["translation"],
        "additionalProperties": False,
    }


ANALYSIS_SYSTEM = (
    "You analyse recorded customer-service phone calls for a contact center. "
    "Read the transcript and answer in JSON only, in English whatever the call's language:\n"
    "- sentiment: the customer's overall sentiment. negative when the customer complains, is angry, upset or "
    "threatens to leave; positive when the customer thanks or praises; neutral otherwise.\n"
    "- emotion: the customer's dominant emotion, from the allowed list.\n"
    "- customer_sentiment and agent_sentiment (when asked): each speaker's own sentiment.\n"
    "- topic: the one category from the allowed list that best fits the call.\n"
    "- sub_topic: a few words that narrow the topic down, e.g. \"double charge on invoice\".\n"
    "- resolved: true only when the customer's request was dealt with during the call.\n"
    "- follow_up_actions: what someone still has to do after the call (at most three, empty when nothing).\n"
    "- summary: exactly three short bullet points, one sentence each, on what was said. Use only facts stated "
    "in the transcript; never invent what a speaker said or did, names or amounts."
)

TRANSLATION_SYSTEM = (
    "You are a professional translator. Translate the {language} phone-call transcript the user gives "
    "into English. Translate every line, keep the speaker labels and the line order, add nothing, "
    "summarise nothing. Answer in JSON: {{\"translation\": \"...\"}}."
)


def _parse(completion: Completion, schema: dict) -> dict:
    try:
        answer = json.loads(completion.text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the answer is not JSON ({exc.msg} at position {exc.pos})") from exc
    try:
        jsonschema.validate(answer, schema)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "answer"
        raise ValueError(f"{path}: {exc.message}") from exc
    return answer


class Analyzer:
    """Turns a transcript into a validated analysis with one LLM backend."""

    def __init__(self, backend: LlmBackend, topics: tuple[str, ...], emotions: tuple[str, ...],
                 context_tokens: int, max_answer_tokens: int, redact_pii: bool = False) -> None:
        self.backend = backend
        self.redact_pii = redact_pii  # mask personal data before the transcript reaches the LLM
        self.topics = topics
        self.emotions = emotions
        self.context_tokens = context_tokens
        self.max_answer_tokens = max_answer_tokens
        self.schema = analysis_schema(topics, emotions)
        self.schema_with_speakers = analysis_schema(topics, emotions, speakers_known=True)

    def _check_fits(self, text: str, answer_tokens: int) -> None:
        needed = len(text) // CHARS_PER_TOKEN + 300 + answer_tokens
        if needed > self.context_tokens:
            raise TranscriptTooLong(
                f"the transcript ({len(text)} characters, about {needed} tokens with the answer) does not fit the "
                f"model's context of {self.context_tokens} tokens; raise LLM_CONTEXT_TOKENS"
            )

    async def _ask(self, purpose: str, messages: list[dict[str, str]], schema: dict, max_tokens: int) -> tuple[dict, Completion]:
        """Ask, validate, and on a bad answer ask once more with the validation error."""
        error = ""
        for attempt in (1, 2):
            with _tracer.start_as_current_span(f"llm.{purpose}", attributes={
                "llm.model": self.backend.name, "llm.attempt": attempt, "llm.prompt_version": PROMPT_VERSION,
            }) as span:
                asked = time.perf_counter()
                completion = await self.backend.complete_json(messages, schema, max_tokens)
                elapsed = time.perf_counter() - asked
                _tokens.add(completion.completion_tokens, {"purpose": purpose})
                if elapsed > 0 and completion.completion_tokens:
                    _tokens_per_second.record(completion.completion_tokens / elapsed, {"purpose": purpose})
                span.set_attribute("llm.prompt_tokens", completion.prompt_tokens)
                span.set_attribute("llm.completion_tokens", completion.completion_tokens)
                try:
                    return _parse(completion, schema), completion
                except ValueError as exc:
                    error = str(exc)
                    span.add_event("invalid_answer", {"error": error})
                    log.warning("%s: invalid answer on attempt %d: %s", purpose, attempt, error)
                    messages = [*messages, {"role": "assistant", "content": completion.text[:2000]},
                                {"role": "user", "content": f"That answer is invalid: {error}. Answer again with "
                                                            "JSON that follows the schema exactly."}]
        raise AnalysisError(f"the model gave no valid {purpose} after 2 attempts: {error}")

    async def analyze(self, utterances: list[Utterance], language: str) -> AnalysisResult:
        if self.redact_pii:
            utterances = [replace(u, text=pii.redact(u.text)[0]) for u in utterances]
        transcript = render_transcript(utterances)
        speakers_known = {"agent", "customer"} <= {u.speaker for u in utterances}
        if not transcript.strip():
            raise ValueError("the transcript is empty")
        language = (language or "en").lower()
        self._check_fits(transcript, self.max_answer_tokens)
        started = time.perf_counter()
        topics = ", ".join(self.topics)
        emotions = ", ".join(self.emotions)
        answer, first = await self._ask("analysis", [
            {"role": "system", "content": ANALYSIS_SYSTEM},
            {"role": "user", "content": f"Allowed topics: {topics}.\nAllowed emotions: {emotions}.\n"
                                        f"Call language: {LANGUAGE_NAMES.get(language, language)}.\n\n"
                                        f"Transcript:\n{transcript}"},
        ], self.schema_with_speakers if speakers_known else self.schema, min(self.max_answer_tokens, 700))
        tokens = first.completion_tokens
        translation = ""
        if language != "en":
            schema = translation_schema(len(transcript))
            budget = min(self.max_answer_tokens * 4, max(256, len(transcript)))
            self._check_fits(transcript, budget)
            translated, second = await self._ask("translation", [
                {"role": "system", "content": TRANSLATION_SYSTEM.format(language=LANGUAGE_NAMES.get(language, language))},
                {"role": "user", "content": transcript},
            ], schema, budget)
            translation = translated["translation"].strip()
            tokens += second.completion_tokens
        summary = tuple(b.strip().lstrip("-• ").strip() for b in answer["summary"])
        return AnalysisResult(
            summary=summary,  # type: ignore[arg-type]
            topic=answer["topic"],
            sentiment=answer["sentiment"],
            emotion=answer["emotion"],
            translated_transcript=translation,
            model=self.backend.name,
            prompt_version=PROMPT_VERSION,
            seconds=time.perf_counter() - started,
            completion_tokens=tokens,
            sub_topic=answer["sub_topic"].strip(),
            agent_sentiment=answer.get("agent_sentiment", ""),
            customer_sentiment=answer.get("customer_sentiment", ""),
            resolved=answer["resolved"],
            follow_up_actions=tuple(a.strip() for a in answer["follow_up_actions"]),
        )
