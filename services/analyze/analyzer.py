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
import re
import time
from collections.abc import Callable
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

PROMPT_VERSION = "2026-11-29.1"
SENTIMENTS = ("positive", "neutral", "negative")
# Every language Whisper can name a call's, by its code: the prompts say "a Latin phone call", not "a la phone call".
LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "ru": "Russian", "tr": "Turkish", "ar": "Arabic", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean", "hi": "Hindi", "sv": "Swedish", "ca": "Catalan", "ro": "Romanian",
    "id": "Indonesian", "fi": "Finnish", "vi": "Vietnamese", "he": "Hebrew", "uk": "Ukrainian", "el": "Greek",
    "ms": "Malay", "cs": "Czech", "da": "Danish", "hu": "Hungarian", "ta": "Tamil", "no": "Norwegian",
    "th": "Thai", "ur": "Urdu", "hr": "Croatian", "bg": "Bulgarian", "lt": "Lithuanian", "la": "Latin",
    "mi": "Maori", "ml": "Malayalam", "cy": "Welsh", "sk": "Slovak", "te": "Telugu", "fa": "Persian",
    "lv": "Latvian", "bn": "Bengali", "sr": "Serbian", "az": "Azerbaijani", "sl": "Slovenian", "kn": "Kannada",
    "et": "Estonian", "mk": "Macedonian", "br": "Breton", "eu": "Basque", "is": "Icelandic", "hy": "Armenian",
    "ne": "Nepali", "mn": "Mongolian", "bs": "Bosnian", "kk": "Kazakh", "sq": "Albanian", "sw": "Swahili",
    "gl": "Galician", "mr": "Marathi", "pa": "Punjabi", "si": "Sinhala", "km": "Khmer", "sn": "Shona",
    "yo": "Yoruba", "so": "Somali", "af": "Afrikaans", "oc": "Occitan", "ka": "Georgian", "be": "Belarusian",
    "tg": "Tajik", "sd": "Sindhi", "gu": "Gujarati", "am": "Amharic", "yi": "Yiddish", "lo": "Lao",
    "uz": "Uzbek", "fo": "Faroese", "ht": "Haitian Creole", "ps": "Pashto", "tk": "Turkmen",
    "nn": "Norwegian Nynorsk", "mt": "Maltese", "sa": "Sanskrit", "lb": "Luxembourgish", "my": "Burmese",
    "bo": "Tibetan", "tl": "Tagalog", "mg": "Malagasy", "as": "Assamese", "tt": "Tatar", "haw": "Hawaiian",
    "ln": "Lingala", "ha": "Hausa", "ba": "Bashkir", "jw": "Javanese", "su": "Sundanese", "yue": "Cantonese",
}
# A rough, safe estimate of tokens from characters (multilingual text, small vocabularies).
CHARS_PER_TOKEN = 3
# From Thai on (U+0E00: Thai, Lao, Tibetan, Myanmar, Georgian, Hangul, kana, CJK …) a character is about a token.
ONE_TOKEN_SCRIPTS_FROM = 0x0E00
PROMPT_TOKENS = 550  # the system prompt, the lists of topics and emotions (with their meanings), the chat template
ANALYSIS_ANSWER_TOKENS = 700
NOTES_PER_PART = 6
# What each default emotion means, given to the model beside the allowed list. Small models otherwise pick
# one word for every unhappy customer (bench/analysis_bench.py: "frustrated" for all of them). An emotion
# configured beyond these (ANALYZE_EMOTIONS) is offered by its name alone.
EMOTION_MEANINGS = {
    "calm": "even-tempered, no strong feeling",
    "satisfied": "pleased or thankful, the matter settled to their liking",
    "confused": "does not understand something, or does not know what to do",
    "anxious": "worried or afraid of what may happen, e.g. to their money, order or service",
    "frustrated": "fed up or impatient with a problem that goes on or keeps coming back",
    "angry": "says they are angry, or is hostile or indignant: blames, demands, threatens",
}
# A feeling the customer names in so many words, in English (the call or its translation): "I am really
# angry", "I'm so fed up", "I'm worried". It outweighs the model's pick, which the prompt asks to follow it and
# which small models do not: in the analysis benchmark the 1.5B answered "frustrated" for all seven angry
# customers, one of whom says "I was charged twice … and am really angry about it". Only the present and the
# first person count ("am" has no other subject), with nothing between "am" and the feeling but a word of
# degree ("I'm not angry", "I was worried" and "you are angry" name nothing).
NAMED_FEELINGS = {
    "angry": ("angry", "furious", "livid", "outraged"),
    "anxious": ("worried", "anxious", "nervous", "scared", "frightened"),
    "confused": ("confused",),
    "frustrated": ("frustrated", "fed up"),
}
FEELING_OF = {word: emotion for emotion, words in NAMED_FEELINGS.items() for word in words}
NAMED_FEELING = re.compile(
    r"\b(?:am|I['’]m|I feel)\s+(?:(?:really|very|so|quite|extremely|absolutely|pretty|rather|totally|completely|"
    r"truly|just|getting|feeling|a bit|a little)\s+)*(" + "|".join(sorted(FEELING_OF, key=len, reverse=True)) +
    r")\b", re.IGNORECASE)
# What each default topic covers, given beside the allowed list as the emotions' meanings are: with the names
# alone, the 1.5B answered "Billing" for an upgrade, a password reset and a delivery (bench/analysis_bench.py).
TOPIC_MEANINGS = {
    "Billing": "invoices, charges, prices paid, payments, refunds",
    "Technical Support": "something does not work: the line, internet, a device or an app",
    "Cancellation": "ending a contract, subscription or service",
    "Sales": "buying, upgrading or asking about a product, plan or offer",
    "Delivery": "an order or parcel: shipping, arrival, delay, loss, returns",
    "Account Access": "logging in, passwords, a locked or blocked account, personal details",
    "Complaint": "dissatisfied with the service or staff as a whole, wants it put right",
    "Other": "none of the above",
}
NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")


class AnalysisError(Exception):
    """The model gave no valid answer after a retry; the message says why."""


class TranscriptTooLong(Exception):
    """The transcript does not fit the model's context."""


@dataclass(frozen=True)
class Utterance:
    speaker: str  # "agent", "customer" or "unknown"
    start: float
    text: str


def tokens(text: str) -> int:
    wide = sum(1 for ch in text if ord(ch) >= ONE_TOKEN_SCRIPTS_FROM)
    return (len(text) - wide) // CHARS_PER_TOKEN + wide + 1


# Capitalised mid-sentence without being a name the call must have said.
COMMON_CAPITALISED = frozenset(
    "i i'm i've i'll i'd ok monday tuesday wednesday thursday friday saturday sunday january february march april "
    "may june july august september october november december customer agent internet wi fi english".split()
) | frozenset(word.lower() for name in LANGUAGE_NAMES.values() for word in name.split())


def names_in(text: str) -> set[str]:
    """Capitalised words that do not open a sentence: the names (people, companies, places) in ``text``."""
    found = set()
    for sentence in re.split(r"[.!?:;\n]+", text):
        words = re.findall(r"[\w'’-]+", sentence)
        found |= {w for w in words[1:] if re.fullmatch(r"[A-ZÀ-Ý][a-zà-ÿ'’-]+", w)}
    return found


def numbers_in(text: str) -> set[str]:
    """Numbers as digits only ("1,250.00" → "125000"), to compare across ways of writing them."""
    return {re.sub(r"\D", "", n) for n in NUMBER.findall(text)}


LETTERS = re.compile(r"[^\W\d_]+")  # a word of letters only (no digits)


def letter_words(text: str) -> list[str]:
    """The words of ``text`` made of letters only, lower-cased (no numbers)."""
    return LETTERS.findall(text.lower())


# Words English sentences are made with. A few are words of other languages too ("a", "no", "in", "was", "on",
# "do"…): those are never taken as the call's own words, and only "a" counts as English.
ENGLISH_GLUE = frozenset("""the a and of to for with about from by at is are were be been have had would could can
cannot not it its they their them she his her who which what when after before because there into also than then
that this these those but if our your you we i""".split())
SHARED_WITH_ENGLISH = frozenset("a i no in an on so do me he has was will die as or".split())


def call_language_words(text: str, call_only: set[str], english_only: set[str]) -> list[str]:
    """The words of ``text`` that the call said but its English translation does not, when they show ``text``
    written in the call's language instead of English: every word of a text of one or two words; at least three
    of a longer one, more than the words only the translation has; or any, in a text of four words or more with no
    word that English sentences are made with (:data:`ENGLISH_GLUE`). Words the call and its translation both
    hold (names, "internet") count for neither."""
    words = letter_words(text)
    own = [w for w in words if w in call_only and w not in SHARED_WITH_ENGLISH]
    if not own:
        return []
    english = sum(w in english_only for w in words)
    if len(own) >= min(3, len(words)) and len(own) > english:
        return own
    return own if len(words) >= 4 and not ENGLISH_GLUE.intersection(words) else []


INVALID_ANSWER = "That answer is invalid"  # how the model is told that its answer is sent back, and why


def untranslated_copy(line: str, said: str) -> bool:
    """Whether ``line``, given as the English of ``said``, is ``said`` itself: the same words, three or more of
    them not capitalised (names and numbers are the same in English), none a word English sentences are made
    with."""
    words = letter_words(line)
    common = [w for w in LETTERS.findall(said) if w[0].islower()]
    return words == letter_words(said) and len(common) >= 3 and not ENGLISH_GLUE.intersection(words)


@dataclass(frozen=True)
class AnalysisResult:
    summary: tuple[str, ...]  # three bullets, fewer when one named a number or name the call never mentions
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
    translated_lines: tuple[str, ...] = ()  # one per utterance analysed, in order; empty for English calls
    parts: int = 1  # how many parts a long transcript was read in
    dropped_bullets: int = 0  # summary bullets dropped for naming numbers or names the call never mentioned


# How a line of the transcript the model reads names its speaker; anyone else is "Speaker".
SPEAKER_LABELS = {"agent": "Agent", "customer": "Customer"}
UNKNOWN_SPEAKER_LABEL = "Speaker"
# The number and speaker label of a line, when the model repeats them in its translation (it is asked not to).
ECHOED_LABEL = re.compile(r"^\s*(?:\d+\.\s*)?(?:%s)\s*:\s*"
                          % "|".join(map(re.escape, [*SPEAKER_LABELS.values(), UNKNOWN_SPEAKER_LABEL])))


def render_transcript(utterances: list[Utterance], unknown_label: str = UNKNOWN_SPEAKER_LABEL) -> str:
    """One line per utterance, ``Label: text``; with ``unknown_label`` empty, a line whose speaker is not
    known is the bare text (the English translation given back: "Speaker" only helps the model read)."""
    lines = []
    for u in utterances:
        label = SPEAKER_LABELS.get(u.speaker, unknown_label)
        lines.append(f"{label}: {u.text.strip()}" if label else u.text.strip())
    return "\n".join(lines)


def named_feeling(utterances: list[Utterance], emotions: tuple[str, ...], customer_only: bool) -> str | None:
    """The one emotion of ``emotions`` that the customer names in English (:data:`NAMED_FEELING`), in the
    customer's lines when ``customer_only``, else in every line; None when none is named, or more than one."""
    named = {FEELING_OF[m.group(1).lower()] for u in utterances if not customer_only or u.speaker == "customer"
             for m in NAMED_FEELING.finditer(u.text)}
    named &= set(emotions)
    return named.pop() if len(named) == 1 else None


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


def translation_schema(lines: list[str]) -> dict:
    """One English string per line given, in order; each bounded by its longest source line."""
    longest = max((len(line) for line in lines), default=0)
    return {
        "type": "object",
        "properties": {"lines": {"type": "array", "minItems": len(lines), "maxItems": len(lines),
                                 "items": {"type": "string", "minLength": 1, "maxLength": max(120, 3 * longest)}}},
        "required": ["lines"],
        "additionalProperties": False,
    }


def notes_schema() -> dict:
    return {
        "type": "object",
        "properties": {"notes": {"type": "array", "minItems": 1, "maxItems": NOTES_PER_PART,
                                 "items": {"type": "string", "minLength": 3, "maxLength": 200}}},
        "required": ["notes"],
        "additionalProperties": False,
    }


ANALYSIS_SYSTEM = (
    "You analyse recorded customer-service phone calls for a contact center. "
    "Read the transcript and answer in JSON only, in English whatever the call's language:\n"
    "- sentiment: the customer's overall sentiment. negative when the customer complains, is angry, upset or "
    "threatens to leave; positive when the customer thanks or praises; neutral otherwise.\n"
    "- emotion: the customer's dominant emotion, from the allowed list: the feeling the customer names or "
    "shows most strongly, whatever the topic.\n"
    "- customer_sentiment and agent_sentiment (when asked): each speaker's own sentiment.\n"
    "- topic: the one category from the allowed list that best fits what the customer called about.\n"
    "- sub_topic: a few words, more precise than the topic, on what exactly the customer called about.\n"
    "- resolved: true only when the customer's request was dealt with during the call.\n"
    "- follow_up_actions: what someone still has to do after the call (at most three, empty when nothing).\n"
    "- summary: exactly three short bullet points, one sentence each, on what was said. Use only facts stated "
    "in the transcript; never invent what a speaker said or did, names or amounts."
)

TRANSLATION_SYSTEM = (
    "You are a professional translator. The user gives numbered lines of a {language} phone call. "
    "Translate each line into English on its own, in order, without its number or speaker label; add nothing, "
    "summarise nothing. Answer in JSON: {{\"lines\": [\"translation of line 1\", \"translation of line 2\", ...]}} "
    "with exactly {count} strings."
)

NOTES_SYSTEM = (
    "You take notes on one part of a long customer-service phone call, for a colleague who will summarise the "
    "whole call from everybody's notes. In English, whatever the call's language, write at most {count} short "
    "notes on what this part says: the customer's requests and problems, what the agent did or promised, "
    "amounts, dates and names exactly as said, the outcome, and how the customer sounds. Use only what the "
    "transcript says. Answer in JSON: {{\"notes\": [\"...\"]}}."
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

    def _parts(self, lines: list[str], room: int, what: str) -> list[list[int]]:
        """Indexes of ``lines`` in consecutive groups of at most ``room`` tokens each."""
        parts: list[list[int]] = [[]]
        used = 0
        for i, line in enumerate(lines):
            cost = tokens(line) + 1
            if cost > room:
                raise TranscriptTooLong(
                    f"one {what} line ({len(line)} characters, about {cost} tokens) does not fit the model's context "
                    f"of {self.context_tokens} tokens with its prompt and answer; raise LLM_CONTEXT_TOKENS")
            if used + cost > room and parts[-1]:
                parts.append([])
                used = 0
            parts[-1].append(i)
            used += cost
        return parts

    async def _ask(self, purpose: str, messages: list[dict[str, str]], schema: dict, max_tokens: int,
                   check: Callable[[dict], str | None] | None = None) -> tuple[dict, Completion]:
        """Ask, validate (schema, then ``check``), and on a bad answer ask once more with the error. An answer
        that only ``check`` found fault with is kept when the one asked for again is not valid at all: a check
        makes an answer better when it can, never a call fail (the 0.5B, told that it had copied lines instead of
        translating them, answered with JSON cut off at its token budget)."""
        error = ""
        checked: tuple[dict, Completion] | None = None  # valid, but not to the check's liking
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
                    answer = _parse(completion, schema)
                    problem = check(answer) if check and attempt == 1 else None
                    if problem:
                        checked = answer, completion
                        raise ValueError(problem)
                    return answer, completion
                except ValueError as exc:
                    error = str(exc)
                    span.add_event("invalid_answer", {"error": error})
                    log.warning("%s: invalid answer on attempt %d: %s", purpose, attempt, error)
                    if attempt == 2 and checked is not None:
                        log.warning("%s: keeping the first answer, which was valid", purpose)
                        return checked
                    messages = [*messages, {"role": "assistant", "content": completion.text[:2000]},
                                {"role": "user", "content": f"{INVALID_ANSWER}: {error}. Answer again with "
                                                            "JSON that follows the schema exactly."}]
        raise AnalysisError(f"the model gave no valid {purpose} after 2 attempts: {error}")

    async def _notes(self, lines: list[str], language: str) -> tuple[str, int, int]:
        """Map step for a transcript too long for one prompt: notes on each part, then notes on the notes
        until they fit. Returns the text to analyse, the number of parts first read, and tokens used."""
        room = self.context_tokens - PROMPT_TOKENS - ANALYSIS_ANSWER_TOKENS
        used, first_parts = 0, 0
        while sum(tokens(line) + 1 for line in lines) > room:
            parts = self._parts(lines, self.context_tokens - PROMPT_TOKENS - 60 * NOTES_PER_PART, "transcript")
            first_parts = first_parts or len(parts)
            notes: list[str] = []
            for n, part in enumerate(parts, 1):
                answer, completion = await self._ask("notes", [
                    {"role": "system", "content": NOTES_SYSTEM.format(count=NOTES_PER_PART)},
                    {"role": "user", "content": f"Call language: {LANGUAGE_NAMES.get(language, language)}. "
                                                f"Part {n} of {len(parts)}:\n" + "\n".join(lines[i] for i in part)},
                ], notes_schema(), 60 * NOTES_PER_PART)
                used += completion.completion_tokens
                notes += [f"(part {n}) {note.strip()}" for note in answer["notes"]]
            if len(notes) >= len(lines):  # no shorter: stop rather than loop
                raise TranscriptTooLong(f"notes on {len(parts)} parts do not fit the model's context of "
                                        f"{self.context_tokens} tokens; raise LLM_CONTEXT_TOKENS")
            lines = notes
        return "\n".join(lines), first_parts, used

    async def _translate(self, utterances: list[Utterance], language: str) -> tuple[tuple[str, ...], int]:
        """Each utterance into English on its own line, in batches that fit the context."""
        lines = [u.text.strip() for u in utterances]
        # Room for the batch, and as much again (and a half) for its translation.
        parts = self._parts(lines, int((self.context_tokens - PROMPT_TOKENS) / 2.5), "transcript")
        out: list[str] = []
        used = 0
        name = LANGUAGE_NAMES.get(language, language)
        for part in parts:
            batch = [lines[i] for i in part]
            numbered = "\n".join(f"{n}. {render_transcript([utterances[i]])}" for n, i in enumerate(part, 1))

            def copied(answer: dict, batch: list[str] = batch) -> str | None:
                """Lines given back as they were said instead of translated (a small model does that)."""
                same = [n for n, (line, said) in enumerate(zip(answer["lines"], batch), 1)
                        if untranslated_copy(ECHOED_LABEL.sub("", line), said)]
                return "; ".join(f"line {n} is not translated: it repeats the {name} line" for n in same) or None

            answer, completion = await self._ask("translation", [
                {"role": "system", "content": TRANSLATION_SYSTEM.format(language=name, count=len(batch))},
                {"role": "user", "content": numbered},
            ], translation_schema(batch), min(self.max_answer_tokens * 4, 2 * sum(tokens(b) for b in batch) + 64),
                check=copied)
            used += completion.completion_tokens
            # A small model asked again can give back the error it was told instead of a translation: the line
            # then stays as it was said.
            out += [said if INVALID_ANSWER in line else ECHOED_LABEL.sub("", line).strip()
                    for line, said in zip(answer["lines"], batch)]
        return tuple(out), used

    async def analyze(self, utterances: list[Utterance], language: str,
                      translation: list[Utterance] | None = None) -> AnalysisResult:
        """``translation``: an English translation made elsewhere (Whisper's); the LLM then translates nothing."""
        if self.redact_pii:  # each utterance read with the few before it, as ingest and crm read segments
            redactor = pii.SegmentRedactor()
            for u in utterances:
                redactor.add(u.text, u.speaker)
            utterances = [replace(u, text=redactor.masked(k)[0]) for k, u in enumerate(utterances)]
        utterances = [u for u in utterances if u.text.strip()]
        if not utterances:
            raise ValueError("the transcript is empty")
        speakers_known = {"agent", "customer"} <= {u.speaker for u in utterances}
        language = (language or "en").lower()
        started = time.perf_counter()
        lines = render_transcript(utterances).splitlines()
        transcript, parts, used = await self._notes(lines, language)
        heading = "Transcript" if parts == 0 else f"Notes on the call, read in {parts} parts, in order"
        topics = "; ".join(f"{t} ({TOPIC_MEANINGS[t]})" if t in TOPIC_MEANINGS else t for t in self.topics)
        emotions = "; ".join(f"{e} ({EMOTION_MEANINGS[e]})" if e in EMOTION_MEANINGS else e for e in self.emotions)
        translated_lines: tuple[str, ...] = ()
        if language != "en" and not translation:
            translated_lines, more = await self._translate(utterances, language)
            used += more
        english = list(translated_lines) + [u.text for u in translation or []]
        said = " ".join(u.text for u in utterances) + " " + " ".join(english)
        spoken = numbers_in(said)
        words_said = {w.lower() for w in re.findall(r"[\w'’-]+", said)}
        allowed = COMMON_CAPITALISED | {w.lower() for label in (*self.topics, *self.emotions) for w in label.split()}

        def ungrounded(answer: dict) -> list[tuple[int, set[str]]]:
            return [(i, missing) for i, bullet in enumerate(answer["summary"])
                    if (missing := (numbers_in(bullet) - spoken)
                        | {n for n in names_in(bullet) if n.lower() not in words_said | allowed})]

        def grounding(answer: dict) -> str | None:
            bad = ungrounded(answer)
            return "; ".join(f"summary[{i}] names {', '.join(sorted(m))}, which the call never mentions"
                             for i, m in bad) or None

        answer, first = await self._ask("analysis", [
            {"role": "system", "content": ANALYSIS_SYSTEM},
            {"role": "user", "content": f"Allowed topics: {topics}.\nAllowed emotions: {emotions}.\n"
                                        f"Call language: {LANGUAGE_NAMES.get(language, language)}.\n\n"
                                        f"{heading}:\n{transcript}"},
        ], self.schema_with_speakers if speakers_known else self.schema,
            min(self.max_answer_tokens, ANALYSIS_ANSWER_TOKENS), check=grounding)
        used += first.completion_tokens
        dropped = {i for i, _ in ungrounded(answer)}  # still there after the retry: not kept
        if dropped:
            log.warning("dropped %d summary bullet(s) naming numbers or names the call never mentions", len(dropped))
        summary = tuple(b.strip().lstrip("-• ").strip() for i, b in enumerate(answer["summary"]) if i not in dropped)
        sub_topic, follow_up = answer["sub_topic"].strip(), tuple(a.strip() for a in answer["follow_up_actions"])
        # A small model sometimes writes the summary in the call's language: found by the words the call said
        # that its English translation does not (none for an English call, nor without a translation). Such text
        # is translated, not asked for again: a whole analysis again costs more, can change the labels, and the
        # small model answered in the call's language again.
        call_words = set(letter_words(" ".join(u.text for u in utterances)))
        english_words = set(letter_words(" ".join(english)))
        call_only = call_words - english_words if english else set()
        texts = {f"summary[{i}]": b for i, b in enumerate(summary)} | {"sub_topic": sub_topic} | {
            f"follow_up_actions[{i}]": a for i, a in enumerate(follow_up)}
        if still := {where: own for where, text in texts.items()
                     if (own := call_language_words(text, call_only, english_words - call_words))}:
            name = LANGUAGE_NAMES.get(language, language)
            log.warning("the analysis wrote %s in %s, not in English: translating them (%s …)", ", ".join(still),
                        name, ", ".join(dict.fromkeys(next(iter(still.values()))[:4])))
            english_texts, more = await self._translate([Utterance("unknown", 0.0, texts[w]) for w in still], language)
            used += more
            texts.update(zip(still, english_texts))
            sub_topic = texts["sub_topic"]
            summary = tuple(texts[f"summary[{i}]"] for i in range(len(summary)))
            follow_up = tuple(texts[f"follow_up_actions[{i}]"] for i in range(len(follow_up)))
        english_lines = translation if translation and language != "en" else [
            replace(u, text=t) for u, t in zip(utterances, translated_lines)]
        translated = render_transcript(english_lines, unknown_label="")
        emotion = answer["emotion"]
        named = named_feeling(utterances if language == "en" else list(english_lines), self.emotions, speakers_known)
        if named and named != emotion:
            log.info("the customer says they are %s: emotion %s, where the model answered %s", named, named, emotion)
            emotion = named
        return AnalysisResult(
            summary=summary,  # type: ignore[arg-type]
            topic=answer["topic"],
            sentiment=answer["sentiment"],
            emotion=emotion,
            translated_transcript=translated,
            model=self.backend.name,
            prompt_version=PROMPT_VERSION,
            seconds=time.perf_counter() - started,
            completion_tokens=used,
            sub_topic=sub_topic,
            agent_sentiment=answer.get("agent_sentiment", ""),
            customer_sentiment=answer.get("customer_sentiment", ""),
            resolved=answer["resolved"],
            follow_up_actions=follow_up,
            translated_lines=translated_lines,
            parts=max(parts, 1),
            dropped_bullets=len(dropped),
        )
