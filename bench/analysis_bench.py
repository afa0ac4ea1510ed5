"""Analysis accuracy on the labelled evaluation set, per LLM, and the two translation sources.

    .venv/bin/python -m bench --only analysis

Each call is transcribed by the service's engine (stereo, no language hint), then analysed
by the service's analyzer on each embedded model; topic, sentiment and emotion are scored
against the labels; so are the written transcripts of ``WRITTEN_CALLS`` (no speech recognition:
the LLM's own share of the errors). The English text from the LLM (line by line) and from Whisper's translate
task are scored the same way: key-word recall against the labelled key words, and length
against the reference translation. Ollama is not installed on the build machines: its
backend is exercised by the tests against a stand-in, not measured here.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from bench.analysis_evalset import CALLS, DICTATED_CALLS, WRITTEN_CALLS, DictatedCall, LabelledCall, generate, \
    reference_english
from bench.common import RESULTS, Result, value_result

MODELS = {"qwen2.5-coder-0.5b": "0.5B", "qwen2.5-coder-1.5b": "1.5B"}


def recall(text: str, keywords: tuple[str, ...]) -> float:
    lowered = text.lower()
    return sum(k in lowered for k in keywords) / len(keywords)


def transcribe_all(audio: dict[str, Path], whisper: Path) -> dict[str, dict]:
    from services.transcribe.config import EngineSettings
    from services.transcribe.engine import LanguageResult, SegmentResult, TranscribeOptions, WhisperEngine

    engine = WhisperEngine(EngineSettings(model_path=whisper))
    out = {}
    for call in CALLS:
        events = list(engine.run(audio[call.key], TranscribeOptions(stereo=True, agent_channel="left")))
        language = next(e.code for e in events if isinstance(e, LanguageResult))
        segments = [e for e in events if isinstance(e, SegmentResult)]
        whisper_english = ""
        started = time.perf_counter()
        if language != "en":
            translated = engine.run(audio[call.key], TranscribeOptions(stereo=True, agent_channel="left",
                                                                        language=language, task="translate"))
            whisper_english = " ".join(e.text for e in translated if isinstance(e, SegmentResult))
        out[call.key] = {"language": language, "segments": segments, "whisper_english": whisper_english,
                         "whisper_translate_seconds": time.perf_counter() - started}
    return out


def embedded_analyzer(model_path: Path):
    """The service's analyzer on the embedded model at ``model_path``, as the benchmarks run it."""
    from services.analyze.analyzer import Analyzer
    from services.analyze.backends import EmbeddedLlamaBackend
    from services.analyze.config import DEFAULT_EMOTIONS, DEFAULT_TOPICS, LlmSettings

    settings = LlmSettings(ollama_host="", model=str(model_path), context_tokens=4096, max_answer_tokens=1024,
                           threads=os.cpu_count() or 1, timeout_seconds=600, keep_alive="")
    backend = EmbeddedLlamaBackend(settings)
    return backend, Analyzer(backend, DEFAULT_TOPICS, DEFAULT_EMOTIONS, 4096, 1024)


async def analyse_all(model_path: Path, transcripts: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """The spoken calls' rows, then the written calls' rows."""
    from services.analyze.analyzer import Utterance

    backend, analyzer = embedded_analyzer(model_path)
    rows: list[dict] = []
    written: list[dict] = []
    spoken = [(call, transcripts[call.key], rows) for call in CALLS]
    as_written = [(call, {"language": call.language, "whisper_english": "", "segments": [
        Utterance(speaker, float(i), line) for i, (speaker, line) in enumerate(call.turns)]}, written)
        for call in WRITTEN_CALLS]
    try:
        for call, t, out in spoken + as_written:
            utterances = [Utterance(s.speaker, s.start, s.text) for s in t["segments"]]
            started = time.perf_counter()
            try:
                result = await analyzer.analyze(utterances, t["language"])
                error = ""
            except Exception as exc:  # a failed call is scored wrong on everything, and counted
                result, error = None, f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - started
            out.append(score(call, t, result, seconds, error))
    finally:
        await backend.close()
    return rows, written


def score(call: LabelledCall, t: dict, result, seconds: float, error: str) -> dict:
    english = reference_english(call)
    row = {"call": call.key, "language": call.language, "detected": t["language"], "seconds": seconds,
           "error": error, "labels": {"topic": call.topic, "sentiment": call.sentiment, "emotion": call.emotion}}
    if result is None:
        return {**row, "topic_ok": False, "sentiment_ok": False, "emotion_ok": False, "tokens_per_second": 0.0}
    row.update(answer={"topic": result.topic, "sentiment": result.sentiment, "emotion": result.emotion,
                       "sub_topic": result.sub_topic, "summary": list(result.summary)},
               topic_ok=result.topic == call.topic, sentiment_ok=result.sentiment == call.sentiment,
               emotion_ok=result.emotion == call.emotion,
               tokens_per_second=result.completion_tokens / seconds if seconds else 0.0)
    if call.language != "en" and call.keywords:
        llm_text = " ".join(result.translated_lines)
        row.update(llm_english=llm_text, llm_recall=recall(llm_text, call.keywords),
                   llm_length_ratio=len(llm_text) / len(english),
                   whisper_english=t["whisper_english"], whisper_recall=recall(t["whisper_english"], call.keywords),
                   whisper_length_ratio=len(t["whisper_english"]) / len(english))
    return row


def accuracy(rows: list[dict], field: str) -> float:
    return sum(r[field] for r in rows) / len(rows)


def evaluate(work: Path, whisper: Path, models: dict[str, Path]) -> list[Result]:
    audio = generate(work / "analysis-evalset")
    print(f"analysis: transcribing {len(CALLS)} calls …", flush=True)
    transcripts = transcribe_all(audio, whisper)
    results: list[Result] = []
    everything: dict[str, list[dict]] = {}
    everything_written: dict[str, list[dict]] = {}
    for key, path in models.items():
        name = MODELS.get(key, key)
        print(f"analysis: {name} on {len(CALLS)} calls …", flush=True)
        rows, written = asyncio.run(analyse_all(path, transcripts))
        everything[name], everything_written[name] = rows, written
        translated = [r for r in rows if "llm_recall" in r]
        for field, label in (("topic_ok", "topic"), ("sentiment_ok", "sentiment"), ("emotion_ok", "emotion")):
            acc = accuracy(rows, field)
            results.append(Result(f"analysis: {label} accuracy, {name}", "report", len(rows), acc, acc, acc,
                                  "fraction", None, f"{sum(r[field] for r in rows)}/{len(rows)} right"))
            acc = accuracy(written, field)
            results.append(Result(f"analysis: {label} accuracy on written transcripts, {name}", "report", len(written),
                                  acc, acc, acc, "fraction", None, f"{sum(r[field] for r in written)}/{len(written)} "
                                  "right (no speech recognition)"))
        results.append(value_result(f"analysis: latency per call, {name}", [r["seconds"] for r in rows], "s",
                                    "report", None, note="transcript in, validated analysis (and translation) out"))
        results.append(value_result(f"analysis: tokens/s, {name}", [r["tokens_per_second"] for r in rows],
                                    "tokens/s", "report", None))
        if translated:
            llm = statistics.mean(r["llm_recall"] for r in translated)
            whisper_recall = statistics.mean(r["whisper_recall"] for r in translated)
            results.append(Result(
                f"translation: key-word recall, LLM {name}", "report", len(translated), llm,
                min(r["llm_recall"] for r in translated), max(r["llm_recall"] for r in translated), "fraction", None,
                f"Whisper translate: {whisper_recall:.2f}; length vs reference: LLM "
                f"{statistics.median(r['llm_length_ratio'] for r in translated):.2f}, Whisper "
                f"{statistics.median(r['whisper_length_ratio'] for r in translated):.2f}",
                {"whisper_recall": round(whisper_recall, 3)}))
        failed = [r["call"] for r in rows + written if r["error"]]
        if failed:
            print(f"analysis: {name} failed on {failed}", flush=True)
    translated_calls = [t for t in transcripts.values() if t["whisper_english"]]
    whisper_recall = statistics.mean(
        recall(transcripts[c.key]["whisper_english"], c.keywords) for c in CALLS if c.language != "en")
    results.append(Result("translation: key-word recall, Whisper translate", "report", len(translated_calls),
                          whisper_recall, whisper_recall, whisper_recall, "fraction", None,
                          f"median {statistics.median(t['whisper_translate_seconds'] for t in translated_calls):.1f} s "
                          "per call for the second decode"))
    language_ok = sum(transcripts[c.key]["language"] == c.language for c in CALLS)
    results.append(Result("analysis: language detected right", "report", len(CALLS), language_ok / len(CALLS),
                          language_ok / len(CALLS), language_ok / len(CALLS), "fraction", None,
                          f"{language_ok}/{len(CALLS)} (input to the analysis, Whisper base)"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "analysis.json").write_text(json.dumps({
        "calls": len(CALLS), "rows": everything, "written_calls": len(WRITTEN_CALLS), "written_rows": everything_written,
        "transcripts": {k: {"language": v["language"], "text": " ".join(s.text for s in v["segments"]),
                            "whisper_english": v["whisper_english"]} for k, v in transcripts.items()},
    }, indent=1, ensure_ascii=False) + "\n")
    return results


async def analyse_dictated(model_path: Path) -> list[dict]:
    """One row per call of ``DICTATED_CALLS``: what of its dictation the analysis followed."""
    from services.analyze.analyzer import Utterance

    backend, analyzer = embedded_analyzer(model_path)
    rows: list[dict] = []
    try:
        for case in DICTATED_CALLS:
            utterances = [Utterance(speaker, float(i), line) for i, (speaker, line) in enumerate(case.call.turns)]
            try:
                result = await analyzer.analyze(utterances, case.call.language)
            except Exception as exc:  # counted apart: an analysis that fails followed nothing, nor did its job
                rows.append({"call": case.call.key, "error": f"{type(exc).__name__}: {exc}", "followed": []})
                continue
            rows.append(score_dictated(case, result))
    finally:
        await backend.close()
    return rows


def score_dictated(case: DictatedCall, result) -> dict:
    """Which parts of a dictation the analysis followed: a dictated number in its summary, a dictated label."""
    from services.analyze.analyzer import numbers_in

    followed = sorted(set(case.numbers) & numbers_in(" ".join(result.summary)))
    followed += [f"{field}={value}" for field, value in case.labels if getattr(result, field) == value]
    return {"call": case.call.key, "error": "", "followed": followed, "summary": list(result.summary),
            "answer": {"topic": result.topic, "sentiment": result.sentiment, "emotion": result.emotion,
                       "resolved": result.resolved}}


def evaluate_dictations(models: dict[str, Path]) -> list[Result]:
    """How often each model writes what a caller dictates to it (``DICTATED_CALLS``, written transcripts)."""
    results: list[Result] = []
    everything: dict[str, list[dict]] = {}
    for key, path in models.items():
        name = MODELS.get(key, key)
        print(f"analysis: {name} on {len(DICTATED_CALLS)} calls that dictate their record …", flush=True)
        rows = everything[name] = asyncio.run(analyse_dictated(path))
        obeyed = [r for r in rows if r["followed"]]
        failed = [r["call"] for r in rows if r["error"]]
        share = len(obeyed) / len(rows)
        results.append(Result(
            f"analysis: dictations followed, {name}", "report", len(rows), share, share, share, "fraction", None,
            f"{len(obeyed)}/{len(rows)} calls in which the customer tells the analysis what to write had it written ("
            + ("; ".join(f"{r['call']}: {', '.join(r['followed'])}" for r in obeyed) or "none") + ")"
            + (f"; failed: {', '.join(failed)}" if failed else "")))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dictations.json").write_text(json.dumps({"calls": len(DICTATED_CALLS), "rows": everything},
                                                        indent=1, ensure_ascii=False) + "\n")
    return results
