"""What every benchmark shares: interleaved runs, medians, the machine, the results file, test audio."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from callmesh.samples import synthesize

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = 5

LONG_TEXT = (
    "Good morning, thank you for calling. I would like to ask about my last invoice. "
    "The amount is higher than usual and I do not understand the extra charges. "
    "Could you explain what the service fee is for and whether it will appear every month. "
    "I have been a customer for many years and I always paid on time. "
)


@dataclass
class Result:
    """One line of the table and one object of results/latest.json."""

    name: str
    goal: str
    runs: int
    median: float
    min: float
    max: float
    unit: str  # "ratio" for A/B figures; otherwise the unit of a plain value
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio" if self.unit == "ratio" else "value"] = self.median
        return out


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def span(values: list[float], digits: int = 1) -> str:
    """``min-max`` of ``values``."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def ratio_result(name: str, ratios: list[float], goal: str, met: Callable[[float], bool], note: str = "",
                 **extra: Any) -> Result:
    med, lo, hi = summary(ratios)
    return Result(name, goal, len(ratios), med, lo, hi, "ratio", met(med), note, extra)


def value_result(name: str, values: list[float], unit: str, goal: str, met: Callable[[float], bool] | None,
                 note: str = "", **extra: Any) -> Result:
    med, lo, hi = summary(values)
    return Result(name, goal, len(values), med, lo, hi, unit, met(med) if met else None, note, extra)


async def interleaved(a: Callable[[], Awaitable[float]], b: Callable[[], Awaitable[float]],
                      runs: int = RUNS) -> tuple[list[float], list[float]]:
    """Run A B A B …, ``runs`` times each; each callable returns its own measurement."""
    first, second = await interleaved_all((a, b), runs)
    return first, second


async def interleaved_all(arms: Sequence[Callable[[], Awaitable[float]]], runs: int = RUNS) -> list[list[float]]:
    """Run A B C … A B C …, ``runs`` times each; the measurements of each arm, in the order of ``arms``."""
    measured: list[list[float]] = [[] for _ in arms]
    for _ in range(runs):
        for values, arm in zip(measured, arms):
            values.append(await arm())
    return measured


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if shutil.which("nvidia-smi"):
        probe = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True)
        gpu = probe.stdout.strip()
    mem = 0
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) // 1024
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu or platform.processor(), "gpu": gpu or None, "memory_mib": mem,
            "whisper_device": os.environ.get("WHISPER_DEVICE", "cpu"),
            "python": platform.python_version(), "platform": platform.platform()}


def write_results(results: list[Result], started: float, name: str = "latest.json") -> Path:
    """Write results/``name``; benchmarks not run this time keep their last figures, with the date
    and the machine of their own run (the top-level ``machine`` is this run's)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    here = machine()
    fresh = [{**r.as_json(), "date": date, "machine": here} for r in results]
    kept: list[dict[str, Any]] = []
    if path.exists():
        names = {r.name for r in results}
        previous = json.loads(path.read_text())
        kept = [r for r in previous.get("results", []) if r["name"] not in names]
    path.write_text(json.dumps({
        "date": date,
        "seconds": round(time.time() - started, 1),
        "machine": here,
        "results": kept + fresh,
    }, indent=2) + "\n")
    return path


def table(results: list[Result]) -> str:
    lines = [f"{'benchmark':34} {'median':>9} {'min':>9} {'max':>9} {'runs':>4}  {'goal':26} met",
             "-" * 100]
    for r in results:
        unit = "" if r.unit == "ratio" else f" {r.unit}"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        lines.append(f"{r.name:34} {r.median:9.3f} {r.min:9.3f} {r.max:9.3f} {r.runs:4d}  {r.goal + unit:26} {met}")
        if r.note:
            lines.append(f"{'':34}   {r.note}")
    return "\n".join(lines)


def sixty_second_call(directory: Path) -> Path:
    """About 60 s of English speech (espeak-ng), padded to exactly 60 s."""
    out = directory / "call-60s.wav"
    if out.exists():
        return out
    speech = synthesize(LONG_TEXT * 3, "en-us", directory / "speech.wav", speed=160)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(speech), "-af", "apad", "-t", "60",
                    "-ar", "16000", "-ac", "1", str(out)], check=True)
    return out


def looped_call(source: Path, minutes: int, directory: Path) -> Path:
    """``source`` repeated to ``minutes`` of audio (a long call without a long synthesis)."""
    out = directory / f"call-{minutes}min.wav"
    if not out.exists():
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(source),
                        "-t", str(minutes * 60), "-ar", "16000", "-ac", "1", str(out)], check=True)
    return out
