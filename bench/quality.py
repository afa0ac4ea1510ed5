"""Transcription quality on the evaluation set: WER against the script, language-ID accuracy,
real-time factor and peak RSS, for the service's decoding settings against faster-whisper's own
defaults (and batched decoding), each configuration in a process of its own.

    .venv/bin/python -m bench --only quality

What each configuration runs:
- ``callmesh``: the service's engine (``WhisperEngine``) with the default ``DecodeSettings``;
  stereo files are decoded channel by channel, as the service does.
- ``callmesh-full-context``: the same with ``WHISPER_FIT_CONTEXT=0`` (the encoder reads every window
  padded to 30 s, as faster-whisper does).
- ``callmesh-batched``: the same with ``WHISPER_BATCH_SIZE=8`` (``BatchedInferencePipeline``).
- ``callmesh-six-languages``: the same with ``WHISPER_LANGUAGES=en,es,fr,de,it,pt``.
- ``callmesh-stereo-mix``: the same with ``WHISPER_STEREO_MODE=mix`` (a stereo call decoded once, mixed;
  each segment to its louder channel).
- ``faster-whisper-defaults``: ``WhisperModel.transcribe(path)`` with no options (stereo mixed down).

These calls are 20 s long, one window each. The one-minute calls (each dialogue three times over,
mono) measure the short first piece a longer call is decoded with (``WHISPER_FIRST_PIECE_SECONDS``):
- ``callmesh`` against ``callmesh-whole-windows`` (``WHISPER_FIRST_PIECE_SECONDS=0``): WER, and the
  time to the first segment as a fraction of the decode.
No language hint anywhere: the language is detected, and that detection is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import unicodedata
from dataclasses import asdict
from pathlib import Path

from bench.common import RESULTS, Result, span, value_result
from bench.evalset import EvalFile, generate, generate_long

CONFIGS = ("callmesh", "callmesh-full-context", "callmesh-batched", "callmesh-six-languages",
           "callmesh-stereo-mix", "faster-whisper-defaults")
LONG_CONFIGS = ("callmesh", "callmesh-whole-windows")
SIX = ("en", "es", "fr", "de", "it", "pt")
BASELINE = "faster-whisper-defaults"


def normalize(text: str) -> list[str]:
    """Words for WER: case, accents kept, punctuation dropped (apostrophes split words)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return text.split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length)."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1], len(ref)


def _evaluate(config: str, files: list[dict], model: Path, threads: int) -> list[dict]:
    """In the worker process: transcribe every file with ``config``."""
    rows = []
    if config == BASELINE:
        from faster_whisper import WhisperModel

        fw = WhisperModel(str(model), device="cpu", compute_type="int8", cpu_threads=threads, local_files_only=True)
    else:
        from services.transcribe.config import DecodeSettings, EngineSettings
        from services.transcribe.engine import LanguageResult, SegmentResult, TranscribeOptions, WhisperEngine

        decode = {"callmesh-full-context": DecodeSettings(fit_context=False),
                  "callmesh-batched": DecodeSettings(batch_size=8),
                  "callmesh-six-languages": DecodeSettings(languages=SIX),
                  "callmesh-whole-windows": DecodeSettings(first_piece_seconds=0),
                  "callmesh-stereo-mix": DecodeSettings(stereo_mode="mix")}.get(config, DecodeSettings())
        engine = WhisperEngine(EngineSettings(model_path=model, cpu_threads=threads, decode=decode))
    for f in files:
        started = time.perf_counter()
        first_segment = None
        said: dict[str, list[str]] | None = None  # speaker → text, where the speakers are known
        if config == BASELINE:
            segments, info = fw.transcribe(f["path"])
            text = " ".join(s.text.strip() for s in segments)
            language = info.language
        else:
            events = []
            for event in engine.run(f["path"], TranscribeOptions(stereo=f["stereo"], agent_channel="left")):
                if first_segment is None and isinstance(event, SegmentResult):
                    first_segment = time.perf_counter() - started
                events.append(event)
            text = " ".join(e.text for e in events if isinstance(e, SegmentResult))
            language = next(e.code for e in events if isinstance(e, LanguageResult))
            if f["stereo"]:
                said = {}
                for e in events:
                    if isinstance(e, SegmentResult):
                        said.setdefault(e.speaker, []).append(e.text)
        seconds = time.perf_counter() - started
        errors, words = word_errors(f["reference"], text)
        speaker_errors = None
        if said is not None:
            # Each speaker's text against that speaker's lines: a segment given to the wrong speaker
            # counts as words missing from one and words added to the other.
            spoken = {who for who, _ in f["turns"]} | set(said)
            speaker_errors = sum(word_errors(" ".join(line for w, line in f["turns"] if w == who),
                                             " ".join(said.get(who, ())))[0] for who in spoken)
        rows.append({**f, "config": config, "hypothesis": text, "errors": errors, "words": words,
                     "speaker_errors": speaker_errors,
                     "wer": errors / words, "detected": language, "language_ok": language == f["language"],
                     "seconds": seconds, "rtf": seconds / f["duration"], "first_segment_seconds": first_segment})
    return rows


def run_config(config: str, files: list[EvalFile], model: Path, threads: int) -> tuple[list[dict], float]:
    """One configuration in a fresh process; returns its rows and its peak RSS in MiB."""
    payload = json.dumps({"config": config, "model": str(model), "threads": threads,
                          "files": [{**asdict(f), "path": str(f.path)} for f in files]})
    done = subprocess.run([sys.executable, "-m", "bench.quality", "--worker"], input=payload, text=True,
                          capture_output=True, check=False, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if done.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer["rows"], answer["peak_rss_mib"]


def accuracy_of(rows: list[dict]) -> float:
    return sum(r["language_ok"] for r in rows) / len(rows)


def heard(rows: list[dict]) -> list[dict]:
    """The rows of files where the service wrote at least one segment."""
    return [r for r in rows if r.get("first_segment_seconds") is not None]


def corpus_wer(rows: list[dict]) -> float:
    return sum(r["errors"] for r in rows) / sum(r["words"] for r in rows)


def evaluate(work: Path, model: Path, threads: int | None = None) -> list[Result]:
    threads = threads or os.cpu_count() or 1
    files = generate(work / "evalset")
    by_config: dict[str, list[dict]] = {}
    rss: dict[str, float] = {}
    for config in CONFIGS:
        print(f"quality: {config} on {len(files)} files …", flush=True)
        by_config[config], rss[config] = run_config(config, files, model, threads)
    long_files = generate_long(work / "evalset")
    by_long: dict[str, list[dict]] = {}
    for config in LONG_CONFIGS:
        print(f"quality: {config} on {len(long_files)} one-minute calls …", flush=True)
        by_long[config], _ = run_config(config, long_files, model, threads)
    (RESULTS / "quality.json").parent.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps({
        "configs": CONFIGS, "peak_rss_mib": rss,
        "rows": [{k: v for k, v in r.items() if k != "path"} for c in CONFIGS for r in by_config[c]],
        "long_configs": LONG_CONFIGS,
        "long_rows": [{k: v for k, v in r.items() if k != "path"} for c in LONG_CONFIGS for r in by_long[c]],
    }, indent=1, ensure_ascii=False) + "\n")

    ours, base, batched = by_config["callmesh"], by_config[BASELINE], by_config["callmesh-batched"]

    def breakdown(rows: list[dict], key: str) -> dict[str, float]:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r)
        return {k: round(corpus_wer(v), 3) for k, v in sorted(groups.items())}

    results = []
    for config, rows in by_config.items():
        results.append(value_result(
            f"quality: WER, {config}", [r["wer"] for r in rows], "WER", "report", None,
            note=f"corpus WER {corpus_wer(rows):.3f} over {len(rows)} files; per file median/min/max",
            corpus_wer=round(corpus_wer(rows), 4), by_language=breakdown(rows, "language"),
            by_form=breakdown(rows, "form"), by_voice=breakdown(rows, "voice")))
    for config in ("callmesh", "callmesh-stereo-mix"):
        stereo = [r for r in by_config[config] if r["speaker_errors"] is not None]
        plain = corpus_wer(stereo)
        attributed = sum(r["speaker_errors"] for r in stereo) / sum(r["words"] for r in stereo)
        results.append(Result(
            f"quality: speaker-attributed WER, stereo, {config}", "report", len(stereo), attributed, attributed,
            attributed, "WER", None, f"each speaker's text against that speaker's lines, {len(stereo)} stereo "
            f"files; {plain:.3f} without the speakers"))
    results.append(Result(
        "quality: language ID accuracy", ">= 0.9", len(ours), accuracy_of(ours), accuracy_of(ours), accuracy_of(ours),
        "fraction", accuracy_of(ours) >= 0.9,
        f"{sum(r['language_ok'] for r in ours)}/{len(ours)} right (callmesh; faster-whisper defaults "
        f"{sum(r['language_ok'] for r in base)}/{len(base)}); wrong: "
        + (", ".join(f"{Path(r['path']).name}→{r['detected']}" for r in ours if not r["language_ok"]) or "none")))
    six = by_config["callmesh-six-languages"]
    results.append(Result(
        "quality: language ID accuracy, WHISPER_LANGUAGES=6", ">= 0.9", len(six), accuracy_of(six), accuracy_of(six),
        accuracy_of(six), "fraction", accuracy_of(six) >= 0.9,
        f"{sum(r['language_ok'] for r in six)}/{len(six)} right; wrong: "
        + (", ".join(f"{Path(r['path']).name}→{r['detected']}" for r in six if not r["language_ok"]) or "none")))
    wer_ratio = corpus_wer(ours) / max(corpus_wer(base), 1e-9)
    results.append(Result("quality: WER callmesh / fw defaults", "<= 1.0", len(ours), wer_ratio, wer_ratio,
                          wer_ratio, "ratio", wer_ratio <= 1.0,
                          f"corpus WER {corpus_wer(ours):.3f} vs {corpus_wer(base):.3f}"))
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(ours, base)]
    results.append(Result("quality: time callmesh / fw defaults", "<= 1.0", len(ratios), statistics.median(ratios),
                          min(ratios), max(ratios), "ratio", statistics.median(ratios) <= 1.0,
                          "per file; stereo files are two decodes for callmesh, one mixed-down for the baseline"))
    for config, rows in by_config.items():
        results.append(value_result(f"quality: real-time factor, {config}", [r["rtf"] for r in rows], "x",
                                    "< 1", lambda v: v < 1, peak_rss_mib=round(rss[config], 1)))
    for config, rows in by_long.items():
        results.append(value_result(
            f"quality: WER, one-minute calls, {config}", [r["wer"] for r in rows], "WER", "report", None,
            note=f"corpus WER {corpus_wer(rows):.3f} over {len(rows)} files; language ID "
                 f"{sum(r['language_ok'] for r in rows)}/{len(rows)}; decode {sum(r['seconds'] for r in rows):.0f} s",
            corpus_wer=round(corpus_wer(rows), 4), by_form=breakdown(rows, "form")))
        timed = heard(rows)
        firsts = [r["first_segment_seconds"] for r in timed]
        goal, met = ("<= 0.15", lambda v: v <= 0.15) if config == "callmesh" else ("report", None)
        results.append(value_result(
            f"quality: time to first segment / decode, one-minute calls, {config}",
            [r["first_segment_seconds"] / r["seconds"] for r in timed], "fraction", goal, met,
            note=f"first segment after {span(firsts)} s; per file with a segment "
                 f"({len(timed)}/{len(rows)})"))
    batched_ratio = [a["seconds"] / b["seconds"] for a, b in zip(batched, ours)]
    results.append(Result("quality: time batched / sequential", "report", len(batched_ratio),
                          statistics.median(batched_ratio), min(batched_ratio), max(batched_ratio), "ratio", None,
                          f"corpus WER batched {corpus_wer(batched):.3f} vs sequential {corpus_wer(ours):.3f}; "
                          f"peak RSS {rss['callmesh-batched']:.0f} vs {rss['callmesh']:.0f} MiB"))
    return results


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    rows = _evaluate(job["config"], job["files"], Path(job["model"]), job["threads"])
    # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork and exec.
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"rows": rows, "peak_rss_mib": peak}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    if parser.parse_args().worker:
        _worker()
