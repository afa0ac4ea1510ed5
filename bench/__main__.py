"""``python -m bench``: every benchmark, on loopback, each against a baseline measured in the same run.

    .venv/bin/python -m bench                     # all of them (about 2.5 hours on 2 cores)
    .venv/bin/python -m bench --only webhook,transcribe
    .venv/bin/python -m bench --long-minutes 10   # a shorter long call for the RSS check (60 min: five 13-min decodes)
    .venv/bin/python -m bench --only quality      # WER and language ID on the generated evaluation set
    .venv/bin/python -m bench --only analysis     # topic/sentiment/emotion accuracy, translation sources
    .venv/bin/python -m bench --only dictations   # how often the LLM writes what a caller dictates to it
    WHISPER_DEVICE=cuda .venv/bin/python -m bench --only transcribe,cold,restart,memory,overlap --results gpu.json   # on a GPU

Runs are interleaved (A B A B …), at least 5 of each; the table shows median, min
and max, and results/latest.json keeps them with the machine they ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

from bench import analysis_bench, pipeline_bench, quality, transcribe_bench, webhook_load
from bench.common import RUNS, Result, looped_call, machine, sixty_second_call, table, write_results
from callmesh.models import MODELS, is_installed
from services.common.config import data_dir
from services.ingest.config import PipelineSettings

BENCHMARKS = ("transcribe", "cold", "restart", "memory", "long", "webhook", "overlap", "seed", "quality", "analysis",
              "dictations")


def model(key: str) -> Path:
    m = MODELS[key]
    if not is_installed(m, data_dir()):
        raise SystemExit(f"model {key} is not installed: run scripts/setup.sh --dev first")
    return m.path(data_dir())


async def run(only: tuple[str, ...], runs: int, long_minutes: int, llm_key: str,
              recording: Path | None = None, recordings: Path | None = None) -> list[Result]:
    work = Path(tempfile.mkdtemp(prefix="callmesh-bench-"))
    whisper = model("whisper-base")
    # only the pipeline benchmarks need the LLM: the transcription ones run without its weights
    llm = model(llm_key) / "model.gguf" if {"overlap", "seed"} & set(only) else Path()
    os.environ["WHISPER_MODEL"] = str(whisper)
    audio = work / "audio"
    audio.mkdir()
    call = recording or sixty_second_call(audio)
    results: list[Result] = []

    def done(new: list[Result]) -> None:
        results.extend(new)
        print(table(new), flush=True)

    if "transcribe" in only:
        done(await transcribe_bench.overhead_and_first_segment(call, work, whisper, runs))
    if "cold" in only:
        done(await transcribe_bench.cold_start(call, work, whisper, runs))
    if "restart" in only:
        done(await transcribe_bench.restart(call, work, whisper, runs))
    if "memory" in only:
        done(await transcribe_bench.memory(call, work, whisper, runs))
    if "webhook" in only:
        done(await webhook_load.webhook_ack(work / "webhook", 2000, 100, runs))
    if "overlap" in only:
        done(await pipeline_bench.pipeline_overlap(work, whisper, llm, runs,
                                                   concurrency=PipelineSettings.from_env().concurrency,
                                                   recordings=recordings))
    if "seed" in only:
        done(await pipeline_bench.seed_versus_mesh(work, whisper, llm, runs, recordings=recordings))
    if "analysis" in only:
        models = {key: model(key) / "model.gguf" for key in analysis_bench.MODELS}
        done(await asyncio.to_thread(analysis_bench.evaluate, work, whisper, models))
    if "dictations" in only:
        models = {key: model(key) / "model.gguf" for key in analysis_bench.MODELS}
        done(await asyncio.to_thread(analysis_bench.evaluate_dictations, models))
    if "quality" in only:
        done(await asyncio.to_thread(quality.evaluate, work, whisper))
    if "long" in only:
        long_call = looped_call(call, long_minutes, audio)
        done(await transcribe_bench.long_call_rss(long_call, work, whisper, long_minutes, runs))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated: {', '.join(BENCHMARKS)}")
    parser.add_argument("--runs", type=int, default=RUNS, help="runs of each side (at least 5)")
    parser.add_argument("--long-minutes", type=int, default=60, help="length of the long call for the RSS check")
    parser.add_argument("--llm", choices=("small", "main"), default="small",
                        help="LLM for the pipeline benchmarks (same on both sides): the 0.5B or the default 1.5B")
    parser.add_argument("--make-recordings", type=Path, metavar="DIR",
                        help="only write the benchmarks' recordings into DIR (for --call DIR/call-60s.wav "
                             "--recordings DIR on a machine without espeak-ng and ffmpeg), then stop")
    parser.add_argument("--call", type=Path, metavar="WAV",
                        help="the 60-s recording to use instead of synthesizing one")
    parser.add_argument("--recordings", type=Path, metavar="DIR",
                        help="the sample calls for the pipeline benchmarks, instead of synthesizing them")
    parser.add_argument("--results", default="latest.json", metavar="NAME",
                        help="file under bench/results to write (e.g. gpu.json for a run on a GPU)")
    args = parser.parse_args()
    if args.make_recordings is not None:
        pipeline_bench.make_recordings(args.make_recordings)  # creates DIR
        print(sixty_second_call(args.make_recordings))
        return
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(only) - set(BENCHMARKS)
    if unknown or args.runs < 5:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}" if unknown else "--runs must be at least 5")
    if args.call is not None and not args.call.is_file():
        parser.error(f"--call {args.call}: no such file")
    if args.recordings is not None and not args.recordings.is_dir():
        parser.error(f"--recordings {args.recordings}: no such folder")
    if Path(args.results).name != args.results or not args.results.endswith(".json"):
        parser.error("--results takes a file name ending in .json, written under bench/results")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    print(f"machine: {machine()}", flush=True)
    llm = "qwen2.5-coder-0.5b" if args.llm == "small" else "qwen2.5-coder-1.5b"
    results = asyncio.run(run(only, args.runs, args.long_minutes, llm, args.call, args.recordings))
    print("\n" + table(results))
    print(f"\nwritten to {write_results(results, started, args.results)}")


if __name__ == "__main__":
    main()
